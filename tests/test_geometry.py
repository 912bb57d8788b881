"""sensors/geometry.py: BLAS-free float64 geometry equals numpy's and the devkit's up to rounding."""

from __future__ import annotations

import numpy as np
import pytest
from pyquaternion import Quaternion

from distillkit.sensors.geometry import matmul, quaternion_matrix, rigid_inverse, rigid_matrix


def test_matmul_matches_numpy_and_sums_left_to_right():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3, 4)), rng.normal(size=(4, 2))
    np.testing.assert_allclose(matmul(a, b), a @ b, rtol=1e-13, atol=1e-13)
    # the order is fixed: (1e16 + 1) - 1e16 is 0 in float64 left to right, 1 in another order
    assert matmul(np.array([[1e16, 1.0, -1e16]]), np.ones((3, 1)))[0, 0] == 0.0
    with pytest.raises(ValueError, match="do not chain"):
        matmul(a, b.T)


def test_quaternion_matrix_matches_pyquaternion():
    rng = np.random.default_rng(1)
    for q in rng.normal(size=(50, 4)):
        np.testing.assert_allclose(quaternion_matrix(q), Quaternion(q).rotation_matrix, atol=2e-15)
    with pytest.raises(ValueError, match="no direction"):
        quaternion_matrix([0, 0, 0, 0])


def test_rigid_inverse_inverts():
    T = rigid_matrix([0.3, -0.2, 0.9, 0.1], [1.5, -20.0, 3.25])
    np.testing.assert_allclose(matmul(rigid_inverse(T), T), np.eye(4), atol=1e-14)
    np.testing.assert_allclose(rigid_inverse(T), np.linalg.inv(T), atol=1e-13)
