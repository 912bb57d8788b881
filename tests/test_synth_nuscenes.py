"""Synthetic nuScenes: devkit loading, file formats, camera/lidar consistency, ego motion, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from nuscenes.nuscenes import NuScenes, NuScenesExplorer
from nuscenes.utils.data_classes import LidarPointCloud
from pyquaternion import Quaternion

from distillkit.sensors.synth.nuscenes import CAMERAS, SCENE_NAMES, SIZES, make_nuscenes
from distillkit.sensors.synth.scene import CLASS_PALETTE, LIDARSEG_NAMES

CHANNELS = ["LIDAR_TOP", *[c.channel for c in CAMERAS]]
SMALL = SIZES["small"]


@pytest.fixture(scope="module")
def nusc(synth_nuscenes: Path) -> NuScenes:
    """The devkit's view of the session's small synthetic dataset (seed 0)."""
    return NuScenes(version="v1.0-mini", dataroot=str(synth_nuscenes), verbose=False)


def _load_points(nusc: NuScenes, sd_token: str) -> np.ndarray:
    """Raw (N, 5) float32 points of a lidar sample_data."""
    return np.fromfile(Path(nusc.dataroot) / nusc.get("sample_data", sd_token)["filename"], np.float32).reshape(-1, 5)


def _labels(nusc: NuScenes, sd_token: str) -> np.ndarray:
    return np.fromfile(Path(nusc.dataroot) / nusc.get("lidarseg", sd_token)["filename"], np.uint8)


def _pose(rec: dict) -> np.ndarray:
    """4x4 from a record with translation and rotation quaternion."""
    t = np.eye(4)
    t[:3, :3] = Quaternion(rec["rotation"]).rotation_matrix
    t[:3, 3] = rec["translation"]
    return t


def _project(nusc: NuScenes, lidar_sd: str, cam_sd: str, points: np.ndarray,
             ignore_motion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coords (N, 2) and depth (N,) of lidar points in a camera, float64.

    With ``ignore_motion`` the ego pose at the lidar timestamp is used for the camera too.
    """
    lsd, csd = nusc.get("sample_data", lidar_sd), nusc.get("sample_data", cam_sd)
    l_cs, c_cs = (nusc.get("calibrated_sensor", s["calibrated_sensor_token"]) for s in (lsd, csd))
    ego_l = nusc.get("ego_pose", lsd["ego_pose_token"])
    ego_c = ego_l if ignore_motion else nusc.get("ego_pose", csd["ego_pose_token"])
    chain = np.linalg.inv(_pose(c_cs)) @ np.linalg.inv(_pose(ego_c)) @ _pose(ego_l) @ _pose(l_cs)
    pc = points[:, :3].astype(np.float64) @ chain[:3, :3].T + chain[:3, 3]
    k = np.asarray(c_cs["camera_intrinsic"])
    uv = (pc @ k.T)[:, :2] / pc[:, 2:3]
    return uv, pc[:, 2]


def test_devkit_loads_with_expected_counts(nusc: NuScenes) -> None:
    assert len(nusc.scene) == SMALL.n_scenes
    assert [s["name"] for s in nusc.scene] == list(SCENE_NAMES[: SMALL.n_scenes])  # real names, for the splits
    assert len(nusc.sample) == SMALL.n_scenes * SMALL.n_keyframes
    assert len(nusc.sample_data) == len(nusc.sample) * 7
    assert len(nusc.lidarseg) == len(nusc.sample)
    assert {c["index"] for c in nusc.category} == set(range(len(LIDARSEG_NAMES)))
    for scene in nusc.scene:
        tok, n = scene["first_sample_token"], 0
        while tok:
            sample = nusc.get("sample", tok)
            assert sorted(sample["data"]) == sorted(CHANNELS)
            assert sample["scene_token"] == scene["token"]
            for ch, sd_tok in sample["data"].items():
                sd = nusc.get("sample_data", sd_tok)
                assert sd["is_key_frame"] and sd["channel"] == ch
                assert (Path(nusc.dataroot) / sd["filename"]).is_file()
                if sd["prev"]:
                    assert nusc.get("sample_data", sd["prev"])["next"] == sd_tok
                if ch != "LIDAR_TOP":
                    assert (sd["width"], sd["height"], sd["fileformat"]) == (SMALL.width, SMALL.height, "jpg")
                    assert 0 <= sd["timestamp"] - sample["timestamp"] < 50_000  # fires within one spin
            last, tok, n = tok, sample["next"], n + 1
        assert n == scene["nbr_samples"] == SMALL.n_keyframes and last == scene["last_sample_token"]
    for ann in nusc.sample_annotation:  # boxes are consistent with the devkit's accessors
        assert nusc.get_box(ann["token"]).wlh.shape == (3,)


