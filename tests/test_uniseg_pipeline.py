"""The uniseg pipeline: source layout, keys, ground truth, backends, bad input (issue 12, items 1, 5, 9)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import load_index
from distillkit.pipelines.uniseg import image_key, list_images
from distillkit.preprocess.patch_features import ViTBackbone, grid_for
from distillkit.preprocess.vit import vit
from distillkit.sensors.image_files import read_image_file
from distillkit.sensors.synth.images import make_images
from distillkit.train.streaming import ShardStream


def manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-uniseg", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         "output.max_rejected=1.0", *extra])


def samples(shards: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in ShardStream(shards, epochs=1, shuffle_shards=False)}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("synth") / "images", seed=1)


def test_keys_and_source_layout(tmp_path):
    assert image_key("a/b.c.jpg") == "a_b_c" and image_key("x y/z.PNG") == "x_y_z" and image_key("noext") == "noext"
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    rgb = np.full((24, 32, 3), 100, np.uint8)
    for name in ("a.jpg", "a.png", "sub/b.webp", "c.tiff", "c.sem.png", "notes.txt", "sub/phone.HEIC"):
        p = root / name
        if name.endswith((".txt", ".HEIC")):
            p.write_text("x")
        elif name.endswith(".sem.png"):
            cv2.imwrite(str(p), np.zeros((24, 32), np.uint8))
        else:
            Image.fromarray(rgb).save(p)
    # what the plan lists: label images left out, unsupported formats listed (and rejected below), paths as keyed
    assert [f.rel for f in list_images(root).files] == ["a.jpg", "a.png", "c.tiff", "sub/b.webp", "sub/phone.HEIC"]
    m = manifest(root, tmp_path / "out")
    refs, rejected = manifest_plan(m)
    # not read, but not skipped in silence either
    assert [(r["source"], r["stage"]) for r in rejected] == [("sub/phone.HEIC", "plan")]
    assert "convert them to JPEG or PNG" in rejected[0]["reason"]
    keys = [r.key for r in refs]
    assert keys[2:] == ["c", "sub_b"] and keys[0].startswith("a_") and keys[1].startswith("a_") and keys[0] != keys[1]
    assert refs[2].payload["gt"]["sem"] is not None and refs[2].payload["gt"]["inst"] is None
    # the source kind "image_dir" is accepted as "images"
    assert manifest(root, tmp_path / "o2", 'source.kind="image_dir"').data["source"]["kind"] == "image_dir"


def manifest_plan(m):
    from distillkit.pipelines.registry import get_pipeline

    return get_pipeline("uniseg").plan(m)


def test_build_fields_ground_truth_and_backends_agree(synth, tmp_path):
    """scipy and torch UniAP write identical partitions and metadata (but the backend each records); fields
    follow the schema; ground truth is stored; uniap.json records every UniAP option."""
    root = tmp_path / "few"
    root.mkdir()
    for p in sorted((synth / "images").iterdir())[:24]:  # 8 images of several formats, with their labels
        (root / p.name).write_bytes(p.read_bytes())
    a = build(manifest(root, tmp_path / "a"), progress=False)
    build(manifest(root, tmp_path / "b", 'stages.uniap.backend="torch"'), progress=False)
    assert a.written == 8 and not a.rejected
    assert verify(tmp_path / "a").ok
    sa, sb = samples(tmp_path / "a"), samples(tmp_path / "b")
    assert sa.keys() == sb.keys()
    for key, s in sa.items():
        meta, other = s["uniap.json"], sb[key]["uniap.json"]
        assert (meta["backend"], other["backend"]) == ("scipy", "torch")
        assert {**meta, "backend": "torch"} == other
        np.testing.assert_array_equal(s["uniap.npy"], sb[key]["uniap.npy"])
        assert {k: meta[k] for k in ("thresholds", "min_size", "spatial_weight", "update", "sigma", "semantic",
                                     "dtype")} == {"thresholds": [0.8, 0.7, 0.6, 0.5, 0.4], "min_size": 4,
                                                   "spatial_weight": 0.0, "update": "sum", "sigma": 0.07,
                                                   "semantic": False, "dtype": "float64"}
        image_name = next(n for n in s if n.startswith("image."))
        assert s[image_name].shape[:2] == tuple(meta["image_size"])
        src = root / meta["source"]
        assert (root / meta["source"]).read_bytes() == bytes(load_raw(tmp_path / "a", key, image_name))
        lv = s["uniap.npy"]
        assert lv.dtype == np.int32 and lv.shape == (5, *meta["grid"])
        assert tuple(meta["grid"]) == grid_for(*meta["image_size"], 8, 128)
        inst = cv2.imread(str(src.with_name(src.name.rsplit(".", 1)[0] + ".inst.png")), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(s["gt.inst.png"], inst)
        assert s["gt.sem.png"].shape == inst.shape


def load_raw(shards: Path, key: str, name: str) -> bytes:
    return next(s for s in ShardStream(shards, epochs=1, shuffle_shards=False, images="raw")
                if s["__key__"] == key)[name]


def test_vit_backbone_from_checkpoint(synth, tmp_path):
    """A DINO-layout checkpoint file as backbone; keys and output tokens both give (h, w, D) grids."""
    torch.manual_seed(0)
    net = vit("tiny", patch=8, img_size=64)
    ckpt = tmp_path / "dino_tiny.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in net.state_dict().items()}}, ckpt)
    rgb = np.zeros((40, 56, 3), np.uint8)
    for feature in ("key", "feat"):
        bb = ViTBackbone(ckpt, feature=feature)
        # the description comes from the checkpoint's shapes; the model is built at the first call
        assert bb.describe() | {"feature": None} == {"kind": "vit", "patch": 8, "channels": 96, "depth": 4,
                                                     "heads": 3, "feature": None, "checkpoint": "dino_tiny.pth"}
        assert bb._model is None
        f = bb([rgb])[0]
        assert bb._model is not None and bb.model.num_heads == 3
        assert f.shape == (5, 7, 96) and np.isfinite(f).all()
    root = tmp_path / "two"
    root.mkdir()
    for p in sorted((synth / "images").glob("scene_000[01].*")):
        (root / p.name).write_bytes(p.read_bytes())
    res = build(manifest(root, tmp_path / "out", 'stages.features.backbone="vit"',
                         f'stages.features.checkpoint="{ckpt}"'), progress=False)
    assert res.written == 2
    meta = next(iter(samples(tmp_path / "out").values()))["uniap.json"]
    assert meta["backbone"]["kind"] == "vit" and meta["backbone"]["checkpoint"] == "dino_tiny.pth"


def _built_models(_: int) -> list[str]:
    """The devices of the ViT models this worker process has built for uniseg pipelines."""
    from distillkit.pipelines.placement import _READY

    return sorted(str(bb.device) for p in _READY.values() for bb in getattr(p, "_backbones", {}).values()
                  if getattr(bb, "_model", None) is not None)


def test_vit_is_built_only_where_its_stage_runs(synth, tmp_path):
    """With a GPU worker in the cluster, the CPU worker that reads and writes the shards reads the
    checkpoint's shapes for the metadata but never builds the ViT; the GPU worker builds it once."""
    from distillkit.pipelines.executor import dask_client

    torch.manual_seed(0)
    ckpt = tmp_path / "dino_tiny.pth"
    torch.save(vit("tiny", patch=8, img_size=64).state_dict(), ckpt)
    root = tmp_path / "three"
    root.mkdir()
    for p in sorted((synth / "images").glob("scene_000[012].*")):
        (root / p.name).write_bytes(p.read_bytes())
    m = manifest(root, tmp_path / "out", 'stages.features.backbone="vit"', f'stages.features.checkpoint="{ckpt}"',
                 "stages.features.batch=1")
    with dask_client("", workers=1, gpu_workers=1) as client:
        res = build(m, scheduler=client.scheduler.address, progress=False)
        workers = client.scheduler_info()["workers"]
        built = {bool(w.get("resources", {}).get("GPU")): client.submit(_built_models, 0, workers=[a], pure=False)
                 .result() for a, w in workers.items()}
    assert res.written == 3
    assert built[False] == [], "the CPU worker must not build the ViT"
    assert built[True] == ["cuda" if torch.cuda.is_available() else "cpu"], built


