"""The public reading API (distillkit.open_shards, wds_handlers) and docs/reading.md.

Shards are written directly with ``pipelines.shards.write_shard`` (no slow real build): SLidR-like
samples from ``test_train_streaming.fake_slidr_sample``, half of them with 16-bit superpixel
labels (ids above 255), so both bit depths are checked.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from torch.utils.data import DataLoader

import distillkit
from distillkit.pipelines.codecs import UnsafeFieldError
from distillkit.pipelines.shards import shard_filename, write_shard
from distillkit.sensors.images import encode_labels_png
from tests.index_helpers import write_index
from tests.test_train_streaming import fake_slidr_sample, write_shards

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reading.md"
N_SHARDS, PER_SHARD, N_CAMS, HW = 3, 2, 6, (24, 40)


def _labels(i: int, cam: int) -> np.ndarray:
    """Superpixel ids of sample ``i``, camera ``cam``: odd samples need 16 bits (up to 959)."""
    h, w = HW
    ids = np.arange(h * w).reshape(h, w)
    if i % 2 == 0:
        return ((ids // 7 + cam) % 200).astype(np.uint8)  # < 256: stored as 8-bit
    return (ids + cam).astype(np.uint16)  # 960 segments: stored as 16-bit


def build_shards(out: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """3 shards of 2 SLidR-like samples + index.json; returns the directory and the labels written."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    expected: dict[str, list[np.ndarray]] = {}
    records = []
    for s in range(N_SHARDS):
        samples = []
        for j in range(PER_SHARD):
            i = s * PER_SHARD + j
            key = f"scene{i:04d}"
            fields = fake_slidr_sample(key, rng, n_points=300, hw=HW, pairs_per_cam=20)
            del fields["__key__"]
            expected[key] = [_labels(i, c) for c in range(N_CAMS)]
            for c in range(N_CAMS):
                fields[f"cam{c}.sp.png"] = encode_labels_png(expected[key][c])
            samples.append((key, fields))
        name = shard_filename("demo-slidr", s)
        size, sha, n = write_shard(out / name, samples)
        records.append({"file": name, "samples": n, "bytes": size, "sha256": sha})
    write_index(out, "slidr", [r["file"] for r in records])
    return out, expected


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, list[np.ndarray]]]:
    return build_shards(tmp_path_factory.mktemp("reading") / "slidr")


def _check_sample(sample: dict, expected: dict[str, list[np.ndarray]]) -> None:
    key = sample["__key__"]
    assert sample["__url__"].endswith(".tar")
    for c in range(N_CAMS):
        sp, want = sample[f"cam{c}.sp.png"], expected[key][c]
        assert sp.ndim == 2 and sp.dtype == want.dtype, (key, c, sp.shape, sp.dtype)
        np.testing.assert_array_equal(sp, want)
        img = sample[f"cam{c}.jpg"]
        assert img.shape == (*HW, 3) and img.dtype == np.uint8
    assert sample["lidar.npy"].dtype == np.float32 and sample["lidar.npy"].shape == (300, 4)
    assert len(sample["cams.json"]) == N_CAMS and sample["pairs.npy"].shape[1] == 4


@pytest.mark.parametrize("form", ["dir", "index", "index_url", "brace", "list", "path_objects"])
def test_open_shards_every_form_yields_every_key_once_with_intact_labels(shards, form):
    d, expected = shards
    source = {
        "dir": str(d),
        "index": d / "index.json",
        "index_url": f"file://{d}/index.json",
        "brace": f"{d}/demo-slidr-{{000000..{N_SHARDS - 1:06d}}}.tar",
        "list": [str(d / shard_filename("demo-slidr", s)) for s in range(N_SHARDS)],
        "path_objects": [d / shard_filename("demo-slidr", s) for s in range(N_SHARDS)],
    }[form]
    samples = list(distillkit.open_shards(source))
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for s in samples:
        _check_sample(s, expected)
    # Both bit depths really went through (the fixture would be useless otherwise).
    assert {s["cam0.sp.png"].dtype for s in samples} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert max(int(s["cam0.sp.png"].max()) for s in samples) > 255


