"""Vectorised numpy ray caster for synthetic sensors.

One code path serves camera pixels and lidar beams: a sensor is a grid of unit ray directions
``(H, W, 3)`` sharing one origin, and :func:`cast` fills a depth buffer by intersecting the grid
with a ground plane ``z = 0`` and a list of :class:`Primitive` (yawed boxes, vertical cylinders,
axis-aligned ellipsoids). An optional ``rect`` callback restricts each primitive to the rectangle of
the grid it can cover, which turns the per-primitive cost into its screen area (rasteriser-like
culling); without it every primitive is tested against every ray.

All coordinates are metres in the world ("global") frame, angles are radians.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BOX, CYLINDER, ELLIPSOID = 0, 1, 2
GROUND_ID = 0  # primitive id of the ground plane in the id buffer; primitives are 1..P
SKY_ID = -1  # id of rays that hit nothing

_EPS = 1e-9


@dataclass(frozen=True)
class Primitive:
    """A solid in the world frame.

    Attributes
    ----------
    kind : int
        ``BOX``, ``CYLINDER`` or ``ELLIPSOID``.
    center : tuple of float, (3,)
        Box: centre of the box. Cylinder: centre of its base disc. Ellipsoid: its centre. Metres.
    size : tuple of float, (3,)
        Box: full extents (length along its x, width along its y, height). Cylinder:
        (radius, radius, height). Ellipsoid: semi-axes (rx, ry, rz). Metres.
    yaw : float
        Rotation of a box about the world z axis (radians); ignored for the other kinds.
    label : int
        nuScenes lidarseg class index of the surface.
    colour : tuple of float, (3,)
        Base RGB colour in 0..255 before texture and shading.
    texture : int
        Texture id interpreted by the scene's shader.
    instance : int
        Object instance id (>= 0) for annotated objects, else -1.
    intensity : float
        Base lidar reflectivity (0..255).
    """

    kind: int
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float
    label: int
    colour: tuple[float, float, float]
    texture: int
    instance: int = -1
    intensity: float = 20.0

    def corners(self) -> np.ndarray:
        """Corners of a world-frame bounding box of the solid, shape (8, 3)."""
        c = np.asarray(self.center, dtype=np.float64)
        sx, sy, sz = self.size
        if self.kind == BOX:
            lx, ly = np.array([-0.5, 0.5]) * sx, np.array([-0.5, 0.5]) * sy
            lz = np.array([-0.5, 0.5]) * sz
        elif self.kind == CYLINDER:
            lx, ly, lz = np.array([-sx, sx]), np.array([-sy, sy]), np.array([0.0, sz])
        else:
            lx, ly, lz = np.array([-sx, sx]), np.array([-sy, sy]), np.array([-sz, sz])
        grid = np.stack(np.meshgrid(lx, ly, lz, indexing="ij"), axis=-1).reshape(8, 3)
        if self.kind == BOX:
            grid = grid @ _rot_z(self.yaw).T
        return grid + c

    def bounding_radius(self) -> float:
        """Radius (m) of a sphere around :meth:`corners`' centre containing the solid."""
        corners = self.corners()
        return float(np.linalg.norm(corners - corners.mean(axis=0), axis=1).max())


@dataclass
class Hits:
    """Result of :func:`cast` for a grid of shape (H, W).

    Attributes
    ----------
    depth : ndarray, (H, W) float64
        Ray parameter of the closest hit (metres along the unit ray); ``inf`` where nothing is hit.
    prim : ndarray, (H, W) int32
        ``GROUND_ID`` (0) for the ground, ``i + 1`` for ``primitives[i]``, ``SKY_ID`` (-1) for no hit.
    normal : ndarray, (H, W, 3) float64
        World-frame unit normal at the hit.
    local : ndarray, (H, W, 3) float64
        Hit point in the primitive's own frame (box: relative to its centre, rotated by -yaw;
        cylinder: relative to its base centre; ellipsoid: relative to its centre; ground: world).
    """

    depth: np.ndarray
    prim: np.ndarray
    normal: np.ndarray
    local: np.ndarray


def _rot_z(yaw: float) -> np.ndarray:
    """Rotation matrix (3, 3) about z by ``yaw`` radians."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _intersect_box(p: Primitive, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Slab test of rays ``o + t d`` (d: (..., 3)) against a yawed box; returns t, normal, local."""
    rot = _rot_z(p.yaw)
    ol = rot.T @ (o - np.asarray(p.center))
    dl = d @ rot  # row vectors: (R^T d)^T = d^T R
    tnear = np.full(d.shape[:-1], -np.inf)
    tfar = np.full(d.shape[:-1], np.inf)
    near_axis = np.zeros(d.shape[:-1], np.int8)
    # Per-axis loops instead of reductions over a length-3 axis: numpy is much faster on contiguous planes.
    for ax in range(3):
        half = 0.5 * p.size[ax]
        comp = dl[..., ax]
        # A tiny same-sign offset keeps rays parallel to a slab well defined (t = +-huge).
        inv = 1.0 / np.where(np.abs(comp) < _EPS, _EPS, comp)
        t1, t2 = (-half - ol[ax]) * inv, (half - ol[ax]) * inv
        tn = np.minimum(t1, t2)
        better = tn > tnear
        near_axis[better] = ax
        tnear = np.where(better, tn, tnear)
        np.minimum(tfar, np.maximum(t1, t2), out=tfar)
    hit = (tnear <= tfar) & (tnear > 1e-6)  # origins inside a box do not see it
    t = np.where(hit, tnear, np.inf)
    local = ol + np.where(hit, tnear, 0.0)[..., None] * dl
    nl = np.zeros(d.shape)
    for ax in range(3):
        sel = near_axis == ax
        nl[..., ax] = np.where(sel, -np.sign(dl[..., ax]), 0.0)
    return t, nl @ rot.T, local


