"""The SLidR pipeline: one sample per nuScenes keyframe.

plan: nuscenes-devkit tables -> ``KeyframeRef`` per keyframe of the scenes selected by
``source.split`` / ``source.scenes`` (on the client), then a seeded permutation of all of them
(``output.shuffle``), so every shard is a random draw from the whole dataset.
build: lidar ``.pcd.bin`` + six JPEGs -> projection pairs + SLIC superpixels (on workers).
Schema and picture: ``fields`` and ``render``; see docs/reading.md for the field contract and
docs/decisions.md ("SLidR splits and shuffling") for the additions.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from distillkit.pipelines.base import Demo, FieldSpec, Pipeline, Rejected, SampleRef
from distillkit.pipelines.codecs import SampleView, json_bytes, npy_bytes
from distillkit.pipelines.manifest import Key, Manifest, ManifestError, check_output_outside
from distillkit.pipelines.placement import DEVICES, run_stage
from distillkit.pipelines.schema import check_jpeg, expect_array
from distillkit.preprocess.projection import project_points
from distillkit.preprocess.superpixels import BACKENDS as SP_BACKENDS
from distillkit.preprocess.superpixels import slic_superpixels_batch
from distillkit.sensors.images import decode_rgb, encode_labels_png
from distillkit.sensors.nuscenes_reader import CAMERAS, DatasetError, load_nuscenes, plan_keyframes, read_lidar_bin
from distillkit.sensors.nuscenes_splits import SPLIT_NAMES, split_scenes

SCHEMA = {
    "source": {
        "kind": Key(str, "nuscenes", choices=("nuscenes",)),
        "dataroot": Key("existing_path", required=True),
        "version": Key(str, "v1.0-mini"),
        "split": Key(str, "all", choices=SPLIT_NAMES,
                     doc='nuscenes-devkit split (train, val, mini_train, ...), "pretrain" (SLidR: train minus '
                         'its 100 held-out scenes), "pretrain_val" (those 100) or "all"'),
        "scenes": Key(list, [], doc="scene names, each in source.split; [] = every scene of the split"),
    },
    "stages": {
        "projection": {"min_dist": Key(float, 1.0)},
        "superpixels": {
            "n_segments": Key(int, 150),
            "compactness": Key(float, 6.0),
            "sigma": Key(float, 3.0),
            "backend": Key(str, "skimage", choices=SP_BACKENDS,
                           doc='"skimage" (the reference, CPU) or "torch" (same algorithm, batched over a '
                               "keyframe's cameras; fused Triton kernel on CUDA; see docs/superpixels.md)"),
            "device": Key(str, "auto", choices=DEVICES,
                          doc='torch backend only: "auto" (CUDA when the worker has it), "cpu" or "cuda"'),
        },
    },
    "output": {
        "shuffle": Key(bool, True, doc="shards hold keyframes in a seeded random order over the whole "
                                       "dataset (false: scene order, then time)"),
        "shuffle_seed": Key(int, 0, doc="seed of that order; the same seed gives the same shards"),
    },
}


class SlidrPipeline(Pipeline):
    name = "slidr"
    units = ("keyframes", "keyframes")
    stat_units = {  # stats names them (Pipeline.stat_units)
        "intensity_mean": "lidar intensity (as stored) over all points",
        "intensity_std": "lidar intensity (as stored) over all points",
        "points_per_sample": "lidar points per sample (mean)",
        "pairs_per_sample": "point-pixel pairs per sample (mean)",
        "superpixels_per_image": "superpixels per camera image (mean)",
    }
    schema = SCHEMA
    source_key = "source.dataroot"
    demo = Demo(synth="nuscenes", manifest="demo-slidr")

    # ---- manifest and plan (client) -------------------------------------------------
    def check_manifest(self, m: Manifest) -> None:
        check_output_outside(m, "source.dataroot")
        sp = m.data["stages"]["superpixels"]
        if sp["n_segments"] < 1:
            raise ManifestError(m.path, "stages.superpixels.n_segments", "must be >= 1")
        if not all(isinstance(s, str) for s in m.data["source"]["scenes"]):
            raise ManifestError(m.path, "source.scenes", "must be a list of scene names")

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        src, out = m.data["source"], m.data["output"]
        try:
            nusc = load_nuscenes(src["dataroot"], src["version"])
            scenes = select_scenes(sorted(s["name"] for s in nusc.scene), src["split"], src["scenes"])
            keyframes, rejected = plan_keyframes(nusc, scenes)
        except SceneSelectionError as exc:
            raise ManifestError(m.path, exc.key, exc.reason) from None
        except DatasetError as exc:
            raise ManifestError(m.path, "source", str(exc)) from None
        refs = [SampleRef(kf.sample_token, f"{kf.scene}/sample/{kf.sample_token}", kf.to_payload())
                for kf in keyframes]
        if out["shuffle"]:
            refs = shuffle_refs(refs, out["shuffle_seed"])
        return refs, rejected

    # ---- build (worker) ----------------------------------------------------------------
    def input_files(self, ref: SampleRef) -> list[str]:
        kf = ref.payload
        files = [kf["lidar_path"], *(c["path"] for c in kf["cameras"])]
        return files + ([kf["lidarseg_path"]] if kf.get("lidarseg_path") else [])

    def torch_stages(self, m: Manifest) -> dict[str, str]:
        sp = m.data["stages"]["superpixels"]
        return {"superpixels": sp["device"]} if sp["backend"] == "torch" else {}

    def superpixels(self, images: list[np.ndarray], params: dict[str, Any], device: str) -> list[np.ndarray]:
        """The torch superpixel stage (``pipelines.placement``): label maps of one keyframe's cameras."""
        return slic_superpixels_batch(images, **{**params, "device": device})

    def build(self, ref: SampleRef, m: Manifest) -> dict[str, bytes]:
        kf = ref.payload
        stages = m.data["stages"]
        try:
            points = read_lidar_bin(kf["lidar_path"])
        except (OSError, ValueError) as exc:
            raise Rejected("lidar", f"{kf['lidar_path']}: {exc}") from None
        cams = kf["cameras"]
        out: dict[str, bytes] = {"lidar.npy": npy_bytes(np.ascontiguousarray(points[:, :4]))}
        jpegs, images = [], []
        for cam in cams:
            try:
                with open(cam["path"], "rb") as f:
                    jpeg = f.read()
                image = decode_rgb(jpeg)
            except (OSError, ValueError) as exc:
                raise Rejected("image", f"{cam['channel']} {cam['path']}: {exc}") from None
            if image.shape[:2] != (cam["height"], cam["width"]):
                raise Rejected("image", f"{cam['channel']}: image is {image.shape[1]}x{image.shape[0]}, "
                                        f"table says {cam['width']}x{cam['height']}")
            jpegs.append(jpeg)
            images.append(image)
        sp = stages["superpixels"]
        if sp["backend"] == "torch":  # all cameras as one batch, on a GPU worker when the cluster has one
            label_maps = run_stage(m, "superpixels", "superpixels", images, sp, device=sp["device"])
        else:
            label_maps = slic_superpixels_batch(images, **sp)
        for i, labels in enumerate(label_maps):
            out[f"cam{i}.jpg"] = jpegs[i]
            out[f"cam{i}.sp.png"] = encode_labels_png(labels)
        pairs = project_points(
            points,
            np.array([c["T_cam_lidar"] for c in cams]),
            np.array([c["K"] for c in cams]),
            np.array([[c["width"], c["height"]] for c in cams]),
            min_dist=stages["projection"]["min_dist"],
        )
        out["pairs.npy"] = npy_bytes(pairs.index)
        out["pairs_uvd.npy"] = npy_bytes(pairs.uvd)
        out["cams.json"] = json_bytes([
            {k: c[k] for k in ("channel", "sample_data_token", "width", "height", "K", "T_cam_lidar")}
            for c in cams
        ])
        # Which scene and when: the probe splits by scene and the trainer filters by split;
        # a sample's key (its token) alone cannot tell, and shards are no longer in scene order.
        meta = {"scene": kf["scene"], "timestamp": kf["timestamp"]}
        if kf.get("scene_index", -1) >= 0:  # position in the scene table: eval's N% subset follows it
            meta["scene_index"] = kf["scene_index"]
        out["meta.json"] = json_bytes(meta)
        if kf.get("lidarseg_path"):
            try:
                seg = np.fromfile(kf["lidarseg_path"], dtype=np.uint8)
            except OSError as exc:
                raise Rejected("lidarseg", f"{kf['lidarseg_path']}: {exc}") from None
            if len(seg) != len(points):
                raise Rejected("lidarseg", f"{len(seg)} labels for {len(points)} points")
            out["lidarseg.npy"] = npy_bytes(seg)
        return out

    # ---- schema ------------------------------------------------------------------------
    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        n_cams = len(CAMERAS)
        if "cams.json" in sample:
            try:
                n_cams = len(sample["cams.json"])
            except (ValueError, TypeError):
                pass
        specs = {
            "lidar.npy": FieldSpec("float32 (N,4) x,y,z,intensity", check=_check_lidar),
            "cams.json": FieldSpec("camera records", check=_check_cams),
            "pairs.npy": FieldSpec("int32 (M,4) point,cam,row,col", check=_check_pairs),
            "pairs_uvd.npy": FieldSpec("float32 (M,3) u,v,depth", check=_check_uvd),
            "lidarseg.npy": FieldSpec("uint8 (N,) lidarseg class", required=False, check=_check_seg),
            # Optional so that shards written before it stay valid; every build writes it.
            "meta.json": FieldSpec('{"scene", "timestamp", "scene_index"}: scene name, LIDAR_TOP timestamp (us), '
                                   "the scene's position in the dataset's scene table (absent in older builds)",
                                   required=False, check=_check_meta),
        }
        for i in range(n_cams):
            specs[f"cam{i}.jpg"] = FieldSpec("original JPEG", check=check_jpeg)
            specs[f"cam{i}.sp.png"] = FieldSpec("superpixel labels PNG", check=_sp_checker(i))
        return specs

    # ---- statistics --------------------------------------------------------------------
    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        lidar = sample["lidar.npy"]
        pairs = sample["pairs.npy"]
        n_cams = len(sample["cams.json"])
        n_sp = sum(int(sample[f"cam{i}.sp.png"].max()) + 1 for i in range(n_cams))
        inten = lidar[:, 3].astype(np.float64)
        return {
            "samples": 1,
            "points": len(lidar),
            "pairs": len(pairs),
            "images": n_cams,
            "superpixels": n_sp,
            "intensity_sum": float(inten.sum()),
            "intensity_sqsum": float((inten**2).sum()),
        }

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("samples", 0.0)
        if not n:
            return {}
        pts = totals["points"]
        mean = totals["intensity_sum"] / pts if pts else 0.0
        var = totals["intensity_sqsum"] / pts - mean**2 if pts else 0.0
        return {
            "samples": n,
            "points_per_sample": pts / n,
            "pairs_per_sample": totals["pairs"] / n,
            "superpixels_per_image": totals["superpixels"] / totals["images"],
            "intensity_mean": mean,
            "intensity_std": float(np.sqrt(max(var, 0.0))),
        }

    # ---- picture -----------------------------------------------------------------------
    def render(self, sample: SampleView) -> Any:
        from distillkit.pipelines.render_slidr import render_slidr

        return render_slidr(sample)


