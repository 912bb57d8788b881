"""Procedural static street world for the synthetic nuScenes generator.

The world is a curved street (a circular arc of radius ``R``) lying on the ground plane ``z = 0``
of the global frame: lanes and parking lanes (``flat.driveable_surface``), sidewalks
(``flat.sidewalk``), grass strips (``flat.terrain``), buildings with windows and poles
(``static.manmade``), trees and bushes (``static.vegetation``), parked cars (``vehicle.car``),
pedestrians (``human.pedestrian.adult``) and road-work barriers (``movable_object.barrier``).
Appearance depends on the class (base colour families in :data:`CLASS_PALETTE` plus class textures)
and so does geometry, so image features carry class information for lidar distillation.

Positions along the street are given in road coordinates ``(s, d)``: ``s`` is the arc length (m) in
the ego's direction of travel and ``d`` the signed lateral offset (m, positive to the left) from the
ego's lane centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from distillkit.sensors.synth.raycast import BOX, CYLINDER, ELLIPSOID, GROUND_ID, SKY_ID, Hits, Primitive

# nuScenes-lidarseg class indices (category.json "index"), the ones this world uses.
NOISE, PEDESTRIAN, BARRIER, CAR = 0, 2, 9, 17
DRIVEABLE, SIDEWALK, TERRAIN, MANMADE, VEGETATION = 24, 26, 27, 28, 30

# All 32 nuScenes-lidarseg classes in index order (index = position), as in nuScenes v1.0 category.json.
LIDARSEG_NAMES: tuple[str, ...] = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle", "vehicle.bus.bendy",
    "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck",
    "flat.driveable_surface", "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade",
    "static.other", "static.vegetation", "vehicle.ego",
)

# Base colours (RGB 0..255) of each class' surfaces before texture and shading. Every colour the shader
# paints on a class is one of these times a shade factor (plus noise), so "nearest palette colour"
# recovers the class from a pixel; tests rely on this.
CLASS_PALETTE: dict[int, list[tuple[int, int, int]]] = {
    DRIVEABLE: [(80, 80, 80), (232, 232, 222)],  # asphalt, lane markings
    SIDEWALK: [(182, 158, 138)],  # reddish pavers
    TERRAIN: [(122, 104, 58)],
    MANMADE: [(208, 182, 140), (226, 214, 188), (168, 96, 72), (40, 80, 140)],  # 3 facades, windows
    VEGETATION: [(52, 122, 40), (84, 152, 52), (92, 66, 40)],  # 2 foliages, bark
    CAR: [(192, 30, 36), (36, 66, 188), (226, 192, 40), (22, 22, 26)],  # 3 paints, glass
    PEDESTRIAN: [(152, 42, 162), (232, 82, 152)],
    BARRIER: [(246, 122, 22), (246, 246, 246)],
}

# Texture ids interpreted by :func:`shade`.
T_GROUND, T_BUILDING, T_CAR_BODY, T_CAR_CABIN, T_CANOPY, T_TRUNK, T_PED, T_HEAD, T_POLE, T_BARRIER = range(10)

# Lidar reflectivity (0..255) per texture; lane paint and barrier foil are retro-reflective.
_INTENSITY = {T_GROUND: 8.0, T_BUILDING: 35.0, T_CAR_BODY: 45.0, T_CAR_CABIN: 30.0, T_CANOPY: 14.0,
              T_TRUNK: 20.0, T_PED: 22.0, T_HEAD: 18.0, T_POLE: 60.0, T_BARRIER: 90.0}

# Street cross-section (d, metres): ego lane [-1.75, 1.75], oncoming lane up to 5.25, parking lanes
# [-4.25, -1.75] and [5.25, 7.75], sidewalks 4 m wide, then terrain.
ROAD_D = (-4.25, 7.75)
SIDEWALK_D = ((-8.25, -4.25), (7.75, 11.75))
_LINES = ((-1.75, False), (1.75, True), (5.25, False))  # (d, dashed) lane markings
_SUN = np.array([0.35, 0.45, 0.82]) / np.linalg.norm([0.35, 0.45, 0.82])
_AMBIENT = 0.55

# Fixed value-noise table; independent of the seed so textures are a property of the world position.
_NOISE = np.random.default_rng(20240611).random((256, 256))


@dataclass(frozen=True)
class Road:
    """Circular street: centre ``(cx, cy)`` (m, global), radius (m), turn sign, start angle (rad).

    ``sign = +1`` turns left (counter-clockwise), ``-1`` turns right. ``s = 0, d = 0`` is at polar
    angle ``theta0`` around the centre.
    """

    cx: float
    cy: float
    radius: float
    sign: int
    theta0: float

    def to_world(self, s: np.ndarray | float, d: np.ndarray | float) -> tuple[np.ndarray, ...]:
        """Road coordinates -> global ``x, y`` (m) and travel heading (rad, yaw of the tangent)."""
        theta = self.theta0 + self.sign * np.asarray(s) / self.radius
        r = self.radius - self.sign * np.asarray(d)
        return self.cx + r * np.cos(theta), self.cy + r * np.sin(theta), theta + self.sign * np.pi / 2

    def to_road(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global ``x, y`` (m) -> road coordinates ``s, d`` (m)."""
        dx, dy = x - self.cx, y - self.cy
        r = np.hypot(dx, dy)
        dtheta = np.angle(np.exp(1j * (np.arctan2(dy, dx) - self.theta0)))
        return self.sign * dtheta * self.radius, self.sign * (self.radius - r)