def write_bad_inputs(root: Path) -> dict[str, str]:
    """One file per kind of bad or unusual input; returns name -> expected outcome."""
    rng = np.random.default_rng(0)
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    rgb[:16, :24] = (250, 20, 20)
    Image.fromarray(rgb).save(root / "plain.jpg", quality=90)
    b = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(b[: len(b) // 2])
    (root / "garbage.png").write_bytes(b"\x89PNG not really")
    (root / "empty.webp").write_bytes(b"")
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    cv2.imwrite(str(root / "deep16.png"), (rng.random((48, 64)) * 65535).astype(np.uint16))
    Image.fromarray(np.dstack([rgb, np.full((48, 64), 128, np.uint8)])).save(root / "alpha.png")
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    im.save(root / "rotated.jpg", exif=exif.tobytes(), quality=90)
    Image.fromarray(rgb[:6, :40]).save(root / "tiny.png")  # 6 px high: less than one 8 px patch
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(root / "huge.png")  # over max_pixels below
    Image.fromarray(rgb).save(root / "badgt.png")
    cv2.imwrite(str(root / "badgt.sem.png"), np.zeros((10, 10), np.uint8))  # wrong size
    return {"plain.jpg": "ok", "truncated.jpg": "truncated", "garbage.png": "not a readable image",
            "empty.webp": "empty file", "gray.png": "ok", "cmyk.jpg": "ok", "deep16.png": "ok", "alpha.png": "ok",
            "rotated.jpg": "ok", "tiny.png": "smaller than one 8x8 patch", "huge.png": "exceeds the limit",
            "badgt.png": "but the image is 64x48"}


def test_bad_inputs_are_handled_or_rejected_by_name(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    expect = write_bad_inputs(root)
    out = tmp_path / "out"
    res = build(manifest(root, out, "stages.image.max_pixels=100000"), progress=False)
    rejected = {r["source"]: r["reason"] for r in load_index(out)["rejected"]}
    for name, outcome in expect.items():
        if outcome == "ok":
            assert name not in rejected, rejected.get(name)
        else:
            reason = rejected[name]  # names the file (the ground truth's, for bad ground truth)
            assert outcome in reason and Path(name).stem in reason, (name, reason)
    assert res.written == sum(v == "ok" for v in expect.values())
    assert verify(out).ok
    got = {s["uniap.json"]["source"]: s for s in samples(out).values()}
    # EXIF orientation applied: portrait, and the patch grid follows it
    rot = got["rotated.jpg"]
    assert rot["image.jpg"].shape == (64, 48, 3) and rot["uniap.npy"].shape[1:] == tuple(grid_for(64, 48, 8, 128))
    assert any("EXIF" in n for n in rot["uniap.json"]["notes"])
    # the stored pixels equal the upright source (decoded with Pillow's own transpose)
    from PIL import ImageOps

    upright = np.asarray(ImageOps.exif_transpose(Image.open(root / "rotated.jpg")).convert("RGB")).astype(int)
    assert np.abs(rot["image.jpg"].astype(int) - upright).mean() < 3
    for name, note in (("gray.png", "grayscale"), ("cmyk.jpg", "CMYK"), ("deep16.png", "16-bit"),
                       ("alpha.png", "alpha")):
        s = got[name]
        assert any(note in n for n in s["uniap.json"]["notes"]), s["uniap.json"]["notes"]
        image_name = next(n for n in s if n.startswith("image."))
        assert s[image_name].shape == (48, 64, 3)
    deep = cv2.imread(str(root / "deep16.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(got["deep16.png"]["image.png"][..., 0], (deep >> 8).astype(np.uint8))


def test_huge_image_limit_before_decoding(tmp_path):
    """The default limit (40 MP) refuses a 9000 x 5000 PNG from its header, naming the file."""
    p = tmp_path / "wide.png"
    im = Image.new("L", (9000, 5000))
    im.save(p, optimize=False)
    with pytest.raises(ValueError, match=r"wide\.png: 9000x5000 = 45000000 pixels exceeds the limit"):
        read_image_file(p)


def test_show_draws_levels(synth, tmp_path):
    from distillkit.pipelines.inspect import show

    root = tmp_path / "one"
    root.mkdir()
    for p in sorted((synth / "images").glob("scene_0002.*")):
        (root / p.name).write_bytes(p.read_bytes())
    build(manifest(root, tmp_path / "out"), progress=False)
    show(tmp_path / "out", tmp_path / "show.png")
    pic = np.asarray(Image.open(tmp_path / "show.png").convert("RGB"))
    assert pic.std() > 20
    info = json.loads((tmp_path / "out" / "index.json").read_text())
    assert info["stats"]["images_with_ground_truth"] == 1


def test_wide_integer_images_keep_their_content(tmp_path):
    """32-bit integer pixels are clipped before the 16 -> 8 bit reduction (no wrap-around), and 8-bit data
    in a 16-bit container is kept rather than turned black."""
    from PIL import Image

    from distillkit.sensors.image_files import read_image_file

    ramp = np.tile(np.arange(64, dtype=np.int64) * 2000, (8, 1))  # 0 .. 126000: past 16 bits
    Image.fromarray(ramp.astype(np.int32), mode="I").save(tmp_path / "i32.tif")
    img = read_image_file(tmp_path / "i32.tif")
    want = (np.clip(ramp, 0, 65535) >> 8).astype(np.uint8)
    assert np.array_equal(img.rgb[..., 0], want) and "32-bit values clipped to 0..65535" in img.notes
    low = (np.arange(48 * 64).reshape(48, 64) % 256).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "low16.png"), low)
    img = read_image_file(tmp_path / "low16.png")
    assert np.array_equal(img.rgb[..., 0], low.astype(np.uint8)) and any("<= 255" in n for n in img.notes)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_is_pillows_exif_transpose(orientation):
    import io

    from PIL import Image, ImageOps

    from distillkit.sensors.image_files import apply_orientation

    a = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif.tobytes())
    buf.seek(0)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(buf))), apply_orientation(a, orientation))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_ground_truth_on_stored_pixels_is_turned_for_every_orientation(tmp_path, orientation):
    """``source.ground_truth_on = "stored"``: a label drawn on the file's raw pixels is turned with the image
    for every EXIF orientation, including the size-keeping 2-4 that "displayed" (the default) cannot tell
    apart; under "displayed" a label of the displayed size is kept as it is. Checked through a build."""
    from PIL import Image

    from distillkit.sensors.image_files import read_image_file

    raw = np.full((40, 64, 3), 30, np.uint8)
    raw[:10, :16] = (250, 20, 20)  # a red patch in the stored top-left corner
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = orientation
    root = tmp_path / "src"
    root.mkdir()
    im.save(root / "photo.jpg", quality=95, exif=exif.tobytes())
    label = np.zeros((40, 64), np.uint8)
    label[:10, :16] = 1
    Image.fromarray(label).save(root / "photo.sem.png")
    img = read_image_file(root / "photo.jpg")
    red = img.rgb[..., 0] > 150
    for on in ("stored", "displayed"):
        build(manifest(root, tmp_path / on, f'source.ground_truth_on="{on}"'), progress=False)
        gt = samples(tmp_path / on)["photo"]["gt.sem.png"]
        covered = (red & (gt == 1)).sum() / red.sum()
        if on == "stored" or orientation >= 5:  # 5-8 under "displayed": the stored size gives it away
            assert gt.shape == red.shape and covered > 0.9, (on, covered)
        elif orientation in (2, 3, 4):  # "displayed" takes the label as drawn on the displayed pixels
            np.testing.assert_array_equal(gt, label)