class SceneSelectionError(ValueError):
    """``source.split`` / ``source.scenes`` select no usable scene; ``key`` names the manifest key."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def select_scenes(available: list[str], split: str, scenes: list[str]) -> list[str]:
    """The scenes to plan: an explicit list (each of which must lie in ``split``), else every
    available scene of ``split``, in name order.

    A listed scene outside the split is an error rather than silently dropped: the split is what
    keeps evaluation scenes out of pretraining, and a list that contradicts it is a mistake.

    Args:
        available: the dataset's scene names.
        split: a split name (``distillkit.sensors.nuscenes_splits``); ``"all"`` selects every scene.
        scenes: the manifest's ``source.scenes`` ([] = the whole split).

    Raises:
        SceneSelectionError: a listed scene is outside the split, or the split holds none of the
            dataset's scenes.
    """
    chosen = split_scenes(split)
    if scenes:
        outside = [s for s in scenes if chosen is not None and s not in chosen]
        if outside:
            raise SceneSelectionError("source.scenes", f"not in split {split!r}: {', '.join(outside)} "
                                                       '(set source.split = "all" to list any scene)')
        return list(scenes)
    picked = [s for s in available if chosen is None or s in chosen]
    if not picked:
        raise SceneSelectionError("source.split", f"none of the dataset's {len(available)} scenes is in split "
                                                  f"{split!r}")
    return picked


def shuffle_refs(refs: list[SampleRef], seed: int) -> list[SampleRef]:
    """``refs`` in a seeded pseudo-random order: sorted by ``sha256(f"{seed}/{key}")``.

    A uniform random permutation for distinct keys, computed from nothing but the seed and each
    key: it does not depend on Python's or numpy's generators (whose streams may change between
    versions), on the executor or on the worker count, and selecting fewer scenes keeps the
    relative order of the keyframes that remain.

    Args:
        refs: the planned refs (keys unique).
        seed: ``output.shuffle_seed``.
    """
    return sorted(refs, key=lambda r: hashlib.sha256(f"{seed}/{r.key}".encode()).digest())


def _check_meta(meta: Any, sample: SampleView) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("scene"), str) or not meta["scene"]:
        raise ValueError('expected {"scene": non-empty name, "timestamp": int}')
    ts = meta.get("timestamp")
    if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
        raise ValueError(f"timestamp must be a non-negative integer (microseconds), got {ts!r}")
    idx = meta.get("scene_index")
    if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
        raise ValueError(f"scene_index must be a non-negative integer (scene-table position), got {idx!r}")


def _check_lidar(lidar: np.ndarray, sample: SampleView) -> None:
    expect_array(lidar, "float32", 2, 4)


def _check_cams(cams: Any, sample: SampleView) -> None:
    if not isinstance(cams, list) or not cams:
        raise ValueError("expected a non-empty list")
    for c in cams:
        if np.asarray(c["K"]).shape != (3, 3) or np.asarray(c["T_cam_lidar"]).shape != (4, 4):
            raise ValueError(f"{c.get('channel')}: K must be 3x3 and T_cam_lidar 4x4")


def _check_pairs(pairs: np.ndarray, sample: SampleView) -> None:
    expect_array(pairs, "int32", 2, 4)
    n_points = len(sample["lidar.npy"])
    cams = sample["cams.json"]
    if len(pairs) == 0:
        return
    if pairs[:, 0].min() < 0 or pairs[:, 0].max() >= n_points:
        raise ValueError("point index out of range")
    if pairs[:, 1].min() < 0 or pairs[:, 1].max() >= len(cams):
        raise ValueError("camera index out of range")
    h = np.array([c["height"] for c in cams])[pairs[:, 1]]
    w = np.array([c["width"] for c in cams])[pairs[:, 1]]
    rows, cols = pairs[:, 2], pairs[:, 3]
    if (rows < 0).any() or (rows >= h).any() or (cols < 0).any() or (cols >= w).any():
        raise ValueError("pixel outside its image")
    order = pairs[:, 1].astype(np.int64) * (n_points + 1) + pairs[:, 0]
    if (np.diff(order) < 0).any():
        raise ValueError("pairs not sorted by camera then point")


def _check_uvd(uvd: np.ndarray, sample: SampleView) -> None:
    expect_array(uvd, "float32", 2, 3)
    if len(uvd) != len(sample["pairs.npy"]):
        raise ValueError("row count differs from pairs.npy")


def _check_seg(seg: np.ndarray, sample: SampleView) -> None:
    expect_array(seg, "uint8", 1)
    if len(seg) != len(sample["lidar.npy"]):
        raise ValueError("length differs from lidar.npy")


def _sp_checker(i: int):
    def check(labels: np.ndarray, sample: SampleView) -> None:
        cam = sample["cams.json"][i]
        if labels.shape != (cam["height"], cam["width"]):
            raise ValueError(f"shape {labels.shape}, image is {cam['height']}x{cam['width']}")
        present = np.bincount(labels.ravel()) > 0
        if not present.all():
            raise ValueError("labels are not contiguous from 0")

    return check
