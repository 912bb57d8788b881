"""Float64 rigid-body geometry that gives the same bits on every machine.

Why this module exists: numpy's ``@`` and ``np.linalg.inv`` call BLAS and LAPACK, and OpenBLAS chooses its
kernels at run time by CPU (``Haswell``, ``SkylakeX``, ... or whatever ``OPENBLAS_CORETYPE`` says) and by
thread count. The kernels sum in different orders and some fuse multiply-adds, so the same 4x4 product
differs in its last bits between an AVX2 and an AVX-512 machine. Those bits reached the shards through
``cams.json`` (``T_cam_lidar`` printed with ``repr``): the SLidR demo shards of one AMD EPYC machine hashed
differently under ``OPENBLAS_CORETYPE=Haswell`` and ``SkylakeX`` (docs/decisions.md, "Determinism").

Elementwise IEEE-754 operations (``+ - * / sqrt``) are correctly rounded on every platform numpy and
CPython run on, and numpy never fuses two ufunc calls into one FMA. So every function here is written as
elementwise operations in a fixed order: the results are identical on any machine, for any thread count.
They are slower than BLAS only for large matrices, which geometry never has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in float64, summed over the inner dimension left to right (no BLAS).

    Args:
        a: (..., n, k) array.
        b: (..., k, m) array; leading dimensions broadcast against ``a``'s.

    Returns:
        (..., n, m) float64: ``sum_j a[..., :, j] * b[..., j, :]``, added in the order j = 0, 1, ...
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not chain")
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for j in range(1, a.shape[-1]):
        out = out + a[..., :, j:j + 1] * b[..., j:j + 1, :]
    return out


def quaternion_matrix(q: Sequence[float]) -> np.ndarray:
    """3x3 float64 rotation matrix of a quaternion ``(w, x, y, z)`` (nuScenes' order), normalised first.

    The textbook formula for a unit quaternion in Python floats: it equals pyquaternion's
    ``Quaternion(q).rotation_matrix`` (the devkit's) to a few ulps, and has no BLAS call in it.

    Args:
        q: four floats; any non-zero norm.
    """
    w, x, y, z = (float(v) for v in q)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    if not n > 0.0:
        raise ValueError(f"quaternion {tuple(q)} has no direction (norm {n})")
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - w * z), 2.0 * (x * z + w * y)],
        [2.0 * (x * y + w * z), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - w * x)],
        [2.0 * (x * z - w * y), 2.0 * (y * z + w * x), 1.0 - 2.0 * (x * x + y * y)],
    ], dtype=np.float64)


def rigid_matrix(rotation: Sequence[float], translation: Sequence[float]) -> np.ndarray:
    """4x4 float64 homogeneous transform from a quaternion ``(w, x, y, z)`` and a translation (metres)."""
    T = np.eye(4)
    T[:3, :3] = quaternion_matrix(rotation)
    T[:3, 3] = np.asarray(translation, dtype=np.float64)
    return T


def rigid_inverse(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform as ``[R^T, -R^T t]`` (exact transpose, no LAPACK).

    Args:
        T: (4, 4) float64 with an orthonormal rotation block and last row (0, 0, 0, 1).
    """
    T = np.asarray(T, dtype=np.float64)
    inv = np.eye(4)
    Rt = T[:3, :3].T
    inv[:3, :3] = Rt
    inv[:3, 3:] = -matmul(Rt, T[:3, 3:])
    return inv