def test_ground_truth_drawn_on_stored_pixels_turns_with_the_image(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6) with its label drawn on the stored pixels: the label
    is turned with the image, so the labelled region covers the same pixels after the rotation."""
    from PIL import Image

    from distillkit.pipelines.uniseg import read_label_png
    from distillkit.sensors.image_files import read_image_file
    from distillkit.sensors.images import decode_labels

    raw = np.full((40, 64, 3), 30, np.uint8)
    raw[:10, :16] = (250, 20, 20)  # a red patch in the stored top-left corner
    im = Image.fromarray(raw)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "photo.jpg", quality=95, exif=exif.tobytes())
    label = np.zeros((40, 64), np.uint8)
    label[:10, :16] = 1
    Image.fromarray(label).save(tmp_path / "photo.sem.png")
    img = read_image_file(tmp_path / "photo.jpg")
    assert img.orientation == 6 and img.rgb.shape[:2] == (64, 40)
    gt = decode_labels(read_label_png(str(tmp_path / "photo.sem.png"), img.rgb.shape[:2], img.orientation,
                                      img.notes))
    red = img.rgb[..., 0] > 150
    assert gt.shape == red.shape and (gt == 1).sum() == 160 and (red & (gt == 1)).sum() > 0.9 * red.sum()
    assert any("turned by EXIF orientation 6" in n for n in img.notes)


@pytest.mark.parametrize("bad", ["[0.5, 0.7]", "[0.8, 0.8]", "[1.5, 0.4]"])
def test_manifest_thresholds_must_decrease_within_minus_one_one(synth, tmp_path, bad):
    from distillkit.pipelines.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"stages\.uniap\.thresholds.*strictly decreasing within \[-1, 1\]"):
        manifest(synth, tmp_path / "o", f"stages.uniap.thresholds={bad}")  # loading checks the manifest