def test_pointclouds_and_lidarseg(nusc: NuScenes) -> None:
    for sample in nusc.sample:
        tok = sample["data"]["LIDAR_TOP"]
        raw = _load_points(nusc, tok)
        pc = LidarPointCloud.from_file(str(Path(nusc.dataroot) / nusc.get("sample_data", tok)["filename"]))
        assert pc.points.shape == (4, len(raw))
        assert 4000 <= len(raw) <= 8000
        labels = _labels(nusc, tok)
        assert labels.shape == (len(raw),)
        assert set(np.unique(labels)) <= set(CLASS_PALETTE)
        rng = np.linalg.norm(raw[:, :3], axis=1)
        assert rng.max() < 70.0 and rng.min() > 2.0  # nothing from the ego car's own roof
        assert set(np.unique(raw[:, 4])) <= set(range(SMALL.beams))
        # Ground points sit ~1.84 m below the sensor, as on the real LIDAR_TOP mount.
        assert abs(np.median(raw[labels == 24, 2]) + 1.84) < 0.1


def _nearest_class(rgb: np.ndarray) -> np.ndarray:
    """Class of the nearest palette colour over a range of shade factors, for pixels (N, 3)."""
    cols, cls = [], []
    for c, colours in CLASS_PALETTE.items():
        for col in colours:
            for shade in np.arange(0.5, 1.125, 0.05):  # Lambert factors span 0.55..1
                cols.append(np.asarray(col) * shade)
                cls.append(c)
    dist = np.linalg.norm(rgb[:, None, :].astype(np.float64) - np.asarray(cols)[None], axis=-1)
    return np.asarray(cls)[dist.argmin(axis=1)]


def test_lidar_points_land_on_pixels_of_their_class(nusc: NuScenes) -> None:
    explorer = NuScenesExplorer(nusc)
    colour_to_label = {tuple(np.round(np.asarray(c) / 255.0, 6)): i for i, c in enumerate(nusc.colormap.values())}
    hits = total = 0
    for sample in nusc.sample[:2]:
        for ch in CHANNELS[1:]:
            pts, colouring, im = explorer.map_pointcloud_to_image(sample["data"]["LIDAR_TOP"], sample["data"][ch],
                                                                  show_lidarseg=True)
            labels = np.array([colour_to_label[tuple(np.round(c[:3], 6))] for c in colouring])
            img = np.asarray(im)
            cols, rows = np.rint(pts[0]).astype(int), np.rint(pts[1]).astype(int)
            pred = _nearest_class(img[rows, cols])
            hits += int((pred == labels).sum())
            total += len(labels)
    assert total > 3000
    print(f"class-consistent projected points: {hits / total:.3f} of {total}")
    assert hits / total > 0.6, hits / total


def test_ego_motion_matters_and_chain_matches_devkit(nusc: NuScenes) -> None:
    explorer = NuScenesExplorer(nusc)
    sample = nusc.sample[1]
    lidar = sample["data"]["LIDAR_TOP"]
    points = _load_points(nusc, lidar)
    shifts = []
    for ch in CHANNELS[1:]:
        cam = sample["data"][ch]
        uv, depth = _project(nusc, lidar, cam, points)
        keep = (depth > 1.0) & (uv[:, 0] > 1) & (uv[:, 0] < SMALL.width - 1) & (uv[:, 1] > 1)
        keep &= uv[:, 1] < SMALL.height - 1
        dev, _, _ = explorer.map_pointcloud_to_image(lidar, cam)
        # The devkit transforms float32 points through ~1 km global coordinates: ~0.01 px of rounding.
        np.testing.assert_allclose(uv[keep], dev[:2].T, atol=0.05)
        uv_static, _ = _project(nusc, lidar, cam, points, ignore_motion=True)
        near = keep & (depth < 30.0)
        shifts.append(np.median(np.linalg.norm(uv[near] - uv_static[near], axis=1)))
    print("median shift (px) when ignoring ego motion, points < 30 m:", np.round(shifts, 2))
    assert max(shifts) > 0.5, shifts


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(synth_nuscenes: Path, tmp_path: Path) -> None:
    again = _digest(make_nuscenes(tmp_path / "a", seed=0, size="small"))
    assert again == _digest(synth_nuscenes)
    other = _digest(make_nuscenes(tmp_path / "b", seed=1, size="small"))
    sensor_files = [v for k, v in again.items() if k.startswith(("samples", "lidarseg"))]
    assert len(sensor_files) == 8 * SMALL.n_scenes * SMALL.n_keyframes and set(other.values()).isdisjoint(sensor_files)