def test_open_shards_single_tar_raw_images_and_bad_sources(shards, tmp_path):
    d, expected = shards
    samples = list(distillkit.open_shards(d / "demo-slidr-000001.tar", images="raw"))
    assert [s["__key__"] for s in samples] == ["scene0002", "scene0003"]
    for s in samples:
        assert isinstance(s["cam0.jpg"], bytes) and s["cam0.jpg"][:2] == b"\xff\xd8"
        np.testing.assert_array_equal(s["cam0.sp.png"], expected[s["__key__"]][0])  # labels still decoded
    with pytest.raises(FileNotFoundError, match=r"demo-slidr-000003\.tar: no such shard \(and 6 more\)"):
        distillkit.open_shards(f"{d}/demo-slidr-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="index.json"):
        distillkit.open_shards(tmp_path)  # a directory without index.json: an unfinished build
    with pytest.raises(ValueError, match="empty"):
        distillkit.open_shards([])
    with pytest.raises(ValueError, match="images"):
        distillkit.open_shards(d, images="float")


def test_shuffle_is_seeded_and_complete(shards):
    d, expected = shards
    a = [s["__key__"] for s in distillkit.open_shards(d, shuffle=True, seed=3, epochs=2, shuffle_buffer=3)]
    b = [s["__key__"] for s in distillkit.open_shards(d, shuffle=True, seed=3, epochs=2, shuffle_buffer=3)]
    assert a == b and sorted(a[:6]) == sorted(a[6:]) == sorted(expected)
    assert [s["__key__"] for s in distillkit.open_shards(d)] == sorted(expected)  # no shuffle: shard order


def test_stock_webdataset_with_documented_handlers_keeps_labels(shards):
    d, expected = shards
    urls = distillkit.shard_urls(d)
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode(*distillkit.wds_handlers()):
        for c in range(N_CAMS):
            sp, want = sample[f"cam{c}.sp.png"], expected[sample["__key__"]][c]
            assert sp.dtype == want.dtype and sp.shape == want.shape
            np.testing.assert_array_equal(sp, want)
            img = sample[f"cam{c}.jpg"]  # the usual "rgb" spec still applies to photographs
            assert img.shape == (*HW, 3) and img.dtype == np.float32 and img.max() <= 1.0
        seen += 1
    assert seen == len(expected)
    # The handlers survive pickling (DataLoader workers started with spawn need that).
    ds = wds.WebDataset(urls, shardshuffle=False).decode(*pickle.loads(pickle.dumps(distillkit.wds_handlers("rgb8"))))
    first = next(iter(ds))
    assert first["cam0.jpg"].dtype == np.uint8 and first["cam0.sp.png"].dtype == np.uint8


def test_plain_rgb_decode_mangles_labels_as_the_doc_says(shards):
    d, expected = shards
    n16 = 0
    for sample in wds.WebDataset(distillkit.shard_urls(d), shardshuffle=False).decode("rgb"):
        want = expected[sample["__key__"]][0]
        bad = sample["cam0.sp.png"]
        assert bad.shape == (*HW, 3) and bad.dtype == np.float32
        assert bad.min() >= 0.0 and bad.max() <= 1.0
        if want.dtype == np.uint16:  # ids above 255 are clipped: not even recoverable by * 255
            n16 += 1
            recovered = np.round(bad[..., 0] * 255).astype(np.int64)
            assert recovered.max() == 255 and not np.array_equal(recovered, want)
    assert n16 == 3


def test_ranks_cover_every_key_exactly_once(shards, monkeypatch):
    d, expected = shards
    per_rank = [[s["__key__"] for s in distillkit.open_shards(d, rank=r, world_size=2)] for r in range(2)]
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(expected)
    # Same with shuffling and two DataLoader workers per rank (all ranks agree on the shard order).
    keys = []
    for r in range(2):
        ds = distillkit.open_shards(d, rank=r, world_size=2, shuffle=True, seed=7)
        keys += [s["__key__"] for s in DataLoader(ds, batch_size=None, num_workers=2, timeout=60)]
    assert sorted(keys) == sorted(expected)
    # Defaults come from torchrun's variables when no process group is initialised.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = distillkit.open_shards(d)
    assert (ds.rank, ds.world_size) == (1, 2) and [s["__key__"] for s in ds] == per_rank[1]
    with pytest.raises(ValueError, match="rank"):
        distillkit.open_shards(d, rank=2)


def test_unsafe_field_is_refused(tmp_path):
    d = write_shards(tmp_path, [2], make=lambda k, r: {"__key__": k, "a.json": b"1", "x.pth": b"\x80\x04junk"})
    for strict in (True, False):
        with pytest.raises(UnsafeFieldError, match=r"t-000000\.tar.*k00000.*x\.pth"):
            list(distillkit.open_shards(d, strict=strict))
    # The stock-webdataset handlers refuse it too (webdataset would torch.load it otherwise).
    with pytest.raises(wds.autodecode.DecodingError) as info:
        list(wds.WebDataset(distillkit.shard_urls(d), shardshuffle=False).decode(*distillkit.wds_handlers()))
    assert isinstance(info.value.__cause__, UnsafeFieldError)


def doc_python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_python_block_of_the_doc_runs(shards, tmp_path):
    d, _ = shards
    blocks = doc_python_blocks(DOC.read_text())
    assert len(blocks) >= 5, "docs/reading.md lost its examples"
    script = tmp_path / "doc_examples.py"
    # One namespace, in order, as a reader would paste them; SHARDS is the only given name.
    script.write_text(f"SHARDS = {str(d)!r}\n\n" + "\n\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_doc_block_extraction_sees_a_failing_block():
    # Guards the guard: a failing block must be found, or the test above proves nothing.
    blocks = doc_python_blocks("text\n```python\nraise SystemExit(3)\n```\n```bash\nls\n```\n")
    assert blocks == ["raise SystemExit(3)\n"]


def test_import_distillkit_is_cheap():
    code = (
        "import sys, distillkit\n"
        "heavy = [m for m in ('torch', 'webdataset', 'cv2', 'dask', 'distributed') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert {'open_shards', 'wds_handlers', 'shard_urls'} <= set(distillkit.__all__) & set(dir(distillkit))\n"
        "assert callable(distillkit.open_shards) and 'torch' not in sys.modules  # the function, not torch yet\n"
        "distillkit.wds_handlers()\n"
        "assert 'webdataset' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError):
        distillkit.no_such_name  # noqa: B018