@dataclass(frozen=True)
class Instance:
    """An annotated object: category name, box centre (m, global), size ``(w, l, h)`` (m), yaw (rad)."""

    token_key: int
    category: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float


@dataclass
class World:
    """A static world: the street, its solids and annotated object instances."""

    road: Road
    primitives: list[Primitive] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)

    def table(self) -> dict[str, np.ndarray]:
        """Per-primitive lookup arrays indexed by hit id (0 = ground, i + 1 = primitive i)."""
        n = len(self.primitives) + 1
        out = {
            "label": np.zeros(n, np.uint8), "texture": np.zeros(n, np.int16),
            "colour": np.zeros((n, 3)), "yaw": np.zeros(n), "height": np.zeros(n),
            "instance": np.full(n, -1, np.int32), "intensity": np.zeros(n), "center": np.zeros((n, 3)),
        }
        out["label"][GROUND_ID] = DRIVEABLE
        for i, p in enumerate(self.primitives, start=1):
            out["label"][i], out["texture"][i], out["colour"][i] = p.label, p.texture, p.colour
            out["yaw"][i], out["height"][i], out["instance"][i] = p.yaw, p.size[2], p.instance
            out["intensity"][i], out["center"][i] = p.intensity, p.center
        return out


def _place_box(world: World, s: float, d: float, z0: float, size: tuple[float, float, float],
               label: int, colour: tuple[int, int, int], texture: int, instance: int = -1,
               ds: float = 0.0) -> None:
    """Add a road-aligned box whose base is at height ``z0`` and centre at road coords ``(s + ds, d)``."""
    x, y, yaw = world.road.to_world(s + ds, d)
    world.primitives.append(Primitive(BOX, (float(x), float(y), z0 + size[2] / 2), size, float(yaw), label,
                                      colour, texture, instance, _INTENSITY[texture]))


def _add_buildings(world: World, rng: np.random.Generator, s_range: tuple[float, float]) -> None:
    """Rows of box buildings behind both sidewalks, with random lengths, depths, heights and gaps."""
    for side in (-1, 1):
        s = s_range[0]
        while s < s_range[1]:
            length, depth = rng.uniform(8, 24), rng.uniform(8, 14)
            height, setback = rng.uniform(5, 19), rng.uniform(0.5, 3.0)
            kerb = SIDEWALK_D[0][0] if side < 0 else SIDEWALK_D[1][1]
            d = kerb + side * (setback + depth / 2)
            colour = CLASS_PALETTE[MANMADE][int(rng.integers(0, 3))]
            _place_box(world, s + length / 2, d, 0.0, (length, depth, height), MANMADE, colour, T_BUILDING)
            gap = rng.uniform(0.5, 4.0) if rng.random() < 0.7 else rng.uniform(6.0, 12.0)
            if gap > 5.0:  # wide gaps get a bush, so the far background is not only sky
                bx, by, _ = world.road.to_world(s + length + gap / 2, kerb + side * rng.uniform(1.5, 3.0))
                r = rng.uniform(0.8, 1.6)
                world.primitives.append(Primitive(ELLIPSOID, (float(bx), float(by), 0.5 * r), (r, r, 0.9 * r),
                                                  0.0, VEGETATION, CLASS_PALETTE[VEGETATION][1], T_CANOPY,
                                                  -1, _INTENSITY[T_CANOPY]))
            s += length + gap


