"""Synthetic nuScenes dataset in the native on-disk format (tables, JPEGs, ``.pcd.bin``, lidarseg).

:func:`make_nuscenes` writes a small dataset that ``nuscenes.nuscenes.NuScenes(version="v1.0-mini")``
loads unmodified. Each scene is one static 3-D street world (:mod:`sensors.synth.scene`) through which
the ego car drives along a curve at constant speed; the six cameras and the top lidar are rendered from
that world by one ray caster (:mod:`sensors.synth.raycast`), each from the ego pose at its own timestamp.
Cameras fire as the (instantaneous) lidar sweep passes their heading, 0..50 ms after the lidar, as in
nuScenes, so projecting lidar points into a camera needs the full chain
lidar -> ego(t_lidar) -> global -> ego(t_cam) -> camera.

Everything is derived from ``seed``: tokens are hashes, JPEG settings are fixed, so the same
``(seed, size)`` gives byte-identical files.

Scenes carry real nuScenes scene names (:data:`SCENE_NAMES`), chosen so that the split machinery
(``distillkit.sensors.nuscenes_splits``) has something to select: SLidR's ``pretrain`` scenes, one it
holds out for validation and an official ``val`` scene.

Sizes (:data:`SIZES`), measured on one core of a 2-core development VM: "small" (4 scenes x 3 keyframes,
384x216 images, ~5.3k points per sweep) takes ~11 s and 3.8 MB; "medium" (4 x 3 keyframes, 1600x900,
~34k points, like nuScenes) takes ~110 s and 29 MB. The cost per keyframe is about that of the former 2-scene
sizes (2 x 3 and 2 x 5: 4.6 s and 94 s on the same VM; ~2.5 s and ~50 s on a faster machine).
"""

from __future__ import annotations

import hashlib
import io
import json
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pyquaternion import Quaternion
from tqdm import tqdm

from distillkit.sensors.synth.raycast import Primitive, cast
from distillkit.sensors.synth.scene import LIDARSEG_NAMES, Road, World, make_world, shade

VERSION = "v1.0-mini"
KEYFRAME_US = 500_000  # nuScenes keyframes are ~2 Hz
LIDAR_PERIOD_S = 0.05  # 20 Hz spin; a camera fires when the sweep crosses its heading
MAX_RANGE_M = 70.0
LIDAR_ELEVATION_DEG = (-30.0, 10.0)


@dataclass(frozen=True)
class SynthSize:
    """Dataset size: scenes, keyframes per scene, image width/height (px), lidar beams and azimuth steps."""

    n_scenes: int
    n_keyframes: int
    width: int
    height: int
    beams: int
    azimuth_steps: int


SIZES: dict[str, SynthSize] = {
    "small": SynthSize(n_scenes=4, n_keyframes=3, width=384, height=216, beams=32, azimuth_steps=170),
    "medium": SynthSize(n_scenes=4, n_keyframes=3, width=1600, height=900, beams=32, azimuth_steps=1100),
}

# Scene ``i`` is named ``SCENE_NAMES[i]``. Real v1.0-mini scene names, picked for their splits
# (nuscenes-devkit's lists and SLidR's held-out 100), so that a dataset of 3 or more scenes has
# one scene of each kind a split can separate:
SCENE_NAMES: tuple[str, ...] = (
    "scene-0061",  # train, mini_train, train_detect; SLidR "pretrain"
    "scene-1094",  # train, mini_train, train_detect; one of SLidR's 100 held-out scenes ("pretrain_val")
    "scene-0103",  # val, mini_val
    "scene-0655",  # train, mini_train, train_track; SLidR "pretrain"
)


@dataclass(frozen=True)
class CameraSpec:
    """A camera: channel, mount position in the ego frame (m), yaw/pitch (deg; pitch > 0 looks down),
    focal length as a fraction of the image width (nuScenes: 1266 px at 1600 px)."""

    channel: str
    translation: tuple[float, float, float]
    yaw_deg: float
    pitch_deg: float
    focal_ratio: float


