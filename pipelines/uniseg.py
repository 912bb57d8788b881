"""The UniSeg pipeline: one sample per image -> patch features -> UniAP multi-granular pseudo-masks.

plan: every image file under ``source.root`` (JPEG, PNG, WebP, BMP, TIFF; recursive, sorted by relative
path; files named ``*.inst.png`` / ``*.sem.png`` are ground truth, not images), with its ground truth
when ``{stem}.inst.png`` / ``{stem}.sem.png`` lie beside it.
build (per shard, images in batches of ``stages.features.batch``): read the file
(``sensors.image_files``: EXIF, CMYK, 16-bit, alpha, size limit), resize to whole patches
(``preprocess.patch_features.grid_for``), features of the chosen backbone, UniAP
(``preprocess.uniap``, scipy or the batched torch path), and its fields (docs/reading.md).
See docs/uniseg.md for the layout, the backbones and the measured quality.

Sample key: the image's path relative to the root without its extension, every character outside
``[A-Za-z0-9_-]`` replaced by ``_`` (``a/b.c.jpg`` -> ``a_b_c``); a path that is not valid UTF-8 is keyed by the
percent-encoding of its bytes instead (``caf\xe9.jpg`` -> ``caf%E9``, ``sensors.listing.shard_key``); keys that
would collide get ``_`` + the first 8 hex digits of sha1(relative path's bytes) appended. Folders named like
images, symlink loops and unreadable files are rejected while planning, with the reason (``sensors.listing``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.pipelines.base import (
    Built,
    Demo,
    FieldSpec,
    Pipeline,
    Rejected,
    Rejection,
    Sample,
    SampleRef,
    batched,
    describe_exception,
)
from distillkit.pipelines.codecs import LABEL_IMAGE_SUFFIXES, SampleView, json_bytes, npy_bytes
from distillkit.pipelines.manifest import Key, Manifest, ManifestError, check_output_outside
from distillkit.pipelines.placement import DEVICES, run_stage
from distillkit.sensors.image_files import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    UNSUPPORTED_IMAGE_SUFFIXES,
    ImageFileError,
    apply_orientation,
    read_image_file,
)
from distillkit.sensors.images import decode_rgb, encode_labels_png
from distillkit.sensors.listing import Listing, list_inputs, printable, shard_key

IMAGE_FIELDS = ("image.jpg", "image.png", "image.webp", "image.bmp", "image.tif")
GT_SUFFIXES = {"inst": ".inst.png", "sem": ".sem.png"}

SCHEMA = {
    "source": {
        "kind": Key(str, "images", choices=("images", "image_dir"),
                    doc='"images": every image file under root ("image_dir" is accepted as the same thing)'),
        "root": Key("existing_path", required=True, doc="folder searched recursively for images"),
        "ground_truth": Key(bool, True, doc="store {stem}.inst.png / {stem}.sem.png found beside an image"),
        "ground_truth_on": Key(str, "displayed", choices=("displayed", "stored"),
                               doc="pixels the labels were drawn on for images with an EXIF orientation: "
                                   '"displayed" (as EXIF-aware viewers show them; a sideways label of the '
                                   'stored size is still turned) or "stored" (the file\'s raw pixels: every '
                                   "label is turned with its image)"),
    },
    "stages": {
        "image": {
            "max_pixels": Key(int, DEFAULT_MAX_PIXELS,
                              doc="images with more pixels are rejected (memory of a worker; decompression bombs)"),
        },
        "features": {
            "backbone": Key(str, "stats", choices=("stats", "vit"),
                            doc="stats = weight-free colour/texture features; vit = frozen ViT from checkpoint"),
            "checkpoint": Key("existing_path", None,
                              doc="ViT checkpoint file (DINO backbone, DINO training or uniseg trainer checkpoint)"),
            "feature": Key(str, "key", choices=("key", "feat"), doc="ViT last-block keys or output tokens"),
            "patch": Key(int, 8, doc="patch size of the stats backbone in px (a ViT's comes from its checkpoint)"),
            "max_side": Key(int, 448, doc="longer image side in px after resizing (grid = max_side / patch)"),
            "device": Key(str, "auto", choices=DEVICES,
                          doc='ViT, torch UniAP: "auto" = a GPU worker, else CUDA where the shard is built, else CPU'),
            "batch": Key(int, 16, doc="images per backbone / UniAP batch"),
        },
        "uniap": {
            "thresholds": Key(list, [0.8, 0.7, 0.6, 0.5, 0.4], doc="decreasing edge-score thresholds, one level each"),
            "min_size": Key(int, 4, doc="regions of fewer tokens are dropped (-1)"),
            "spatial_weight": Key(float, 0.0, doc="paper's spatial similarity weight (0 = released code)"),
            "update": Key(str, "sum", choices=("sum", "softmax"), doc="sum (released code) or softmax (paper Eq. 5)"),
            "semantic": Key(bool, False, doc="add semantic-pooling levels after the instance levels"),
            "backend": Key(str, "scipy", choices=("scipy", "torch"), doc="reference path or batched torch path"),
        },
    },
}


def image_key(rel: str) -> str:
    """The plan's key of an image (module docstring): the path without its extension (the whole path for a name
    such as ``.jpg``) as ``sensors.listing.shard_key`` keys it: ``a/b.c.jpg`` -> ``a_b_c``, or the
    percent-encoded bytes where that gives no valid key.

    Args:
        rel: path relative to the source root, as listed (PEP 383 ``str``).
    """
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return shard_key(stem or rel)


def list_images(root: Path) -> Listing:
    """Image files under ``root`` (recursive; label images excluded) and the entries named like images that
    cannot be read, sorted by relative path (``sensors.listing.list_inputs``).

    Args:
        root: the source folder.
    """
    return list_inputs(root, IMAGE_SUFFIXES + UNSUPPORTED_IMAGE_SUFFIXES, exclude=LABEL_IMAGE_SUFFIXES)


def find_images(root: Path) -> list[Path]:
    """The readable image files of :func:`list_images` that the pipeline can decode, as paths (for the benchmarks
    in ``bench/``; the plan uses :func:`list_images`, whose other entries it rejects with their reason).

    Args:
        root: the source folder.
    """
    return [Path(f.path) for f in list_images(root).files if not f.rel.lower().endswith(UNSUPPORTED_IMAGE_SUFFIXES)]


def ground_truth_of(image: Path) -> dict[str, str | None]:
    """``{"inst": path or None, "sem": path or None}`` beside ``image``.

    Args:
        image: the image file.
    """
    stem = image.name.rsplit(".", 1)[0]
    out: dict[str, str | None] = {}
    for kind, suffix in GT_SUFFIXES.items():
        p = image.with_name(stem + suffix)
        out[kind] = str(p) if p.is_file() else None
    return out


def read_label_png(path: str, shape: tuple[int, int], orientation: int = 1, notes: list[str] | None = None,
                   drawn_on: str = "displayed") -> bytes:
    """A ground-truth label image -> 8/16-bit single-channel PNG bytes (ids kept; palette PNGs as indices).

    Label files carry no EXIF tag. With ``drawn_on="displayed"`` a label of the displayed image's size is
    taken as drawn on the displayed image (what annotation tools that honour EXIF show), and one of the
    stored (unrotated) size of an image with a rotating EXIF orientation (5-8, not square) is turned with
    the image. Orientations 2-4 (mirrored, upside down) keep the size, so only the dataset can say which
    pixels its labels were drawn on: ``drawn_on="stored"`` turns every label with its image.

    Args:
        path: the label file.
        shape: (H, W) the image it belongs to decodes to (EXIF orientation applied).
        orientation: the EXIF orientation applied to the image.
        notes: where to say that the label was turned.
        drawn_on: ``"displayed"`` or ``"stored"`` (the manifest's ``source.ground_truth_on``).

    Raises:
        Rejected: unreadable, colour (not ids), or a size other than the image's.
    """
    from PIL import Image

    shown = printable(path)  # the name as index.json may hold it (sensors.listing)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
                raise Rejected("ground_truth", f"{shown}: mode {im.mode} is not a label image (ids, one channel)")
            arr = np.asarray(im)
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
        raise Rejected("ground_truth", f"{shown}: unreadable ({type(exc).__name__}: {exc})") from None
    if drawn_on not in ("displayed", "stored"):
        raise ValueError(f"drawn_on must be 'displayed' or 'stored', got {drawn_on!r}")
    stored_size = tuple(shape)[::-1] if orientation in (5, 6, 7, 8) else tuple(shape)
    sideways = arr.shape != tuple(shape) and orientation in (5, 6, 7, 8) and arr.shape == stored_size
    if orientation > 1 and (sideways or (drawn_on == "stored" and arr.shape == stored_size)):
        arr = apply_orientation(arr, orientation)
        if notes is not None:
            notes.append(f"{printable(Path(path).name)}: turned by EXIF orientation {orientation} (drawn on the "
                         "stored pixels)")
    if arr.shape != tuple(shape):
        raise Rejected("ground_truth", f"{shown}: {arr.shape[1]}x{arr.shape[0]} but the image is {shape[1]}x{shape[0]}")
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
        raise Rejected("ground_truth", f"{shown}: ids outside 0..65535")
    return encode_labels_png(arr.astype(np.int64))


class UnisegPipeline(Pipeline):
    name = "uniseg"
    units = ("images", "images")
    stat_units = {  # stats names them (Pipeline.stat_units)
        "tokens_per_image": "patch tokens per image",
        r"regions_per_image_level\d+": "UniAP regions per image at this level (mean)",
        r"dropped_fraction_(first|last)_level": "fraction of tokens dropped at this level",
        "images_with_ground_truth": "images with gt.inst.png or gt.sem.png",
        "images_reencoded": "images stored as a lossless PNG re-encoding instead of the original file",
    }
    schema = SCHEMA
    source_key = "source.root"
    demo = Demo(synth="images", manifest="demo-uniseg", size="medium")  # 200 images: docs/uniseg.md "The demo"

    def __init__(self) -> None:
        self._backbone: Any = None
        self._backbones: dict[str, Any] = {}

    # ---- manifest and plan (client) -------------------------------------------------
    def check_manifest(self, m: Manifest) -> None:
        check_output_outside(m, "source.root")
        f, u = m.data["stages"]["features"], m.data["stages"]["uniap"]
        if f["backbone"] == "vit" and not f["checkpoint"]:
            raise ManifestError(m.path, "stages.features.checkpoint",
                                "backbone = \"vit\" needs a local checkpoint file (nothing is downloaded)")
        for key in ("patch", "max_side", "batch"):
            if f[key] < 1:
                raise ManifestError(m.path, f"stages.features.{key}", "must be >= 1")
        if m.data["stages"]["image"]["max_pixels"] < 1:
            raise ManifestError(m.path, "stages.image.max_pixels", "must be >= 1")
        th = u["thresholds"]
        if not th or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in th):
            raise ManifestError(m.path, "stages.uniap.thresholds", "must be a non-empty list of numbers")
        if not all(-1.0 <= t <= 1.0 for t in th) or any(b >= a for a, b in zip(th, th[1:], strict=False)):
            raise ManifestError(m.path, "stages.uniap.thresholds",
                                f"must be strictly decreasing within [-1, 1], got {th}")
        if u["min_size"] < 1:
            raise ManifestError(m.path, "stages.uniap.min_size", "must be >= 1")
        if not 0.0 <= u["spatial_weight"] <= 1.0:
            raise ManifestError(m.path, "stages.uniap.spatial_weight", "must be in [0, 1]")

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        root = Path(m.data["source"]["root"])
        if not root.is_dir():
            raise ManifestError(m.path, "source.root", f"not a folder: {root}")
        try:
            listing = list_images(root)
        except OSError as exc:  # the root itself cannot be listed (no permission)
            why = printable(f"cannot list {root}: {exc.strerror or exc}")
            raise ManifestError(m.path, "source.root", why) from None
        rejected = [u.rejection() for u in listing.unusable]
        images = []
        for f in listing.files:
            if f.rel.lower().endswith(UNSUPPORTED_IMAGE_SUFFIXES):  # not read, but not skipped in silence
                suffix = "." + f.rel.rsplit(".", 1)[-1]
                rejected.append({"source": f.shown, "stage": "plan", "reason": f"{printable(f.path)}: {suffix} images "
                                 "are not supported; convert them to JPEG or PNG"})
            else:
                images.append(f)
        rejected.sort(key=lambda r: r["source"])
        rels = [f.rel for f in images]
        keys = [image_key(r) for r in rels]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        # os.fsencode: the path's bytes (its UTF-8 for a valid name, so keys of such names are as they were)
        keys = [k if counts[k] == 1 else f"{k}_{hashlib.sha1(os.fsencode(r)).hexdigest()[:8]}"
                for k, r in zip(keys, rels, strict=True)]
        use_gt = m.data["source"]["ground_truth"]
        ckpt = m.data["stages"]["features"]["checkpoint"]
        refs = []
        for f, key in zip(images, keys, strict=True):
            gt = ground_truth_of(Path(f.path)) if use_gt else {"inst": None, "sem": None}
            files = [f.path, *(g for g in gt.values() if g)] + ([str(ckpt)] if ckpt else [])
            # payload paths keep the name's bytes (PEP 383) to open it; source and rel are printable (index.json)
            refs.append(SampleRef(key, f.shown, {"image": f.path, "rel": f.shown, "gt": gt, "files": files}))
        return refs, rejected

    # ---- build (worker) ----------------------------------------------------------------
    def setup(self, m: Manifest) -> None:
        # Its patch size and description serve every worker; a ViT's weights are only read when a
        # torch stage first runs it (``partition``), on that stage's device, so a CPU worker whose
        # batches go to a GPU worker never builds the model, and a GPU worker builds it once.
        self._backbone = self._backbone_on(m.data["stages"]["features"], "cpu")

    def _backbone_on(self, f: dict[str, Any], device: str) -> Any:
        from distillkit.preprocess.patch_features import make_backbone

        if device not in self._backbones:
            self._backbones[device] = make_backbone(f["backbone"], f["checkpoint"], f["patch"], f["feature"], device)
        return self._backbones[device]

    def torch_stages(self, m: Manifest) -> dict[str, str]:
        f, u = m.data["stages"]["features"], m.data["stages"]["uniap"]
        stages = {"features": f["device"]} if f["backbone"] == "vit" else {}
        return stages | ({"uniap": f["device"]} if u["backend"] == "torch" else {})

    def partition(self, inputs: list[np.ndarray], f: dict[str, Any], cfg: Any, backend: str,
                  device: str) -> list[np.ndarray]:
        """Patch features and UniAP levels of a batch of images resized to whole patches: the
        torch stages (``pipelines.placement``), or plain CPU work when neither runs on torch."""
        from distillkit.preprocess.uniap import uniap, uniap_batch

        feats = self._backbone_on(f, device)(inputs)
        if backend == "torch":
            return uniap_batch(feats, cfg, device=device)
        return [uniap(x, cfg.thresholds, cfg.min_size, cfg.spatial_weight, cfg.update, cfg.semantic) for x in feats]

    def _load(self, ref: SampleRef, m: Manifest) -> dict[str, Any]:
        """Read one image (and its ground truth) and resize it to whole patches; raises ``Rejected``."""
        from distillkit.preprocess.patch_features import grid_for, resize_to_grid

        try:
            img = read_image_file(ref.payload["image"], m.data["stages"]["image"]["max_pixels"])
        except ImageFileError as exc:
            raise Rejected("image", printable(str(exc))) from None  # the name as it prints
        patch = self._backbone.patch
        H, W = img.rgb.shape[:2]
        if H < patch or W < patch:
            raise Rejected("image", f"{printable(ref.payload['image'])}: {W}x{H} is smaller than one {patch}x{patch} "
                                    "patch")
        grid = grid_for(H, W, patch, m.data["stages"]["features"]["max_side"])
        on = m.data["source"]["ground_truth_on"]
        gt = {k: read_label_png(p, (H, W), img.orientation, img.notes, on) for k, p in ref.payload["gt"].items() if p}
        return {"img": img, "grid": grid, "input": resize_to_grid(img.rgb, grid, patch), "gt": gt}

    def build_refs(self, refs: list[SampleRef], m: Manifest, raise_errors: bool = False) -> Iterator[Built]:
        from distillkit.preprocess.uniap import UniAPConfig

        if self._backbone is None:
            self.setup(m)
        f, u = m.data["stages"]["features"], m.data["stages"]["uniap"]
        stages = self.torch_stages(m)
        cfg = UniAPConfig(tuple(float(t) for t in u["thresholds"]), u["min_size"], u["spatial_weight"], u["update"],
                          semantic=u["semantic"])
        for chunk in batched(refs, f["batch"]):
            loaded: list[dict[str, Any] | Rejection] = []
            for ref in chunk:
                try:
                    loaded.append(self._load(ref, m))
                except Rejected as exc:
                    loaded.append(Rejection(ref.source, exc.stage, exc.reason))
                except Exception as exc:
                    if raise_errors:
                        raise
                    reason = printable(f"{ref.payload['image']}: {describe_exception(exc)}")
                    loaded.append(Rejection(ref.source, "image", reason))
            good = [x for x in loaded if not isinstance(x, Rejection)]
            inputs = [x["input"] for x in good]
            if not good:
                parts = []
            elif stages:
                parts = run_stage(m, tuple(stages), "partition", inputs, f, cfg, u["backend"], device=f["device"])
            else:
                parts = self.partition(inputs, f, cfg, u["backend"], device="cpu")
            it = iter(zip(good, parts, strict=True))
            for ref, item in zip(chunk, loaded, strict=True):
                if isinstance(item, Rejection):
                    yield item
                    continue
                x, levels = next(it)
                yield Sample(ref.key, self._fields(ref, x, levels, cfg, u["backend"]), ref.source)

    def _fields(self, ref: SampleRef, x: dict[str, Any], levels: np.ndarray, cfg: Any,
                backend: str = "scipy") -> dict[str, bytes]:
        img = x["img"]
        H, W = img.rgb.shape[:2]
        out = {f"image.{img.ext}": img.data, "uniap.npy": npy_bytes(levels.astype(np.int32))}
        meta = {
            "source": ref.payload["rel"],
            "image_size": [H, W],
            "grid": list(x["grid"]),
            "patch": self._backbone.patch,
            "input_size": [int(x["input"].shape[0]), int(x["input"].shape[1])],
            "backbone": self._backbone.describe(),
            "thresholds": list(cfg.thresholds),
            "levels": cfg.level_names(),
            "regions": [int(lvl.max(initial=-1)) + 1 for lvl in levels],
            "min_size": cfg.min_size,
            "spatial_weight": cfg.spatial_weight,
            "update": cfg.update,
            # every UniAP option, so that a shard says how its partitions were made (both paths run float64:
            # ``partition`` calls them with their default dtype)
            "sigma": cfg.sigma,
            "semantic": cfg.semantic,
            "backend": backend,
            "dtype": "float64",
            "stored": "re-encoded png" if img.reencoded else "original",
            "notes": img.notes,
            "image_mode": img.mode,
        }
        out["uniap.json"] = json_bytes(meta)
        for kind, data in x["gt"].items():
            out[f"gt.{kind}.png"] = data
        return out

    # ---- schema ------------------------------------------------------------------------
    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        present = [n for n in IMAGE_FIELDS if n in sample]
        if len(present) > 1:
            raise ValueError(f"more than one image field: {present}")
        image_field = present[0] if present else "image.jpg"
        return {
            image_field: FieldSpec("the image file's bytes (or a lossless PNG re-encoding, see uniap.json)",
                                   check=_check_image),
            "uniap.npy": FieldSpec("int32 (L, h, w) UniAP partitions, -1 = dropped", check=_check_uniap),
            "uniap.json": FieldSpec("thresholds, levels, patch, grid, image size, backbone, region counts",
                                    check=_check_meta),
            "gt.inst.png": FieldSpec("ground-truth instance ids (0 = background)", required=False,
                                     check=_check_gt),
            "gt.sem.png": FieldSpec("ground-truth semantic classes", required=False, check=_check_gt),
        }

    # ---- statistics --------------------------------------------------------------------
    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        levels = sample["uniap.npy"]
        st: dict[str, float] = {
            "samples": 1.0,
            "tokens": float(levels[0].size),
            "dropped_tokens_first": float((levels[0] < 0).sum()),
            "dropped_tokens_last": float((levels[-1] < 0).sum()),
            "with_gt": float("gt.inst.png" in sample or "gt.sem.png" in sample),
            "reencoded": float(sample["uniap.json"].get("stored") != "original"),
        }
        for i, lvl in enumerate(levels):
            st[f"regions_level{i}"] = float(lvl.max(initial=-1) + 1)
        return st

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("samples", 0.0)
        if not n:
            return {}
        out = {"samples": n, "tokens_per_image": totals["tokens"] / n,
               "dropped_fraction_first_level": totals["dropped_tokens_first"] / max(totals["tokens"], 1.0),
               "dropped_fraction_last_level": totals["dropped_tokens_last"] / max(totals["tokens"], 1.0),
               "images_with_ground_truth": totals["with_gt"], "images_reencoded": totals["reencoded"]}
        for k, v in totals.items():
            if k.startswith("regions_level"):
                out[k.replace("regions_", "regions_per_image_")] = v / n
        return out

    # ---- picture -----------------------------------------------------------------------
    def render(self, sample: SampleView) -> Any:
        from distillkit.pipelines.render_uniseg import render_uniseg

        return render_uniseg(sample)


def image_field(sample: SampleView | dict[str, Any]) -> str:
    """The name of a sample's image field.

    Args:
        sample: a stored sample (any mapping of field names).
    """
    for name in IMAGE_FIELDS:
        if name in sample:
            return name
    raise KeyError(f"no image field (one of {', '.join(IMAGE_FIELDS)})")


def _check_image(data: bytes, sample: SampleView) -> None:
    rgb = decode_rgb(data)
    size = list(sample["uniap.json"]["image_size"])
    if list(rgb.shape[:2]) != size:
        raise ValueError(f"decodes to {rgb.shape[1]}x{rgb.shape[0]}, uniap.json says {size[1]}x{size[0]}")


def _check_meta(meta: Any, sample: SampleView) -> None:
    need = ("image_size", "grid", "patch", "thresholds", "levels", "regions", "backbone")
    if not isinstance(meta, dict) or any(k not in meta for k in need):
        raise ValueError(f"expected an object with {', '.join(need)}")
    if len(meta["levels"]) != len(meta["regions"]):
        raise ValueError("levels and regions differ in length")


def _check_uniap(levels: np.ndarray, sample: SampleView) -> None:
    meta = sample["uniap.json"]
    if not isinstance(levels, np.ndarray) or levels.dtype != np.int32 or levels.ndim != 3:
        raise ValueError(f"expected int32 (L, h, w), got {getattr(levels, 'dtype', '?')} {np.shape(levels)}")
    if list(levels.shape[1:]) != list(meta["grid"]):
        raise ValueError(f"grid {levels.shape[1:]} differs from uniap.json {meta['grid']}")
    if levels.shape[0] != len(meta["levels"]):
        raise ValueError(f"{levels.shape[0]} levels, uniap.json names {len(meta['levels'])}")
    for i, lvl in enumerate(levels):
        if lvl.min(initial=0) < -1:
            raise ValueError(f"level {i}: labels below -1")
        ids = np.unique(lvl[lvl >= 0])
        if len(ids) != meta["regions"][i] or (len(ids) and ids[-1] != len(ids) - 1):
            raise ValueError(f"level {i}: labels are not 0..{meta['regions'][i] - 1}")


def _check_gt(labels: np.ndarray, sample: SampleView) -> None:
    size = list(sample["uniap.json"]["image_size"])
    if list(labels.shape) != size:
        raise ValueError(f"shape {labels.shape}, image is {size[0]}x{size[1]}")


