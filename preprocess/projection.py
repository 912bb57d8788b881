"""Lidar -> camera projection for all cameras of a keyframe in one vectorised call.

The keep rule is SLidR's: depth > ``min_dist`` and 0 < u < W-1, 0 < v < H-1
(``border="devkit"`` gives nuscenes-devkit's 1 < u, 1 < v instead). Arithmetic is float64
on a composed 4x4 ``T_cam_lidar`` per camera, i.e. the devkit's chain computed exactly
rather than its float32 stepwise version (see docs/decisions.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDERS = {"slidr": 0.0, "devkit": 1.0}


@dataclass(frozen=True)
class Pairs:
    """Point-pixel correspondences, sorted by camera then point.

    ``index``: int32 (M, 4) ``[point_index, cam_index, row, col]`` with row/col the
    round-half-to-even of v/u; ``uvd``: float32 (M, 3) ``[u, v, depth]`` (pixels, metres).
    """

    index: np.ndarray
    uvd: np.ndarray


def project_points(
    points: np.ndarray,
    T_cam_lidar: np.ndarray,
    K: np.ndarray,
    image_size: np.ndarray,
    min_dist: float = 1.0,
    border: str = "slidr",
    backend: str = "numpy",
) -> Pairs:
    """Project lidar points into C cameras.

    :param points: (N, >=3) lidar-frame xyz in metres (extra columns ignored).
    :param T_cam_lidar: (C, 4, 4) homogeneous lidar -> camera transforms.
    :param K: (C, 3, 3) camera intrinsics in pixels.
    :param image_size: (C, 2) ``[width, height]`` in pixels.
    :param min_dist: minimum camera-frame depth in metres (strict ``>``).
    :param border: ``"slidr"`` (0 < u) or ``"devkit"`` (1 < u); upper bounds are W-1, H-1.
    :param backend: ``"numpy"`` (reference, float64) or ``"torch"`` (float64 on the current
        CUDA device if there is one, else CPU).
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {list(BORDERS)}, got {border!r}")
    T_cam_lidar = np.asarray(T_cam_lidar, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    image_size = np.asarray(image_size, dtype=np.float64)
    if T_cam_lidar.ndim != 3 or T_cam_lidar.shape[1:] != (4, 4):
        raise ValueError(f"T_cam_lidar must be (C, 4, 4), got {T_cam_lidar.shape}")
    if K.shape != (len(T_cam_lidar), 3, 3) or image_size.shape != (len(T_cam_lidar), 2):
        raise ValueError("K must be (C, 3, 3) and image_size (C, 2) for the same C")
    xyz = np.asarray(points)[:, :3].astype(np.float64)
    lo = BORDERS[border]
    if backend == "numpy":
        return _project_numpy(xyz, T_cam_lidar, K, image_size, min_dist, lo)
    if backend == "torch":
        return _project_torch(xyz, T_cam_lidar, K, image_size, min_dist, lo)
    raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")


def _project_numpy(xyz, T, K, size, min_dist, lo) -> Pairs:
    # (C, N, 3) camera-frame points: one batched matmul instead of a loop over cameras.
    cam = np.einsum("cij,nj->cni", T[:, :3, :3], xyz) + T[:, None, :3, 3]
    depth = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        pix = np.einsum("cij,cnj->cni", K, cam)
        u = pix[..., 0] / pix[..., 2]
        v = pix[..., 1] / pix[..., 2]
    W = size[:, 0:1]
    H = size[:, 1:2]
    keep = (depth > min_dist) & (u > lo) & (u < W - 1) & (v > lo) & (v < H - 1)
    cam_idx, pt_idx = np.nonzero(keep)  # C-major: sorted by camera, then point
    u_k, v_k, d_k = u[keep], v[keep], depth[keep]
    index = np.stack([pt_idx, cam_idx, np.rint(v_k), np.rint(u_k)], axis=1).astype(np.int32)
    uvd = np.stack([u_k, v_k, d_k], axis=1).astype(np.float32)
    return Pairs(index.reshape(-1, 4), uvd.reshape(-1, 3))


def _project_torch(xyz, T, K, size, min_dist, lo) -> Pairs:
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = torch.from_numpy(xyz).to(dev)
    Tt = torch.from_numpy(T).to(dev)
    Kt = torch.from_numpy(K).to(dev)
    st = torch.from_numpy(size).to(dev)
    cam = torch.einsum("cij,nj->cni", Tt[:, :3, :3], p) + Tt[:, None, :3, 3]
    pix = torch.einsum("cij,cnj->cni", Kt, cam)
    depth = cam[..., 2]
    u = pix[..., 0] / pix[..., 2]
    v = pix[..., 1] / pix[..., 2]
    keep = (depth > min_dist) & (u > lo) & (u < st[:, 0:1] - 1) & (v > lo) & (v < st[:, 1:2] - 1)
    cam_idx, pt_idx = torch.nonzero(keep, as_tuple=True)
    u_k, v_k, d_k = u[keep], v[keep], depth[keep]
    # torch.round is round-half-to-even, like np.rint
    index = torch.stack([pt_idx, cam_idx, torch.round(v_k).long(), torch.round(u_k).long()], 1)
    uvd = torch.stack([u_k, v_k, d_k], 1)
    return Pairs(index.int().cpu().numpy().reshape(-1, 4), uvd.float().cpu().numpy().reshape(-1, 3))