CAMERAS: tuple[CameraSpec, ...] = (
    CameraSpec("CAM_FRONT", (1.70, 0.016, 1.51), 0.0, 0.3, 1266.4 / 1600),
    CameraSpec("CAM_FRONT_RIGHT", (1.55, -0.49, 1.49), -55.0, 0.4, 1260.8 / 1600),
    CameraSpec("CAM_BACK_RIGHT", (1.04, -0.48, 1.56), -110.0, 0.2, 1259.5 / 1600),
    CameraSpec("CAM_BACK", (0.03, 0.00, 1.57), 180.0, 0.3, 809.2 / 1600),
    CameraSpec("CAM_BACK_LEFT", (1.04, 0.48, 1.56), 110.0, 0.5, 1256.7 / 1600),
    CameraSpec("CAM_FRONT_LEFT", (1.52, 0.49, 1.51), 55.0, 0.2, 1272.6 / 1600),
)
# Real nuScenes LIDAR_TOP extrinsics: x points to the right of the car (about -90 deg yaw).
LIDAR_TRANSLATION = (0.943713, 0.0, 1.84023)
LIDAR_ROTATION = (0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817)
SWEEP_START_YAW_DEG = 90.0  # ego-frame heading of the lidar beam at the sweep timestamp; it turns clockwise


def _token(seed: int, *parts: object) -> str:
    """Deterministic 32-hex-digit token from the seed and a key path."""
    return hashlib.md5("/".join(map(str, (seed, *parts))).encode()).hexdigest()


def _quat_list(q: Quaternion) -> list[float]:
    """Normalised quaternion ``[w, x, y, z]`` as JSON floats, sign fixed so that ``w >= 0``."""
    e = q.normalised.elements
    return [float(v) for v in (e if e[0] >= 0 else -e)]


def _rotation(q: list[float]) -> np.ndarray:
    """Rotation matrix (3, 3) exactly as nuscenes-devkit computes it from a stored quaternion."""
    return Quaternion(q).rotation_matrix


def camera_rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Camera-to-ego rotation (3, 3): camera z forward, x right, y down, looking along ``yaw``."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    z = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), -np.sin(pitch)])
    x = np.array([np.sin(yaw), -np.cos(yaw), 0.0])
    return np.stack([x, np.cross(z, x), z], axis=1)


def intrinsics(spec: CameraSpec, width: int, height: int) -> np.ndarray:
    """Pinhole matrix K (3, 3) scaled to the image size; principal point placed as in nuScenes."""
    f = spec.focal_ratio * width
    return np.array([[f, 0.0, 0.5102 * width], [0.0, f, 0.5461 * height], [0.0, 0.0, 1.0]])


def camera_offset_s(spec: CameraSpec) -> float:
    """Delay (s, in [0, 0.05)) of a camera after the lidar timestamp: when the sweep reaches its heading."""
    return ((SWEEP_START_YAW_DEG - spec.yaw_deg) % 360.0) / 360.0 * LIDAR_PERIOD_S


@dataclass(frozen=True)
class Trajectory:
    """Constant-speed drive along the road's ego lane (``d = 0``); ``speed`` in m/s."""

    road: Road
    speed: float

    def pose(self, t: float) -> tuple[list[float], list[float]]:
        """Ego pose at ``t`` seconds after the scene start: translation (m) and quaternion ``[w, x, y, z]``."""
        x, y, yaw = self.road.to_world(self.speed * t, 0.0)
        return [float(x), float(y), 0.0], _quat_list(Quaternion(axis=[0.0, 0.0, 1.0], angle=float(yaw)))


