"""Lidar -> camera projection for all cameras of a keyframe in one vectorised call.

The keep rule is SLidR's: depth > ``min_dist`` and 0 < u < W-1, 0 < v < H-1
(``border="devkit"`` gives nuscenes-devkit's 1 < u, 1 < v instead). Arithmetic is float64
on the composed ``K @ T_cam_lidar`` per camera, i.e. the devkit's chain computed exactly
rather than its float32 stepwise version (see docs/decisions.md). The numpy path uses no BLAS,
so it gives the same bits on every CPU (``sensors/geometry.py``); the torch path does not promise that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distillkit.sensors.geometry import matmul

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


def _camera_matrices(T: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(C, 3, 4) float64 ``K @ T[:3]``: one matrix maps homogeneous lidar points to
    ``[u*d, v*d, d]``. K's last row is (0, 0, 1), so the third output is the camera-frame
    depth itself."""
    return matmul(K, T[:, :3, :])


def _finish(cam_idx: np.ndarray, pt_idx: np.ndarray, uvd: np.ndarray) -> Pairs:
    index = np.stack([pt_idx, cam_idx, np.rint(uvd[:, 1]), np.rint(uvd[:, 0])], axis=1).astype(np.int32)
    return Pairs(index.reshape(-1, 4), uvd.astype(np.float32).reshape(-1, 3))


def _project_numpy(xyz, T, K, size, min_dist, lo) -> Pairs:
    # Every camera at once, as elementwise products summed in a fixed order (x, y, z, then the
    # translation column) instead of a GEMM: BLAS kernels round differently per CPU, and a point
    # whose u lands within an ulp of a pixel border would change pairs.npy between machines
    # (sensors/geometry.py). About 2x slower than the GEMM, still a few ms per keyframe.
    P = _camera_matrices(T, K)[None]  # (1, C, 3, 4)
    x, y, z = (xyz[:, i, None, None] for i in range(3))
    pix = x * P[..., 0] + y * P[..., 1] + z * P[..., 2] + P[..., 3]  # (N, C, [u*d, v*d, d])
    # Divide only for points in front of each camera (about a third of all point-camera
    # combinations on a 360-degree rig); nonzero on the (C, N) view keeps camera-major order.
    cam_idx, pt_idx = np.nonzero(pix[:, :, 2].T > min_dist)
    sel = pix[pt_idx, cam_idx]
    u = sel[:, 0] / sel[:, 2]
    v = sel[:, 1] / sel[:, 2]
    keep = (u > lo) & (u < size[cam_idx, 0] - 1) & (v > lo) & (v < size[cam_idx, 1] - 1)
    return _finish(cam_idx[keep], pt_idx[keep], np.stack([u[keep], v[keep], sel[keep, 2]], axis=1))


def _project_torch(xyz, T, K, size, min_dist, lo) -> Pairs:
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    P = torch.from_numpy(_camera_matrices(T, K)).to(dev)
    p = torch.from_numpy(xyz).to(dev)
    pix = torch.einsum("cij,nj->cni", P[:, :, :3], p) + P[:, None, :, 3]
    depth = pix[..., 2]
    u = pix[..., 0] / depth
    v = pix[..., 1] / depth
    st = torch.from_numpy(size).to(dev)
    keep = (depth > min_dist) & (u > lo) & (u < st[:, 0:1] - 1) & (v > lo) & (v < st[:, 1:2] - 1)
    cam_idx, pt_idx = torch.nonzero(keep, as_tuple=True)  # camera-major, like numpy
    uvd = torch.stack([u[keep], v[keep], depth[keep]], 1)
    return _finish(cam_idx.cpu().numpy(), pt_idx.cpu().numpy(), uvd.cpu().numpy())