def _add_street_furniture(world: World, rng: np.random.Generator, s_range: tuple[float, float]) -> None:
    """Trees near the kerbs and lamp poles on the sidewalks."""
    for d_tree, d_pole in ((-5.0, -4.6), (8.75, 8.15)):
        s = s_range[0] + rng.uniform(0, 10)
        while s < s_range[1]:
            x, y, _ = world.road.to_world(s, d_tree)
            trunk_h, r, rz = rng.uniform(2.2, 3.0), rng.uniform(1.6, 2.6), rng.uniform(1.6, 2.4)
            world.primitives.append(Primitive(CYLINDER, (float(x), float(y), 0.0), (0.16, 0.16, trunk_h + 0.5),
                                              0.0, VEGETATION, CLASS_PALETTE[VEGETATION][2], T_TRUNK, -1,
                                              _INTENSITY[T_TRUNK]))
            colour = CLASS_PALETTE[VEGETATION][int(rng.integers(0, 2))]
            world.primitives.append(Primitive(ELLIPSOID, (float(x), float(y), trunk_h + 0.8 * rz), (r, r, rz),
                                              0.0, VEGETATION, colour, T_CANOPY, -1, _INTENSITY[T_CANOPY]))
            s += rng.uniform(10, 22)
        s = s_range[0] + rng.uniform(0, 10)
        while s < s_range[1]:
            x, y, _ = world.road.to_world(s, d_pole)
            world.primitives.append(Primitive(CYLINDER, (float(x), float(y), 0.0), (0.12, 0.12, 7.0), 0.0,
                                              MANMADE, CLASS_PALETTE[MANMADE][0], T_POLE, -1, _INTENSITY[T_POLE]))
            s += rng.uniform(20, 32)


def _add_car(world: World, s: float, d: float, colour: tuple[int, int, int]) -> None:
    """A parked car: body box on 0.3 m clearance plus a shorter cabin box, one annotated instance."""
    key = len(world.instances)
    _place_box(world, s, d, 0.3, (4.4, 1.8, 0.75), CAR, colour, T_CAR_BODY, key)
    _place_box(world, s, d, 1.05, (2.5, 1.62, 0.5), CAR, colour, T_CAR_CABIN, key, ds=-0.3)
    x, y, yaw = world.road.to_world(s, d)
    world.instances.append(Instance(key, "vehicle.car", (float(x), float(y), 0.775), (1.8, 4.4, 1.55),
                                    float(yaw)))


def _add_traffic(world: World, rng: np.random.Generator, s_range: tuple[float, float]) -> None:
    """Parked cars and barrier groups in the parking lanes, a few stopped cars in the oncoming lane."""
    cars = CLASS_PALETTE[CAR][:3]
    for d, barrier_group in ((-3.0, True), (6.5, rng.random() < 0.5)):
        s = s_range[0] + rng.uniform(0, 6)
        while s < s_range[1]:
            u = rng.random()
            if barrier_group and u < 0.12:  # one road-works section per lane at most
                barrier_group = False
                for k in range(int(rng.integers(3, 6))):
                    colour = CLASS_PALETTE[BARRIER][0]
                    _place_box(world, s + 1.7 * k, d + 0.6, 0.0, (1.5, 0.4, 0.9), BARRIER, colour, T_BARRIER)
                s += 1.7 * 6
            elif u < 0.75:
                _add_car(world, s + 2.2, d, cars[int(rng.integers(0, 3))])
                s += rng.uniform(5.6, 8.0)
            else:
                s += rng.uniform(4.0, 10.0)
    s = s_range[0] + rng.uniform(0, 20)
    while s < s_range[1]:
        _add_car(world, s, 3.5, cars[int(rng.integers(0, 3))])
        s += rng.uniform(18, 40)