def _sensor_to_world(ego: tuple[list[float], list[float]], trans: list[float],
                     rot: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Rotation (3, 3) and origin (3,) of a sensor in the global frame from the stored records."""
    r_ego = _rotation(ego[1])
    return r_ego @ _rotation(rot), r_ego @ np.asarray(trans) + np.asarray(ego[0])


def camera_rays(k: np.ndarray, width: int, height: int, r_world_cam: np.ndarray) -> np.ndarray:
    """Unit world-frame ray directions (H, W, 3) through pixel centres; pixel (row j, col i) is at u=i, v=j."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    d = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], axis=-1)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    return d @ r_world_cam.T


# The 12 edges of a box whose 8 corners are ordered as in ``Primitive.corners`` (index bits = x, y, z).
_EDGES = np.array([(a, a | b) for a in range(8) for b in (1, 2, 4) if not a & b])
_NEAR = 0.05  # near plane (m) used for culling


def _clip_near(pc: np.ndarray) -> np.ndarray:
    """Points (M, 3) bounding the part of a box (corners ``pc`` (8, 3), camera frame) with ``z >= _NEAR``.

    Corners behind the near plane are replaced by the crossings of the box edges with that plane, so the
    projected rectangle stays finite (and tight) for objects beside the camera.
    """
    front = pc[pc[:, 2] >= _NEAR]
    a, b = pc[_EDGES[:, 0]], pc[_EDGES[:, 1]]
    cross = (a[:, 2] - _NEAR) * (b[:, 2] - _NEAR) < 0
    a, b = a[cross], b[cross]
    f = ((_NEAR - a[:, 2]) / (b[:, 2] - a[:, 2]))[:, None]
    return np.concatenate([front, a + f * (b - a)])


def _camera_rect(k: np.ndarray, width: int, height: int, r_world_cam: np.ndarray, origin: np.ndarray):
    """Culling callback for :func:`sensors.synth.raycast.cast`: the pixel rectangle a primitive can cover."""

    def rect(p: Primitive) -> tuple[int, int, int, int] | None:
        pc = (p.corners() - origin) @ r_world_cam  # corners in the camera frame, (8, 3)
        if (pc[:, 2] < _NEAR).all() or np.linalg.norm(pc, axis=1).min() > 150.0:
            return None
        pc = _clip_near(pc)
        u = k[0, 0] * pc[:, 0] / pc[:, 2] + k[0, 2]
        v = k[1, 1] * pc[:, 1] / pc[:, 2] + k[1, 2]
        c0, c1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, width)
        r0, r1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, height)
        return (r0, r1, c0, c1) if r1 > r0 and c1 > c0 else None

    return rect