def _intersect_cylinder(p: Primitive, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rays against a vertical cylinder (side and top cap); returns t, normal, local."""
    r, h = p.size[0], p.size[2]
    ol = o - np.asarray(p.center)
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    a = dx * dx + dy * dy
    b = 2.0 * (ol[0] * dx + ol[1] * dy)
    c = ol[0] ** 2 + ol[1] ** 2 - r * r
    disc = b * b - 4.0 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * np.maximum(a, _EPS))
        z_side = ol[2] + t_side * dz
        side_ok = (disc > 0) & (a > _EPS) & (t_side > 1e-6) & (z_side >= 0.0) & (z_side <= h)
        t_top = (h - ol[2]) / np.where(np.abs(dz) < _EPS, -_EPS, dz)
        top_x, top_y = ol[0] + t_top * dx, ol[1] + t_top * dy
        top_ok = (t_top > 1e-6) & (top_x * top_x + top_y * top_y <= r * r) & (ol[2] > h)
    t_s = np.where(side_ok, t_side, np.inf)
    t_t = np.where(top_ok, t_top, np.inf)
    use_top = t_t < t_s
    t = np.minimum(t_s, t_t)
    tt = np.where(np.isfinite(t), t, 0.0)
    local = ol + tt[..., None] * d
    n = np.zeros(d.shape)
    n[..., 0] = np.where(use_top, 0.0, local[..., 0] / r)
    n[..., 1] = np.where(use_top, 0.0, local[..., 1] / r)
    n[..., 2] = np.where(use_top, 1.0, 0.0)
    return t, n, local


def _intersect_ellipsoid(p: Primitive, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rays against an axis-aligned ellipsoid; returns t, normal, local."""
    s = np.asarray(p.size)
    ol = (o - np.asarray(p.center)) / s
    dl = d / s
    a = (dl * dl).sum(axis=-1)
    b = 2.0 * (dl @ ol)
    c = float(ol @ ol) - 1.0
    disc = b * b - 4.0 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    hit = (disc > 0) & (t > 1e-6) & (c > 0)
    t = np.where(hit, t, np.inf)
    tt = np.where(hit, t, 0.0)
    local = (ol + tt[..., None] * dl) * s
    n = local / (s * s)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), _EPS)
    return t, n, local


_INTERSECT = {BOX: _intersect_box, CYLINDER: _intersect_cylinder, ELLIPSOID: _intersect_ellipsoid}


def intersect(p: Primitive, origin: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersect rays with one primitive.

    Parameters
    ----------
    p : Primitive
    origin : ndarray, (3,)
        Common ray origin, world frame (m).
    dirs : ndarray, (..., 3)
        Unit ray directions, world frame.

    Returns
    -------
    t : ndarray, (...)
        Distance (m) to the first hit in front of the origin, ``inf`` for a miss.
    normal : ndarray, (..., 3)
        World-frame unit normal at the hit.
    local : ndarray, (..., 3)
        Hit point in the primitive's frame (see :class:`Hits`).
    """
    return _INTERSECT[p.kind](p, origin, dirs)


RectFn = Callable[[Primitive], "tuple[int, int, int, int] | None"]


def cast(origin: np.ndarray, dirs: np.ndarray, primitives: list[Primitive], rect: RectFn | None = None) -> Hits:
    """Closest hits of a grid of rays against the ground plane ``z = 0`` and ``primitives``.

    Parameters
    ----------
    origin : ndarray, (3,)
        Ray origin in the world frame (m); must lie above the ground.
    dirs : ndarray, (H, W, 3)
        Unit ray directions in the world frame.
    primitives : list of Primitive
    rect : callable, optional
        ``rect(p) -> (r0, r1, c0, c1)`` half-open grid rectangle that can contain ``p``'s
        projection, or ``None`` when ``p`` is invisible. Default: the whole grid.

    Returns
    -------
    Hits
    """
    origin = np.asarray(origin, dtype=np.float64)
    h, w, _ = dirs.shape
    dz = dirs[..., 2]
    with np.errstate(divide="ignore"):
        t_ground = np.where(dz < -1e-9, -origin[2] / np.where(dz < -1e-9, dz, -1.0), np.inf)
    depth = t_ground.astype(np.float64)
    prim = np.where(np.isfinite(depth), GROUND_ID, SKY_ID).astype(np.int32)
    normal = np.zeros((h, w, 3))
    normal[..., 2] = 1.0
    local = origin + np.where(np.isfinite(depth), depth, 0.0)[..., None] * dirs
    for i, p in enumerate(primitives):
        box = (0, h, 0, w) if rect is None else rect(p)
        if box is None:
            continue
        r0, r1, c0, c1 = box
        if r1 <= r0 or c1 <= c0:
            continue
        t, n, loc = intersect(p, origin, dirs[r0:r1, c0:c1])
        closer = t < depth[r0:r1, c0:c1]
        if not closer.any():
            continue
        depth[r0:r1, c0:c1][closer] = t[closer]
        prim[r0:r1, c0:c1][closer] = i + 1
        normal[r0:r1, c0:c1][closer] = n[closer]
        local[r0:r1, c0:c1][closer] = loc[closer]
    return Hits(depth=depth, prim=prim, normal=normal, local=local)