def _add_pedestrians(world: World, rng: np.random.Generator, s_range: tuple[float, float], n: int) -> None:
    """Standing pedestrians on the sidewalks: a body cylinder and a head ellipsoid each."""
    for _ in range(n):
        lo, hi = SIDEWALK_D[int(rng.integers(0, 2))]
        s, d = rng.uniform(*s_range), rng.uniform(lo + 0.6, hi - 0.6)
        x, y, yaw = world.road.to_world(s, d)
        key, height = len(world.instances), rng.uniform(1.45, 1.6)
        colour = CLASS_PALETTE[PEDESTRIAN][int(rng.integers(0, 2))]
        world.primitives.append(Primitive(CYLINDER, (float(x), float(y), 0.0), (0.24, 0.24, height), 0.0,
                                          PEDESTRIAN, colour, T_PED, key, _INTENSITY[T_PED]))
        world.primitives.append(Primitive(ELLIPSOID, (float(x), float(y), height + 0.12), (0.11, 0.11, 0.14),
                                          0.0, PEDESTRIAN, colour, T_HEAD, key,
                                          _INTENSITY[T_HEAD]))
        world.instances.append(Instance(key, "human.pedestrian.adult", (float(x), float(y), (height + 0.26) / 2),
                                        (0.6, 0.6, height + 0.26), float(yaw)))


def make_world(rng: np.random.Generator, road: Road, s_range: tuple[float, float] = (-90.0, 140.0)) -> World:
    """Generate the static world of one scene along ``road`` for arc lengths in ``s_range`` (m)."""
    world = World(road=road)
    _add_buildings(world, rng, s_range)
    _add_street_furniture(world, rng, s_range)
    _add_traffic(world, rng, s_range)
    _add_pedestrians(world, rng, s_range, n=int((s_range[1] - s_range[0]) / 8))
    return world


