"""Projection against nuscenes-devkit's own chain on synthetic nuScenes."""

from __future__ import annotations

import numpy as np
import pytest

from distillkit.preprocess.projection import project_points
from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes, read_lidar_bin


@pytest.fixture(scope="module")
def devkit(synth_nuscenes):
    from nuscenes.nuscenes import NuScenesExplorer

    nusc = load_nuscenes(synth_nuscenes, "v1.0-mini")
    refs, rejected = plan_keyframes(nusc)
    assert not rejected and len(refs) >= 2
    return NuScenesExplorer(nusc), refs


def _ours(kf, border="devkit", backend="numpy"):
    pts = read_lidar_bin(kf.lidar_path)
    return project_points(pts, np.array([c.T_cam_lidar for c in kf.cameras]), np.array([c.K for c in kf.cameras]),
                          np.array([[c.width, c.height] for c in kf.cameras]), border=border, backend=backend)


def test_matches_devkit_chain_in_float64(devkit, monkeypatch):
    """Same points on the same pixels as map_pointcloud_to_image (devkit border rule) when
    the devkit's stepwise chain runs in float64: within 1e-3 px."""
    from nuscenes.utils.data_classes import LidarPointCloud

    original = LidarPointCloud.from_file.__func__

    def from_file_f64(cls, path):
        pc = original(cls, path)
        pc.points = pc.points.astype(np.float64)
        return pc

    monkeypatch.setattr(LidarPointCloud, "from_file", classmethod(from_file_f64))
    explorer, refs = devkit
    checked = 0
    for kf in refs[:3]:
        ours = _ours(kf)
        for i, cam in enumerate(kf.cameras):
            uv_dev, depth_dev, _ = explorer.map_pointcloud_to_image(kf.lidar_token, cam.sample_data_token)
            sel = ours.index[:, 1] == i
            assert sel.sum() == uv_dev.shape[1], cam.channel
            np.testing.assert_allclose(ours.uvd[sel, :2], uv_dev[:2].T, atol=1e-3, rtol=0)
            np.testing.assert_allclose(ours.uvd[sel, 2], depth_dev, atol=1e-4, rtol=0)
            checked += int(sel.sum())
    assert checked > 1000  # the synthetic scene really puts points in the cameras


def test_close_to_devkit_float32(devkit):
    """The devkit as shipped computes in float32: the same pixels up to float32 rounding."""
    explorer, refs = devkit
    kf = refs[0]
    ours = _ours(kf)
    for i, cam in enumerate(kf.cameras):
        uv_dev, _, _ = explorer.map_pointcloud_to_image(kf.lidar_token, cam.sample_data_token)
        sel = ours.index[:, 1] == i
        assert abs(int(sel.sum()) - uv_dev.shape[1]) <= max(2, 0.002 * uv_dev.shape[1])
        if sel.sum() == uv_dev.shape[1]:
            assert np.abs(ours.uvd[sel, :2] - uv_dev[:2].T).max() < 0.05


def test_slidr_border_keeps_extra_band(devkit):
    _, refs = devkit
    slidr, dev = _ours(refs[0], "slidr"), _ours(refs[0], "devkit")
    assert len(slidr.index) >= len(dev.index)
    extra = len(slidr.index) - len(dev.index)
    band = ((slidr.uvd[:, 0] <= 1) | (slidr.uvd[:, 1] <= 1)).sum()
    assert extra == band


def test_torch_backend_matches_numpy(devkit):
    _, refs = devkit
    a, b = _ours(refs[0]), _ours(refs[0], backend="torch")
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_allclose(a.uvd, b.uvd, atol=1e-4)


def test_keep_rule_and_rounding_on_hand_made_camera():
    # camera looking along +x of the lidar frame: cam z = lidar x, cam x = -lidar y, cam y = -lidar z
    T = np.array([[[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]], dtype=float)
    K = np.array([[[80, 0, 50], [0, 80, 25], [0, 0, 1]]], dtype=float)  # u = 50 - 8 y at x = 10
    size = np.array([[101, 51]])
    pts = np.array([
        [10, 0, 0],        # centre: u=50, v=25
        [0.5, 0, 0],       # too close (depth 0.5 <= 1)
        [-10, 0, 0],       # behind
        [10, 6.1875, 0],   # u = 0.5 -> kept (0 < u), col rint(0.5) = 0
        [10, 6.25, 0],     # u = 0 -> dropped (not > 0)
        [10, -6.25, 0],    # u = 100 = W-1 -> dropped
        [10, 0.0625, 0],   # u = 49.5 -> col 50 (half to even)
        [10, -0.1875, 0],  # u = 51.5 -> col 52
    ], dtype=np.float32)
    p = project_points(pts, T, K, size, min_dist=1.0)
    assert p.index[:, 0].tolist() == [0, 3, 6, 7]
    assert p.index[:, 3].tolist() == [50, 0, 50, 52]
    assert p.index[:, 2].tolist() == [25, 25, 25, 25]
    np.testing.assert_allclose(p.uvd[:, 2], 10.0)
    assert p.index.dtype == np.int32 and p.uvd.dtype == np.float32
