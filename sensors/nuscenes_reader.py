"""nuScenes through nuscenes-devkit: keyframes with their calibration chains.

Tables are read once on the client (``plan_keyframes``); everything a worker needs per
keyframe (file paths, intrinsics, ``T_cam_lidar`` composed through both ego poses) goes
into plain dicts, so workers never load the dataset-wide tables.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.sensors.geometry import matmul, rigid_inverse, rigid_matrix

CAMERAS = (
    "CAM_FRONT",
    "CAM_FRONT_RIGHT",
    "CAM_BACK_RIGHT",
    "CAM_BACK",
    "CAM_BACK_LEFT",
    "CAM_FRONT_LEFT",
)
LIDAR = "LIDAR_TOP"


@dataclass(frozen=True)
class CameraRef:
    channel: str
    sample_data_token: str
    path: str
    width: int
    height: int
    K: list[list[float]]
    T_cam_lidar: list[list[float]]  # 4x4 row-major


@dataclass(frozen=True)
class KeyframeRef:
    """One keyframe: its scene, the LIDAR_TOP sweep (token, path, timestamp in microseconds) and
    the six cameras with their composed calibration."""

    sample_token: str
    scene: str
    lidar_token: str
    timestamp: int  # of the LIDAR_TOP sample_data, microseconds (nuScenes' clock)
    lidar_path: str
    cameras: list[CameraRef]
    lidarseg_path: str | None
    # the scene's position in the dataset's scene table (``nusc.scene``): SLidR's N% fine-tuning subset
    # counts scenes in that order (valeoai/SLidR downstream/dataloader_nuscenes.py:127-132), which is not
    # name order, and evaluation reads shards without the raw tables
    scene_index: int = -1

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)


def pose_matrix(record: dict[str, Any]) -> np.ndarray:
    """4x4 float64 transform from a nuScenes ``rotation`` (w, x, y, z) + ``translation``."""
    return rigid_matrix(record["rotation"], record["translation"])


def compose_T_cam_lidar(
    cs_lidar: dict[str, Any], pose_lidar: dict[str, Any], pose_cam: dict[str, Any], cs_cam: dict[str, Any]
) -> np.ndarray:
    """lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera, as one float64 4x4.

    The devkit's chain (``inv(cs_cam) inv(pose_cam) pose_lidar cs_lidar``), multiplied left to right with
    ``sensors.geometry`` instead of BLAS and LAPACK, so ``cams.json`` has the same bits on every machine."""
    T = rigid_inverse(pose_matrix(cs_cam))
    for M in (rigid_inverse(pose_matrix(pose_cam)), pose_matrix(pose_lidar), pose_matrix(cs_lidar)):
        T = matmul(T, M)
    return T


class DatasetError(Exception):
    """The dataset cannot be read at all (wrong dataroot or version): a user error."""


def _tolerant_nuscenes_class() -> type:
    from nuscenes.nuscenes import NuScenes

    class TolerantNuScenes(NuScenes):
        """nuscenes-devkit's reader, except that a sample_data record whose
        calibrated_sensor or sensor record is missing is set aside (``orphans``) instead of
        failing the whole load: its keyframe is then rejected with a reason."""

        orphans: list[dict[str, Any]]

        def __make_reverse_index__(self, verbose: bool) -> None:  # noqa: N802 (devkit name)
            cs_tokens = {r["token"] for r in self.calibrated_sensor}
            sensor_tokens = {r["token"] for r in self.sensor}
            cs_sensor = {r["token"]: r["sensor_token"] for r in self.calibrated_sensor}
            self.orphans = []
            kept = []
            for rec in self.sample_data:
                tok = rec.get("calibrated_sensor_token")
                if tok in cs_tokens and cs_sensor[tok] in sensor_tokens:
                    kept.append(rec)
                else:
                    self.orphans.append(rec)
            self.sample_data = kept
            super().__make_reverse_index__(verbose)

    return TolerantNuScenes


def load_nuscenes(dataroot: str | Path, version: str) -> Any:
    """Open nuScenes with nuscenes-devkit (quietly). Raises ``DatasetError`` if the tables
    are missing or unreadable."""
    table_dir = Path(dataroot) / version
    if not table_dir.is_dir():
        raise DatasetError(f"no nuScenes tables at {table_dir}")
    cls = _tolerant_nuscenes_class()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(version=version, dataroot=str(dataroot), verbose=False)
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        raise DatasetError(f"nuscenes-devkit cannot load {table_dir}: {type(exc).__name__}: {exc}") from None


def _orphan_channel(rec: dict[str, Any]) -> str:
    # Without a calibration record the channel is only known from the file's folder.
    parts = Path(rec.get("filename", "")).parts
    return parts[1] if len(parts) > 2 else "?"


def plan_keyframes(
    nusc: Any, scenes: list[str] | None = None
) -> tuple[list[KeyframeRef], list[dict[str, str]]]:
    """Every keyframe of the chosen scenes in scene order, then time order.

    Args:
        nusc: a loaded nuScenes (``load_nuscenes``).
        scenes: scene names in the order wanted; ``None`` or empty = every scene, in name order.

    Returns (keyframes, rejected) where rejected holds ``{source, stage, reason}`` for
    keyframes whose tables are incomplete (a camera missing, a calibration or ego-pose
    record missing, empty intrinsics).
    """
    dataroot = Path(nusc.dataroot)
    lidarseg_by_sd = {r["sample_data_token"]: r["filename"] for r in getattr(nusc, "lidarseg", [])}
    orphan_reason: dict[str, str] = {}
    for rec in getattr(nusc, "orphans", []):
        if rec.get("is_key_frame"):
            orphan_reason[rec["sample_token"]] = (
                f"{_orphan_channel(rec)}: missing calibrated_sensor record "
                f"{rec.get('calibrated_sensor_token')} for sample_data {rec['token']}"
            )
    known = {s["name"]: s for s in nusc.scene}
    table_index = {s["name"]: i for i, s in enumerate(nusc.scene)}
    if scenes:
        missing = [s for s in scenes if s not in known]
        if missing:
            raise DatasetError(f"scenes not in {nusc.version}: {', '.join(missing)}")
        chosen = [known[s] for s in scenes]
    else:
        chosen = sorted(nusc.scene, key=lambda s: s["name"])
    refs: list[KeyframeRef] = []
    rejected: list[dict[str, str]] = []
    for scene in chosen:
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            source = f"{scene['name']}/sample/{token}"
            try:
                if token in orphan_reason:
                    raise KeyError(orphan_reason[token])
                refs.append(_keyframe(nusc, dataroot, scene["name"], sample, lidarseg_by_sd,
                                      table_index[scene["name"]]))
            except KeyError as exc:
                rejected.append({"source": source, "stage": "calibration", "reason": str(exc.args[0])})
            token = sample["next"]
    return refs, rejected


def _keyframe(nusc: Any, dataroot: Path, scene: str, sample: dict[str, Any],
              lidarseg_by_sd: dict[str, str], scene_index: int = -1) -> KeyframeRef:
    data = sample["data"]
    missing = [c for c in (LIDAR, *CAMERAS) if c not in data]
    if missing:
        raise KeyError(f"keyframe has no {', '.join(missing)}")
    sd_lidar = nusc.get("sample_data", data[LIDAR])
    cs_lidar = _get(nusc, "calibrated_sensor", sd_lidar["calibrated_sensor_token"], LIDAR)
    pose_lidar = _get(nusc, "ego_pose", sd_lidar["ego_pose_token"], LIDAR)
    cams = []
    for channel in CAMERAS:
        sd = nusc.get("sample_data", data[channel])
        cs = _get(nusc, "calibrated_sensor", sd["calibrated_sensor_token"], channel)
        pose = _get(nusc, "ego_pose", sd["ego_pose_token"], channel)
        K = np.asarray(cs.get("camera_intrinsic") or [], dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise KeyError(
                f"{channel}: camera_intrinsic is missing or not 3x3 in calibrated_sensor {cs['token']}"
            )
        T = compose_T_cam_lidar(cs_lidar, pose_lidar, pose, cs)
        cams.append(CameraRef(
            channel=channel,
            sample_data_token=sd["token"],
            path=os.fspath(dataroot / sd["filename"]),
            width=int(sd["width"]),
            height=int(sd["height"]),
            K=K.tolist(),
            T_cam_lidar=T.tolist(),
        ))
    seg = lidarseg_by_sd.get(sd_lidar["token"])
    return KeyframeRef(
        sample_token=sample["token"],
        scene=scene,
        lidar_token=sd_lidar["token"],
        timestamp=int(sd_lidar["timestamp"]),
        lidar_path=os.fspath(dataroot / sd_lidar["filename"]),
        cameras=cams,
        lidarseg_path=os.fspath(dataroot / seg) if seg else None,
        scene_index=scene_index,
    )


def _get(nusc: Any, table: str, token: str, channel: str) -> dict[str, Any]:
    try:
        return nusc.get(table, token)
    except KeyError:
        raise KeyError(f"{channel}: missing {table} record {token}") from None


def read_lidar_bin(path: str | Path, columns: int = 5) -> np.ndarray:
    """Read a nuScenes ``.pcd.bin``: float32 (N, columns). Raises ``ValueError`` when the
    file is empty, not a whole number of points, or holds non-finite coordinates."""
    raw = Path(path).read_bytes()
    row = 4 * columns
    if len(raw) == 0 or len(raw) % row:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {columns}-float32 points (truncated?)")
    points = np.frombuffer(raw, dtype=np.float32).reshape(-1, columns)
    if not np.isfinite(points[:, :3]).all():
        raise ValueError("non-finite coordinates")
    return points