def value_noise(x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Smooth value noise in [0, 1] at world coords ``x, y`` (m) with ``scale`` cells per metre."""
    gx, gy = x * scale, y * scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = gx - ix, gy - iy
    ix, iy = ix.astype(np.int64) & 255, iy.astype(np.int64) & 255
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep avoids grid artefacts
    n00, n10 = _NOISE[ix, iy], _NOISE[(ix + 1) & 255, iy]
    n01, n11 = _NOISE[ix, (iy + 1) & 255], _NOISE[(ix + 1) & 255, (iy + 1) & 255]
    return (n00 * (1 - fx) + n10 * fx) * (1 - fy) + (n01 * (1 - fx) + n11 * fx) * fy


def _shade_ground(road: Road, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground class, colour (N, 3) and intensity (N,) at ground points ``p`` (N, 3)."""
    s, d = road.to_road(p[:, 0], p[:, 1])
    label = np.full(len(p), TERRAIN, np.uint8)
    on_walk = ((d >= SIDEWALK_D[0][0]) & (d < SIDEWALK_D[0][1])) | ((d > SIDEWALK_D[1][0]) & (d <= SIDEWALK_D[1][1]))
    on_road = (d >= ROAD_D[0]) & (d <= ROAD_D[1])
    label[on_walk], label[on_road] = SIDEWALK, DRIVEABLE
    fine = value_noise(p[:, 0], p[:, 1], 6.0)
    colour = np.empty((len(p), 3))
    colour[:] = CLASS_PALETTE[TERRAIN][0]
    colour *= (0.75 + 0.5 * value_noise(p[:, 0], p[:, 1], 2.0) * fine)[:, None]
    road_c = np.asarray(CLASS_PALETTE[DRIVEABLE][0]) * (0.92 + 0.16 * fine)[:, None]
    colour[on_road] = road_c[on_road]
    # Sidewalk slabs: 1.5 m tiles separated by darker joints.
    joint = (np.abs(((s + 0.75) % 1.5) - 0.75) > 0.7) | (np.abs(((d + 0.75) % 1.5) - 0.75) > 0.7)
    walk_c = np.asarray(CLASS_PALETTE[SIDEWALK][0]) * np.where(joint, 0.8, 0.96 + 0.08 * fine)[:, None]
    colour[on_walk] = walk_c[on_walk]
    intensity = np.where(on_road, 8.0, np.where(on_walk, 18.0, 12.0))
    paint = np.zeros(len(p), bool)
    for d_line, dashed in _LINES:
        line = np.abs(d - d_line) < 0.08
        paint |= line & ((s % 6.0) < 3.0) if dashed else line
    paint |= (np.abs(d - (ROAD_D[0] + 0.15)) < 0.08) | (np.abs(d - (ROAD_D[1] - 0.15)) < 0.08)
    colour[paint] = CLASS_PALETTE[DRIVEABLE][1]
    intensity[paint] = 70.0
    return label, colour, intensity


def _shade_objects(tab: dict[str, np.ndarray], ids: np.ndarray, p: np.ndarray, local: np.ndarray,
                   normal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Textured base colour (N, 3) and intensity (N,) of primitive hits (ids >= 1)."""
    tex = tab["texture"][ids]
    colour = tab["colour"][ids].copy()
    intensity = tab["intensity"][ids].copy()
    yaw = tab["yaw"][ids]
    # Local normal of box hits tells which face was hit: windows only on vertical faces.
    nlx = np.cos(yaw) * normal[:, 0] + np.sin(yaw) * normal[:, 1]
    along = np.where(np.abs(nlx) > 0.5, local[:, 1], local[:, 0])
    z_base = local[:, 2] + tab["height"][ids] / 2
    vertical = np.abs(normal[:, 2]) < 0.5
    b = tex == T_BUILDING
    window = b & vertical & (np.abs(((along / 3.0) % 1.0) - 0.5) < 0.28) & ((z_base / 3.2) % 1.0 > 0.3)
    window &= ((z_base / 3.2) % 1.0 < 0.78) & (z_base > 2.0)
    colour[window] = CLASS_PALETTE[MANMADE][3]
    intensity[window] = 4.0
    roof = b & ~vertical
    colour[roof] *= 0.7
    cabin_glass = (tex == T_CAR_CABIN) & vertical & (local[:, 2] > -0.1) & (local[:, 2] < 0.17)
    colour[cabin_glass] = CLASS_PALETTE[CAR][3]
    intensity[cabin_glass] = 6.0
    leafy = tex == T_CANOPY
    if leafy.any():
        n = value_noise(p[leafy, 0] + p[leafy, 2], p[leafy, 1] - p[leafy, 2], 5.0)
        colour[leafy] *= (0.7 + 0.55 * n)[:, None]
    stripe = (tex == T_BARRIER) & ((((local[:, 0] - local[:, 2]) / 0.5) % 2.0) < 1.0)
    colour[stripe] = CLASS_PALETTE[BARRIER][1]
    return colour, intensity


def shade(hits: Hits, dirs: np.ndarray, world: World,
          tab: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class label, lit colour and lidar intensity of every ray of a cast.

    Parameters
    ----------
    hits : Hits
        Output of :func:`sensors.synth.raycast.cast` for grid shape (H, W).
    dirs : ndarray, (H, W, 3)
        The unit ray directions that were cast (world frame).
    world : World
    tab : dict, optional
        Precomputed ``world.table()``.

    Returns
    -------
    label : ndarray, (H, W) uint8
        nuScenes-lidarseg index (0 = noise for sky rays).
    rgb : ndarray, (H, W, 3) float64
        Lambert-shaded colour in 0..255 (sky gradient for misses).
    intensity : ndarray, (H, W) float64
        Noise-free lidar reflectivity, 0 for misses; scaled by the incidence cosine.
    """
    tab = world.table() if tab is None else tab
    h, w = hits.prim.shape
    label = np.zeros((h, w), np.uint8)
    rgb = np.zeros((h, w, 3))
    inten = np.zeros((h, w))
    sky = hits.prim == SKY_ID
    elev = np.clip(dirs[..., 2], 0.0, 1.0)[..., None]
    horizon, zenith = np.array([206.0, 222.0, 240.0]), np.array([112.0, 160.0, 226.0])
    rgb[sky] = (horizon + (zenith - horizon) * np.minimum(elev * 1.6, 1.0))[sky]
    ground = hits.prim == GROUND_ID
    if ground.any():
        gl, gc, gi = _shade_ground(world.road, hits.local[ground])
        label[ground], rgb[ground], inten[ground] = gl, gc, gi
    obj = hits.prim > 0
    if obj.any():
        ids = hits.prim[obj]
        local = hits.local[obj]
        # Noise is seeded by the primitive's own position, so a surface looks the same from every view.
        oc, oi = _shade_objects(tab, ids, local + tab["center"][ids], local, hits.normal[obj])
        label[obj], rgb[obj], inten[obj] = tab["label"][ids], oc, oi
    hit = ~sky
    cos_sun = np.clip(hits.normal @ _SUN, 0.0, 1.0)
    rgb[hit] *= (_AMBIENT + (1 - _AMBIENT) * cos_sun[hit])[:, None]
    cos_inc = np.abs((hits.normal * dirs).sum(axis=-1))
    inten = inten * (0.4 + 0.6 * cos_inc)
    return label, rgb, inten
