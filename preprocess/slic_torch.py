"""SLIC superpixels in torch, batched, with the meaning of ``skimage.segmentation.slic``'s parameters.

The algorithm is scikit-image's (0.26, ``_slic.pyx``) step for step, on a batch of same-sized images:

1. ``img_as_float``, rescale each image to [0, 1] by its own min/max, ``rgb2lab`` (D65, 2 deg), then a
   Gaussian blur of ``sigma`` px (scipy's kernel: truncate 4, mode "reflect" = half-sample symmetric),
   then colours divided by ``compactness``.
2. Seeds on skimage's ``regular_grid`` (same positions, same ``step``), seed colours 0 (as skimage: the first
   assignment is therefore purely spatial).
3. ``max_num_iter`` rounds: every pixel takes the seed of least
   ``((dy^2 + dx^2) / step^2 + |colour - seed colour|^2)`` among the seeds whose window
   (``+-2`` grid steps around the seed, truncated as skimage truncates it) contains it; ties go to the lowest seed
   index; a pixel in no window keeps its label. Then every seed moves to the mean of its pixels; a seed left
   with no pixel is dead (skimage's NaN seed, which never wins again).
4. ``enforce_connectivity``: 4-connected components, components over ``max_size_factor`` x the nominal
   segment size split, components under ``min_size_factor`` x merged into an earlier adjacent one (see
   :func:`enforce_connectivity` for where this differs from skimage's sequential scan).

What differs from skimage, and why (docs/superpixels.md has the measured effect):

* Arithmetic is float32 (skimage: float64); colours are quantised to ``2**-Q`` (Q <= 16) so that seed sums
  are exact integers (see below).
* The connectivity pass is a parallel form of skimage's sequential flood fill (:func:`enforce_connectivity`).
* Nothing else: the candidate seeds of a pixel are exactly those whose window holds it (found per block of
  pixels, :func:`candidates`), and the windows use skimage's two grid steps (:func:`slic_grid`).

Determinism: the same input on the same device type gives identical labels. Seed sums are integer
(``index_add_`` on int64, exact in any order, so CUDA's atomics cannot change them); the blur is a fixed
sequence of elementwise adds (no cuDNN algorithm choice, no thread-count-dependent reduction); connected
components use min-label propagation (``scatter_reduce`` "amin", order-independent) and ``cumsum``.

On CUDA the assignment step runs as one fused Triton kernel when Triton imports
(:mod:`distillkit.preprocess.slic_triton`); everything else is plain torch and runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65_2DEG = (0.95047, 1.0, 1.08883)


@dataclass(frozen=True)
class Grid:
    """Seed grid of an image: ``ny x nx`` seeds at ``(y0 + i*sy, x0 + j*sx)``; seed ``k = i*nx + j``.

    ``step`` is skimage's ``max(steps)`` (the spatial normaliser); a seed's search window is ``+-2 wy`` rows
    and ``+-2 wx`` columns around it; ``nby x nbx`` blocks of ``sy x sx`` px tile the image (the unit of
    work: all pixels of a block share one candidate list).
    """

    height: int
    width: int
    y0: int
    x0: int
    sy: int
    sx: int
    ny: int
    nx: int
    step: float
    wy: int
    wx: int

    @property
    def n(self) -> int:
        return self.ny * self.nx

    @property
    def nby(self) -> int:
        return -(-self.height // self.sy)

    @property
    def nbx(self) -> int:
        return -(-self.width // self.sx)


def _regular_grid(height: int, width: int, n_points: int) -> tuple[list[int], list[int]]:
    """Starts and steps of ``skimage.util.regular_grid((1, height, width), n_points)`` (z, y, x), line for
    line: dimensions too short for a full step are dropped."""
    shape = np.array([1, height, width])
    if float(shape.prod()) <= n_points:
        return [0, 0, 0], [1, 1, 1]
    unsort = np.argsort(np.argsort(shape))
    dims = np.sort(shape)
    n_dim = len(dims)
    size = float(np.prod(shape))
    st = np.full(n_dim, (size / n_points) ** (1.0 / n_dim), dtype="float64")
    if (dims < st).any():
        for d in range(n_dim):
            st[d] = dims[d]
            size = float(np.prod(dims[d + 1:]))
            st[d + 1:] = (size / n_points) ** (1.0 / (n_dim - d - 1))
            if (dims >= st).all():
                break
    starts = (st // 2).astype(int)
    steps = np.round(st).astype(int)
    return [int(starts[i]) for i in unsort], [int(steps[i]) for i in unsort]


def slic_grid(height: int, width: int, n_segments: int) -> Grid:
    """skimage's seed grid for an (height, width) image.

    Seeds sit on ``regular_grid((1, H, W), n_segments)``; the spatial normaliser is the largest of its
    steps. The search windows use the steps of ``regular_grid`` for the number of seeds actually placed
    (skimage's ``_slic_cython`` calls it again with ``segments.shape[0]``): 100 px instead of 98 for a
    1600 x 900 image and 150 segments (144 seeds).

    Args:
        height: image rows.
        width: image columns.
        n_segments: requested number of seeds (skimage's ``n_segments``).
    """
    starts, steps = _regular_grid(height, width, n_segments)
    y0, x0, sy, sx = starts[1], starts[2], max(steps[1], 1), max(steps[2], 1)
    ny, nx = len(range(y0, height, sy)), len(range(x0, width, sx))
    _, wsteps = _regular_grid(height, width, ny * nx)
    return Grid(height, width, y0, x0, sy, sx, ny, nx, float(max(steps)), max(wsteps[1], 1), max(wsteps[2], 1))


def _lut(images: torch.Tensor, convert2lab: bool) -> torch.Tensor:
    """(B, 256) float32: per image, uint8 level -> rescaled (and, for Lab, linearised) value.

    Computed in float64 on the CPU whatever the device, so both devices start from identical numbers.
    """
    flat = images.reshape(images.shape[0], -1)
    lo = flat.amin(1).double().cpu() / 255.0
    hi = flat.amax(1).double().cpu() / 255.0
    u = torch.arange(256, dtype=torch.float64) / 255.0
    v = u[None, :] - lo[:, None]
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    v = v / span[:, None]
    if convert2lab:
        v = torch.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)
    return v.float()


def colour_features(images: torch.Tensor, convert2lab: bool = True) -> torch.Tensor:
    """Planar float32 colour features before smoothing: CIE Lab (D65, 2 deg) like ``skimage.color.rgb2lab``
    of the min/max-rescaled image, or the rescaled RGB itself.

    Args:
        images: (B, H, W, 3) uint8 RGB on any device.
        convert2lab: Lab (skimage's default for RGB) or rescaled RGB.

    Returns:
        (B, 3, H, W) float32 on ``images.device``.
    """
    lut = _lut(images, convert2lab).to(images.device)
    b = images.shape[0]
    idx = images.permute(0, 3, 1, 2).reshape(b, -1).long()
    lin = torch.gather(lut, 1, idx).view(b, 3, *images.shape[1:3])
    if not convert2lab:
        return lin
    r, g, bl = lin[:, 0], lin[:, 1], lin[:, 2]
    f = []
    for row, white in zip(_XYZ_FROM_RGB, _D65_2DEG, strict=True):
        t = (row[0] * r + row[1] * g + row[2] * bl) / white
        f.append(torch.where(t > 0.008856, t.clamp(min=0.008856) ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0))
    fx, fy, fz = f
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by ``pad`` on each side, half-sample symmetric (scipy "reflect")."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over the last two axes (truncate 4.0, mode "reflect"), float32.

    A fixed sequence of elementwise multiply-adds over shifted views (symmetric taps paired), so every
    output element is computed the same way on every device and thread count.

    Args:
        x: (..., H, W) float32.
        sigma: standard deviation in pixels; 0 returns ``x`` unchanged.
    """
    if sigma <= 0:
        return x
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / sigma**2 * t**2)
    w = (w / w.sum()).astype(np.float32)
    for dim in (-2, -1):
        n = x.shape[dim]
        xp = x.index_select(dim, _symmetric_index(n, radius, x.device))
        out = xp.narrow(dim, radius, n) * float(w[radius])
        for i in range(1, radius + 1):
            out = out + (xp.narrow(dim, radius + i, n) + xp.narrow(dim, radius - i, n)) * float(w[radius + i])
        x = out
    return x


def _quant_bits(compactness: float, convert2lab: bool) -> int:
    """Fractional bits Q of the fixed-point colours: as many as keep |colour| * 2**Q below 2**24, so that the
    float32 features made from them (``q * 2**-Q``) are exactly the values the integer seed sums add up."""
    bound = (135.0 if convert2lab else 1.0) / compactness
    return int(max(0, min(16, math.floor(math.log2(2.0**24 / bound)))))


@dataclass
class Seeds:
    """Seed state of a batch: positions (B, K, 2) y/x and colours (B, K, 3), float64; ``alive`` (B, K)."""

    pos: torch.Tensor
    col: torch.Tensor
    alive: torch.Tensor

    def windows(self, grid: Grid) -> torch.Tensor:
        """(B, K, 4) int32 ``[ylo, yhi, xlo, xhi)`` exactly as skimage truncates them; empty for dead seeds."""
        cy, cx = self.pos[..., 0], self.pos[..., 1]
        ylo = torch.clamp(cy - 2 * grid.wy, min=0).floor()
        yhi = torch.clamp(cy + 2 * grid.wy + 1, max=grid.height).floor()
        xlo = torch.clamp(cx - 2 * grid.wx, min=0).floor()
        xhi = torch.clamp(cx + 2 * grid.wx + 1, max=grid.width).floor()
        win = torch.stack([ylo, yhi, xlo, xhi], -1)
        win = torch.where(self.alive[..., None], win, torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=win.dtype,
                                                                   device=win.device))
        return win.to(torch.int32)


def candidates(seeds: Seeds, grid: Grid) -> torch.Tensor:
    """Per block, the seeds whose search window overlaps it, in increasing seed order.

    Every pixel's candidates are a subset of its block's (the window test per pixel does the rest), so
    the assignment is skimage's exactly: no seed whose window holds a pixel is missed however far it has
    drifted. The width C is the largest count over the batch's blocks (about 30 for skimage's windows).

    Args:
        seeds: current seeds (dead seeds have empty windows and are never candidates).
        grid: the seed grid.

    Returns:
        (B, nby, nbx, C) int64 seed indices, padded with ``K`` (a seed with an empty window).
    """
    win = seeds.windows(grid)  # (B, K, 4)
    dev = win.device
    k_n = win.shape[1]
    y0 = torch.arange(grid.nby, device=dev) * grid.sy
    x0 = torch.arange(grid.nbx, device=dev) * grid.sx
    y1 = torch.clamp(y0 + grid.sy, max=grid.height)
    x1 = torch.clamp(x0 + grid.sx, max=grid.width)
    iy = (win[:, None, :, 0] < y1[None, :, None]) & (win[:, None, :, 1] > y0[None, :, None])  # (B, nby, K)
    ix = (win[:, None, :, 2] < x1[None, :, None]) & (win[:, None, :, 3] > x0[None, :, None])  # (B, nbx, K)
    hit = iy[:, :, None, :] & ix[:, None, :, :]  # (B, nby, nbx, K)
    count = hit.sum(-1)
    c = max(int(count.max()), 1)
    order = torch.sort((~hit).to(torch.uint8), dim=-1, stable=True).indices[..., :c]  # hits first, by index
    return torch.where(torch.arange(c, device=dev) < count[..., None], order, torch.full_like(order, k_n))


def seed_tables(seeds: Seeds, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed data padded with one empty-window seed at index K: (B, K+1, 5) float32 ``[y, x, c0, c1, c2]``
    and (B, K+1, 4) int32 windows."""
    b = seeds.pos.shape[0]
    data = torch.cat([seeds.pos, seeds.col], -1).float()
    data = torch.cat([data, torch.zeros(b, 1, 5, dtype=data.dtype, device=data.device)], 1)
    win = seeds.windows(grid)
    empty = torch.tensor([[[1, 0, 1, 0]]], dtype=win.dtype, device=win.device).expand(b, 1, 4)
    return data.contiguous(), torch.cat([win, empty], 1).contiguous()


def to_blocks(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, nby, nbx, sy*sx): zero-padded to whole blocks, each block's pixels contiguous."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (0, grid.nbx * grid.sx - w, 0, grid.nby * grid.sy - h))
    xp = xp.view(b, c, grid.nby, grid.sy, grid.nbx, grid.sx).permute(0, 1, 2, 4, 3, 5)
    return xp.reshape(b, c, grid.nby, grid.nbx, grid.sy * grid.sx)


def from_blocks(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`to_blocks` for one channel: (B, nby, nbx, sy*sx) -> (B, H, W)."""
    b = x.shape[0]
    x = x.view(b, grid.nby, grid.nbx, grid.sy, grid.sx).permute(0, 1, 3, 2, 4)
    return x.reshape(b, grid.nby * grid.sy, grid.nbx * grid.sx)[:, :grid.height, :grid.width]


def assign_torch(feat: torch.Tensor, seeds: Seeds, grid: Grid, prev: torch.Tensor) -> torch.Tensor:
    """One SLIC assignment in plain torch, block by block: every pixel of a block has the same candidate
    seeds (:func:`candidates`), so per candidate the seed's numbers are one value per block broadcast over
    the block's pixels.

    Args:
        feat: (B, 3, H, W) float32 colour features (already divided by compactness).
        seeds: current seeds.
        grid: the seed grid.
        prev: (B, H, W) int32 labels of the previous round (kept where no window covers a pixel).

    Returns:
        (B, H, W) int32 seed index per pixel.
    """
    b = feat.shape[0]
    dev = feat.device
    fb = to_blocks(feat, grid)  # (B, 3, nby, nbx, P)
    yx = torch.stack(torch.meshgrid(torch.arange(grid.nby * grid.sy, device=dev),
                                    torch.arange(grid.nbx * grid.sx, device=dev), indexing="ij"))
    yb, xb = to_blocks(yx[None].to(torch.int32), grid)[0]  # (nby, nbx, P) pixel rows / columns
    yf, xf = yb.float(), xb.float()
    cand = candidates(seeds, grid)  # (B, nby, nbx, C)
    data, win = seed_tables(seeds, grid)
    bi = torch.arange(b, device=dev)[:, None, None]
    sw = 1.0 / (grid.step * grid.step)
    best = torch.full(fb.shape[:1] + fb.shape[2:], float("inf"), device=dev)
    best_k = torch.full(best.shape, -1, dtype=torch.int32, device=dev)
    for j in range(cand.shape[-1]):
        k = cand[..., j]  # (B, nby, nbx)
        sd, wk = data[bi, k][..., None, :], win[bi, k][..., None, :]  # (B, nby, nbx, 1, 5|4)
        in_win = (yb >= wk[..., 0]) & (yb < wk[..., 1]) & (xb >= wk[..., 2]) & (xb < wk[..., 3])
        dy = sd[..., 0] - yf
        dx = sd[..., 1] - xf
        dist = (dy * dy + dx * dx) * sw
        t0 = fb[:, 0] - sd[..., 2]
        t1 = fb[:, 1] - sd[..., 3]
        t2 = fb[:, 2] - sd[..., 4]
        dist = dist + (t0 * t0 + t1 * t1 + t2 * t2)
        upd = in_win & (dist < best)
        best = torch.where(upd, dist, best)
        best_k = torch.where(upd, k.to(torch.int32)[..., None], best_k)
    lab = from_blocks(best_k, grid)
    return torch.where(lab >= 0, lab, prev)


def _pixel_table(q: torch.Tensor) -> torch.Tensor:
    """(B*H*W, 6) int64 ``[1, y, x, q0, q1, q2]`` per pixel: what a seed sums over its pixels."""
    b, _, h, w = q.shape
    dev = q.device
    yy = torch.arange(h, device=dev).view(1, h, 1).expand(b, h, w)
    xx = torch.arange(w, device=dev).view(1, 1, w).expand(b, h, w)
    cols = [torch.ones_like(yy), yy, xx, q[:, 0].long(), q[:, 1].long(), q[:, 2].long()]
    return torch.stack([c.reshape(-1) for c in cols], 1)


def seeds_from_sums(sums: torch.Tensor, qbits: int) -> Seeds:
    """Seeds at the mean of their pixels from exact integer sums (B, K, 6) ``[n, sum y, sum x, sum q0..2]``."""
    n = sums[..., 0]
    alive = n > 0
    nd = n.clamp(min=1).double()[..., None]
    pos = sums[..., 1:3].double() / nd
    col = sums[..., 3:6].double() * 2.0**-qbits / nd
    return Seeds(pos, col, alive)


def initial_seeds(grid: Grid, batch: int, device: torch.device) -> Seeds:
    """Seeds on the grid with colour 0 (skimage's initial segments), all alive."""
    ys = grid.y0 + grid.sy * torch.arange(grid.ny, dtype=torch.float64, device=device)
    xs = grid.x0 + grid.sx * torch.arange(grid.nx, dtype=torch.float64, device=device)
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(1, -1, 2).expand(batch, -1, -1)
    col = torch.zeros(batch, grid.n, 3, dtype=torch.float64, device=device)
    return Seeds(pos.contiguous(), col, torch.ones(batch, grid.n, dtype=torch.bool, device=device))


# ---- connectivity ------------------------------------------------------------------------------------------


def _neighbour_pairs(b: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (p, q) of every right and down 4-neighbour pair of a batch of (h, w) images."""
    idx = torch.arange(b * h * w, device=device).view(b, h, w)
    p = torch.cat([idx[:, :, :-1].reshape(-1), idx[:, :-1, :].reshape(-1)])
    q = torch.cat([idx[:, :, 1:].reshape(-1), idx[:, 1:, :].reshape(-1)])
    return p, q


def _shortcut(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every node points at its root."""
    while True:
        gp = parent[parent]
        if torch.equal(gp, parent):
            return parent
        parent = gp


def connected_components(key: torch.Tensor) -> torch.Tensor:
    """4-connected components of equal ``key`` in each image of a batch.

    Hook-and-shortcut (the larger of two adjacent roots points to the smaller, ``scatter_reduce`` "amin",
    then pointer jumping): every round at least halves the number of trees, and min is order-independent,
    so the result is deterministic on CUDA too.

    Args:
        key: (B, H, W) integer labels; components never cross image boundaries.

    Returns:
        (B*H*W,) int64: per pixel, the flat index of its component's first pixel in raster order.
    """
    b, h, w = key.shape
    p, q = _neighbour_pairs(b, h, w, key.device)
    flat = key.reshape(-1)
    same = flat[p] == flat[q]
    p, q = p[same], q[same]
    parent = torch.arange(flat.numel(), device=key.device)
    while p.numel():
        rp, rq = parent[p], parent[q]
        diff = rp != rq
        p, q, rp, rq = p[diff], q[diff], rp[diff], rq[diff]
        if not p.numel():
            break
        parent.scatter_reduce_(0, torch.maximum(rp, rq), torch.minimum(rp, rq), reduce="amin")
        parent = _shortcut(parent)
    return parent


def _flood_rings(root: torch.Tensor, member: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Breadth-first ring of every pixel flagged in ``member``: its 4-connected geodesic distance, inside
    its component, from the component's first pixel (its root); 0 for other pixels.

    A frontier-by-frontier flood of all flagged components at once: each round touches only the newest
    ring, so the work is linear in the flagged pixels, in as many rounds as the longest distance.

    Args:
        root: (B*H*W,) component root per pixel (the first pixel's flat index).
        member: (B*H*W,) bool, the pixels whose ring is wanted (whole components).
        b, h, w: batch shape.
    """
    n = root.numel()
    dev = root.device
    ring = torch.zeros(n, dtype=torch.int64, device=dev)
    frontier = torch.nonzero(member & (root == torch.arange(n, device=dev))).squeeze(1)
    seen = ~member  # pixels outside the flagged components are never entered
    seen[frontier] = True
    owner = torch.empty(n, dtype=torch.int64, device=dev)
    d = 0
    while frontier.numel():
        d += 1
        col, row = frontier % w, (frontier // w) % h
        steps = []
        for off, ok in ((1, col < w - 1), (-1, col > 0), (w, row < h - 1), (-w, row > 0)):
            q = (frontier + off)[ok]
            steps.append(q[root[q] == root[frontier[ok]]])
        q = torch.cat(steps)
        q = q[~seen[q]]
        # one entry per pixel: the position that wrote last owns it (which one does not matter)
        owner[q] = torch.arange(q.numel(), device=dev)
        q = q[owner[q] == torch.arange(q.numel(), device=dev)]
        seen[q] = True
        ring[q] = d
        frontier = q
    return ring


def _merge_targets(root: torch.Tensor, small: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """For every component root, the root it merges into (itself if it stays).

    skimage floods a small component breadth-first from its first pixel, checking each pixel's neighbours
    right, left, down, up, and merges it into the earlier component it met last. In parallel form: among
    the edges from the small component to earlier components, take the one whose inner pixel is in the
    flood's last ring (:func:`_flood_rings`), the latest in raster order within it (the order in which a
    breadth-first flood from the top-left visits a ring), then the latest direction in skimage's order.
    Targets are always earlier, so chains end; they are followed to their ends. The only component with
    no earlier neighbour is the one holding an image's first pixel; if it is small it goes the same way
    to any neighbour, after the chains are resolved.
    """
    n = root.numel()
    dev = root.device
    target = torch.arange(n, device=dev)
    p, q = _neighbour_pairs(b, h, w, dev)
    rank = torch.cat([torch.zeros(b * h * (w - 1), dtype=torch.int64, device=dev),
                      torch.full((b * (h - 1) * w,), 2, dtype=torch.int64, device=dev)])
    ra, rq = root[p], root[q]
    d = ra != rq
    # both sides of every edge between two components: (inner pixel, its component, the other component,
    # direction from the inner pixel: 0 right, 1 left, 2 down, 3 up)
    px = torch.cat([p[d], q[d]])
    a = torch.cat([ra[d], rq[d]])
    c = torch.cat([rq[d], ra[d]])
    r = torch.cat([rank[d], rank[d] + 1])
    keep = small[a]
    px, a, c, r = px[keep], a[keep], c[keep], r[keep]
    if not a.numel():
        return target
    ring = _flood_rings(root, small[root], b, h, w)[px]
    key = (ring * n + px) * 4 + r
    hw = h * w
    first_px = (a % hw) == 0

    def last_met(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aa, cc, kk = a[sel], c[sel], key[sel]
        best = torch.full((n,), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, aa, kk, reduce="amax")
        win = kk == best[aa]  # keys are unique per edge side, so one winner per component
        return aa[win], cc[win]

    ea, ec = last_met((c < a) & ~first_px)
    target[ea] = ec
    target = _shortcut(target)
    fa, fc = last_met(first_px)
    if fa.numel():
        dest = target[fc]
        moved = dest != fa
        fa, dest = fa[moved], dest[moved]
        if fa.numel():
            remap = torch.arange(n, device=dev)
            remap[fa] = dest
            target = remap[target]
    return target


def enforce_connectivity(labels: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """Connected superpixels: skimage's ``_enforce_label_connectivity_cython`` rule in parallel form.

    Each 4-connected component of a label becomes a segment. A component larger than ``max_size`` is cut
    along a grid of square tiles of ``floor(sqrt(max_size))`` px (skimage cuts it where its breadth-first
    search reaches ``max_size`` pixels; both bound the size, the shapes of the pieces differ). A segment
    smaller than ``min_size`` joins the adjacent earlier segment skimage's breadth-first flood met last, in
    parallel form (``_merge_targets``: the last ring of the flood; docs/superpixels.md). skimage gives a small
    first segment (the one holding the top-left pixel, which has no earlier neighbour) the number of the next
    segment, which may not touch it; here it joins a neighbour by the same rule.

    Args:
        labels: (B, H, W) integer labels.
        min_size: segments below this many pixels are merged.
        max_size: components above this many pixels are cut.

    Returns:
        (B, H, W) int32, per image contiguous from 0 in raster order of each segment's first pixel, every
        label 4-connected.
    """
    b, h, w = labels.shape
    dev = labels.device
    key = labels.long()
    root = connected_components(key)
    size = torch.bincount(root, minlength=root.numel())
    over = size[root] > max_size
    if bool(over.any()):
        tile = max(1, math.isqrt(max(max_size, 1)))
        ntx = -(-w // tile)
        ty = torch.arange(h, device=dev).view(1, h, 1) // tile
        tx = torch.arange(w, device=dev).view(1, 1, w) // tile
        tid = (ty * ntx + tx + 1).expand(b, h, w)
        n_tiles = (-(-h // tile)) * ntx
        key = key * (n_tiles + 1) + torch.where(over.view(b, h, w), tid, torch.zeros_like(tid))
        root = connected_components(key)
        size = torch.bincount(root, minlength=root.numel())
    for _ in range(3):
        is_root = root == torch.arange(root.numel(), device=dev)
        small = is_root & (size < min_size)
        if not bool(small.any()):
            break
        root = _merge_targets(root, small, b, h, w)[root]
        # A small first segment may have been joined only by small neighbours (whose chains led into it):
        # number the merged regions afresh and let it merge again, as a whole.
        root = connected_components(root.view(b, h, w))
        size = torch.bincount(root, minlength=root.numel())
        if int(size[root].min()) >= min_size:
            break
    return rank_labels(root, b, h * w).view(b, h, w)


def rank_labels(region: torch.Tensor, b: int, hw: int) -> torch.Tensor:
    """Per image, number the distinct values of ``region`` (flat indices into the batch) 0.. in increasing
    order: (B*HW,) -> (B, H*W) int32 (reshape to the image)."""
    present = torch.zeros(b * hw, dtype=torch.bool, device=region.device)
    present[region] = True
    rank = present.view(b, hw).cumsum(1).view(-1) - 1
    return rank[region].view(b, hw).to(torch.int32)


# ---- driver ------------------------------------------------------------------------------------------------


def slic_torch(
    images: torch.Tensor,
    n_segments: int = 100,
    compactness: float = 10.0,
    max_num_iter: int = 10,
    sigma: float = 0.0,
    convert2lab: bool = True,
    enforce_connectivity_: bool = True,
    min_size_factor: float = 0.5,
    max_size_factor: float = 3.0,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """SLIC of a batch of same-sized RGB images on ``images.device``.

    Args:
        images: (B, H, W, 3) uint8 RGB.
        n_segments: approximate number of superpixels per image (seed grid as skimage).
        compactness: colour/space balance; colours are divided by it (skimage's ``1/ratio``).
        max_num_iter: assignment rounds (skimage never stops early: every round reassigns pixels).
        sigma: Gaussian pre-smoothing in pixels, on the Lab image (as skimage).
        convert2lab: cluster in CIE Lab (skimage's default for RGB) rather than rescaled RGB.
        enforce_connectivity_: make every superpixel 4-connected (:func:`enforce_connectivity`).
        min_size_factor: merge segments under this fraction of ``H*W / n_seeds`` pixels.
        max_size_factor: cut components over this multiple of ``H*W / n_seeds`` pixels.
        use_triton: fused Triton assignment; ``None`` = on CUDA when Triton imports.

    Returns:
        (B, H, W) int32 labels on ``images.device``, per image contiguous from 0.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
    if compactness <= 0 or n_segments < 1 or max_num_iter < 1 or sigma < 0:
        raise ValueError("need compactness > 0, n_segments >= 1, max_num_iter >= 1, sigma >= 0")
    b, h, w, _ = images.shape
    dev = images.device
    grid = slic_grid(h, w, n_segments)
    qbits = _quant_bits(compactness, convert2lab)
    feat = gaussian_blur(colour_features(images, convert2lab), sigma) / compactness
    q = torch.round(feat * 2.0**qbits).to(torch.int32)
    feat = q.float() * 2.0**-qbits  # the exact values the seed sums are made of
    if use_triton is None:
        from distillkit.preprocess.slic_triton import triton_available

        use_triton = dev.type == "cuda" and triton_available()
    elif use_triton and dev.type != "cuda":
        raise ValueError(f"use_triton=True needs CUDA tensors, got {dev.type}")
    table = None if use_triton else _pixel_table(q)
    seeds = initial_seeds(grid, b, dev)
    labels = torch.zeros(b, h, w, dtype=torch.int32, device=dev)
    offset = (torch.arange(b, device=dev) * grid.n).view(b, 1, 1)
    for it in range(max_num_iter):
        last = it == max_num_iter - 1
        if use_triton:
            from distillkit.preprocess.slic_triton import assign_and_sum

            labels, sums = assign_and_sum(q, qbits, seeds, grid, labels, need_sums=not last)
        else:
            labels = assign_torch(feat, seeds, grid, labels)
            sums = None
            if not last:
                gl = (labels.long() + offset).reshape(-1)
                sums = torch.zeros(b * grid.n, 6, dtype=torch.int64, device=dev).index_add_(0, gl, table)
        if not last:
            seeds = seeds_from_sums(sums.view(b, grid.n, 6), qbits)
    if enforce_connectivity_:
        seg = h * w / grid.n
        return enforce_connectivity(labels, int(min_size_factor * seg), int(max_size_factor * seg))
    # numbered within each image's own slice of the flat index space, so ranks restart at 0 per image
    flat = (labels.long() + (torch.arange(b, device=dev) * (h * w)).view(b, 1, 1)).reshape(-1)
    return rank_labels(flat, b, h * w).view(b, h, w)