def render_camera(world: World, tab: dict, spec: CameraSpec, k: np.ndarray, size: SynthSize,
                  r_world_cam: np.ndarray, origin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render one camera image, uint8 (H, W, 3), with Lambert shading and mild sensor noise."""
    dirs = camera_rays(k, size.width, size.height, r_world_cam)
    hits = cast(origin, dirs, world.primitives, _camera_rect(k, size.width, size.height, r_world_cam, origin))
    _, rgb, _ = shade(hits, dirs, world, tab)
    rgb += rng.normal(0.0, 2.0, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def lidar_directions(beams: int, steps: int) -> np.ndarray:
    """Unit beam directions in the lidar frame, (beams, steps, 3); beam 0 is the lowest."""
    el = np.radians(np.linspace(*LIDAR_ELEVATION_DEG, beams))[:, None]
    az = np.linspace(0.0, 2 * np.pi, steps, endpoint=False)[None, :]
    return np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el) * np.ones_like(az)], axis=-1)


def render_lidar(world: World, tab: dict, size: SynthSize, r_world_lidar: np.ndarray, origin: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast one (instantaneous) sweep.

    Returns
    -------
    points : ndarray, (N, 5) float32
        x, y, z (m, lidar frame), intensity (0..255), ring (beam index), azimuth-major order.
    labels : ndarray, (N,) uint8
        nuScenes-lidarseg class index of each point.
    instance : ndarray, (N,) int32
        Annotated instance key of each point, -1 for stuff.
    """
    d_lidar = lidar_directions(size.beams, size.azimuth_steps)
    dirs = d_lidar @ r_world_lidar.T
    near = [p for p in world.primitives
            if np.linalg.norm(np.asarray(p.center) - origin) - p.bounding_radius() < MAX_RANGE_M]
    ids = {id(p): i + 1 for i, p in enumerate(world.primitives)}
    hits = cast(origin, dirs, near)
    # Map ids of the culled list back to world ids so the shader's lookup table applies.
    remap = np.array([0] + [ids[id(p)] for p in near], dtype=np.int32)
    hits.prim = np.where(hits.prim >= 0, remap[np.maximum(hits.prim, 0)], hits.prim)
    label, _, inten = shade(hits, dirs, world, tab)
    keep = (hits.depth < MAX_RANGE_M).T.ravel()  # azimuth-major, like a spinning sensor
    rng_noise = rng.normal(0.0, 0.01, hits.depth.shape)
    rng_dist = np.where(np.isfinite(hits.depth), hits.depth + rng_noise, 0.0)
    xyz = (rng_dist[..., None] * d_lidar).transpose(1, 0, 2).reshape(-1, 3)[keep]
    inten = np.clip(inten * rng.uniform(0.8, 1.2, inten.shape) + rng.normal(0.0, 1.5, inten.shape), 0, 255)
    ring = np.broadcast_to(np.arange(size.beams, dtype=np.float64)[:, None], hits.depth.shape)
    cols = [a.T.ravel()[keep] for a in (inten, ring)]
    points = np.column_stack([xyz, *cols]).astype(np.float32)
    instance = tab["instance"][np.maximum(hits.prim, 0)].T.ravel()[keep]
    return points, label.T.ravel()[keep], instance


def _jpeg_bytes(img: np.ndarray) -> bytes:
    """Encode with fixed settings (quality 92, 4:4:4 chroma, no optimisation) for reproducible bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92, subsampling=0, optimize=False)
    return buf.getvalue()


def _static_tables(seed: int) -> dict[str, list[dict]]:
    """category (with lidarseg ``index``), attribute, visibility and sensor tables."""
    category = [{"token": _token(seed, "category", n), "name": n, "description": f"nuScenes class {n}",
                 "index": i} for i, n in enumerate(LIDARSEG_NAMES)]
    attrs = ["vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
             "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving"]
    attribute = [{"token": _token(seed, "attribute", a), "name": a, "description": a} for a in attrs]
    levels = ["v0-40", "v40-60", "v60-80", "v80-100"]
    visibility = [{"token": str(i + 1), "level": lv, "description": f"visibility of whole object is {lv}%"}
                  for i, lv in enumerate(levels)]
    sensor = [{"token": _token(seed, "sensor", c), "channel": c, "modality": "camera" if c != "LIDAR_TOP"
               else "lidar"} for c in ["LIDAR_TOP", *[s.channel for s in CAMERAS]]]
    return {"category": category, "attribute": attribute, "visibility": visibility, "sensor": sensor}


def _link(records: list[dict]) -> None:
    """Fill ``prev``/``next`` tokens of a time-ordered chain of records."""
    for i, rec in enumerate(records):
        rec["prev"] = records[i - 1]["token"] if i > 0 else ""
        rec["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


class _Writer:
    """Accumulates tables and writes sensor files for one dataset."""

    def __init__(self, out: pathlib.Path, seed: int, size: SynthSize) -> None:
        self.out, self.seed, self.size = out, seed, size
        self.tables: dict[str, list[dict]] = _static_tables(seed)
        for name in ("calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data",
                     "sample_annotation", "instance", "map", "lidarseg"):
            self.tables[name] = []
        self.sensor_token = {s["channel"]: s["token"] for s in self.tables["sensor"]}
        self.cat_token = {c["name"]: c["token"] for c in self.tables["category"]}
        self.attr_token = {a["name"]: a["token"] for a in self.tables["attribute"]}

    def file(self, rel: str, data: bytes) -> str:
        """Write ``data`` at ``rel`` (relative to the dataroot) and return ``rel``."""
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel

    def calibrations(self, scene: int) -> dict[str, dict]:
        """One calibrated_sensor record per channel for this scene."""
        recs = {"LIDAR_TOP": {"translation": list(LIDAR_TRANSLATION),
                              "rotation": _quat_list(Quaternion(LIDAR_ROTATION)), "camera_intrinsic": []}}
        for spec in CAMERAS:
            k = intrinsics(spec, self.size.width, self.size.height)
            recs[spec.channel] = {"translation": list(spec.translation),
                                  "rotation": _quat_list(Quaternion(matrix=camera_rotation(spec.yaw_deg,
                                                                                           spec.pitch_deg))),
                                  "camera_intrinsic": k.tolist()}
        for ch, rec in recs.items():
            rec.update(token=_token(self.seed, "calib", scene, ch), sensor_token=self.sensor_token[ch])
            self.tables["calibrated_sensor"].append(rec)
        return recs

    def sample_data(self, key: tuple, sample: dict, calib: dict, ts: int,
                    pose: tuple[list[float], list[float]], filename: str, is_cam: bool) -> dict:
        """Add an ego_pose and a sample_data record (prev/next are linked later)."""
        pose_rec = {"token": _token(self.seed, "ego_pose", *key), "timestamp": ts,
                    "translation": pose[0], "rotation": pose[1]}
        self.tables["ego_pose"].append(pose_rec)
        rec = {"token": _token(self.seed, "sample_data", *key), "sample_token": sample["token"],
               "ego_pose_token": pose_rec["token"], "calibrated_sensor_token": calib["token"],
               "timestamp": ts, "fileformat": "jpg" if is_cam else "pcd", "is_key_frame": True,
               "height": self.size.height if is_cam else 0, "width": self.size.width if is_cam else 0,
               "filename": filename, "prev": "", "next": ""}
        self.tables["sample_data"].append(rec)
        return rec

    def write_tables(self) -> None:
        """Dump every table as ``<out>/v1.0-mini/<name>.json`` and a small map mask PNG."""
        map_token = _token(self.seed, "map")
        buf = io.BytesIO()
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="PNG")
        self.tables["map"] = [{"token": map_token, "category": "semantic_prior",
                               "filename": self.file(f"maps/{map_token}.png", buf.getvalue()),
                               "log_tokens": [lg["token"] for lg in self.tables["log"]]}]
        for name, rows in self.tables.items():
            self.file(f"{VERSION}/{name}.json", json.dumps(rows, indent=0).encode())


def _scene_setup(seed: int, scene: int) -> tuple[World, Trajectory]:
    """Random street, world and ego trajectory of one scene (large global coordinates, like nuScenes)."""
    rng = np.random.default_rng([seed, scene, 1])
    radius, sign = rng.uniform(80.0, 220.0), int(rng.choice([-1, 1]))
    start, heading = rng.uniform(300.0, 2500.0, 2), rng.uniform(-np.pi, np.pi)
    # The centre lies on the left of the heading for a left turn, on the right for a right turn.
    left = np.array([-np.sin(heading), np.cos(heading)])
    centre = start + sign * radius * left
    theta0 = float(np.arctan2(start[1] - centre[1], start[0] - centre[0]))
    road = Road(float(centre[0]), float(centre[1]), float(radius), sign, theta0)
    return make_world(rng, road), Trajectory(road, float(rng.uniform(6.0, 11.0)))


def _annotate(w: _Writer, world: World, sample: dict, ego_xyz: list[float], inst_pts: np.ndarray,
              chains: dict[int, list[dict]], scene: int) -> None:
    """sample_annotation records for cars and pedestrians within 50 m of the ego."""
    counts = np.bincount(inst_pts[inst_pts >= 0], minlength=len(world.instances))
    for inst in world.instances:
        if np.hypot(inst.center[0] - ego_xyz[0], inst.center[1] - ego_xyz[1]) > 50.0:
            continue
        attr = "vehicle.parked" if inst.category.startswith("vehicle") else "pedestrian.standing"
        rec = {"token": _token(w.seed, "ann", scene, inst.token_key, sample["token"]),
               "sample_token": sample["token"], "instance_token": _token(w.seed, "inst", scene, inst.token_key),
               "visibility_token": "4", "attribute_tokens": [w.attr_token[attr]], "translation": list(inst.center),
               "size": list(inst.size), "rotation": _quat_list(Quaternion(axis=[0, 0, 1], angle=inst.yaw)),
               "prev": "", "next": "", "num_lidar_pts": int(counts[inst.token_key]), "num_radar_pts": 0}
        w.tables["sample_annotation"].append(rec)
        chains.setdefault(inst.token_key, []).append(rec)


def _finish_instances(w: _Writer, world: World, chains: dict[int, list[dict]], scene: int) -> None:
    """Link annotation chains and add the instance records."""
    for key, recs in sorted(chains.items()):
        _link(recs)
        w.tables["instance"].append({"token": _token(w.seed, "inst", scene, key),
                                     "category_token": w.cat_token[world.instances[key].category],
                                     "nbr_annotations": len(recs), "first_annotation_token": recs[0]["token"],
                                     "last_annotation_token": recs[-1]["token"]})


def make_nuscenes(out: pathlib.Path, seed: int = 0, size: str = "small") -> pathlib.Path:
    """Write a synthetic nuScenes dataset at `out` (version "v1.0-mini"), return `out`.

    Parameters
    ----------
    out : pathlib.Path
        Dataroot to create (existing files are overwritten).
    seed : int
        Seed of every random choice; equal seeds give byte-identical files.
    size : str
        A key of :data:`SIZES` ("small" or "medium").

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    out = pathlib.Path(out)
    sz = SIZES[size]
    if sz.n_scenes > len(SCENE_NAMES):
        raise ValueError(f"size {size!r}: {sz.n_scenes} scenes, but only {len(SCENE_NAMES)} scene names")
    w = _Writer(out, seed, sz)
    base_ts = 1_532_402_927_647_951 + seed * 86_400_000_000
    bar = tqdm(total=sz.n_scenes * sz.n_keyframes, desc=f"synth nuscenes ({size})", unit="keyframe")
    for sc in range(sz.n_scenes):
        world, traj = _scene_setup(seed, sc)
        tab = world.table()
        calib = w.calibrations(sc)
        scene_ts = base_ts + sc * 3_600_000_000
        logfile = f"n015-2018-07-{24 + sc:02d}-11-22-45+0800"
        log = {"token": _token(seed, "log", sc), "logfile": logfile, "vehicle": "n015",
               "date_captured": f"2018-07-{24 + sc:02d}", "location": "singapore-onenorth"}
        w.tables["log"].append(log)
        scene = {"token": _token(seed, "scene", sc), "log_token": log["token"], "nbr_samples": sz.n_keyframes,
                 "name": SCENE_NAMES[sc],
                 "description": f"synthetic street, radius {traj.road.radius:.0f} m, {traj.speed:.1f} m/s"}
        samples, chains = [], {}
        channel_chains: dict[str, list[dict]] = {}
        for kf in range(sz.n_keyframes):
            ts = scene_ts + kf * KEYFRAME_US
            sample = {"token": _token(seed, "sample", sc, kf), "timestamp": ts, "scene_token": scene["token"]}
            samples.append(sample)
            rng = np.random.default_rng([seed, sc, kf, 2])
            t_s = (ts - scene_ts) / 1e6
            pose = traj.pose(t_s)
            r_wl, o_l = _sensor_to_world(pose, calib["LIDAR_TOP"]["translation"], calib["LIDAR_TOP"]["rotation"])
            points, labels, inst = render_lidar(world, tab, sz, r_wl, o_l, rng)
            name = f"{logfile}__LIDAR_TOP__{ts}.pcd.bin"
            rec = w.sample_data((sc, kf, "LIDAR_TOP"), sample, calib["LIDAR_TOP"], ts, pose,
                                w.file(f"samples/LIDAR_TOP/{name}", points.tobytes()), False)
            channel_chains.setdefault("LIDAR_TOP", []).append(rec)
            seg = w.file(f"lidarseg/{VERSION}/{rec['token']}_lidarseg.bin", labels.astype(np.uint8).tobytes())
            w.tables["lidarseg"].append({"token": rec["token"], "sample_data_token": rec["token"], "filename": seg})
            _annotate(w, world, sample, pose[0], inst, chains, sc)
            for spec in CAMERAS:
                cts = ts + int(round(camera_offset_s(spec) * 1e6))
                cpose = traj.pose((cts - scene_ts) / 1e6)
                cal = calib[spec.channel]
                r_wc, o_c = _sensor_to_world(cpose, cal["translation"], cal["rotation"])
                img = render_camera(world, tab, spec, np.asarray(cal["camera_intrinsic"]), sz, r_wc, o_c, rng)
                fname = w.file(f"samples/{spec.channel}/{logfile}__{spec.channel}__{cts}.jpg", _jpeg_bytes(img))
                rec = w.sample_data((sc, kf, spec.channel), sample, cal, cts, cpose, fname, True)
                channel_chains.setdefault(spec.channel, []).append(rec)
            bar.update(1)
        _link(samples)
        for recs in channel_chains.values():
            _link(recs)
        _finish_instances(w, world, chains, sc)
        scene.update(first_sample_token=samples[0]["token"], last_sample_token=samples[-1]["token"])
        w.tables["scene"].append(scene)
        w.tables["sample"].extend(samples)
    bar.close()
    w.write_tables()
    return out
