"""Shard streaming: rank/worker split, no hang, refused pickle fields, bad samples reported."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from distillkit.train.streaming import BadSample, ShardStream, UnsafeFieldError, make_loader, to_device
from tests.index_helpers import rewrite_shard, write_index


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def fake_slidr_sample(
    key: str,
    rng: np.random.Generator,
    n_points: int = 2000,
    hw: tuple[int, int] = (90, 160),
    pairs_per_cam: int = 200,
) -> dict[str, bytes]:
    """A structurally valid slidr sample with random content (for tests that do not need real geometry)."""
    h, w = hw
    lidar = np.concatenate([rng.normal(0, 10, (n_points, 3)), rng.uniform(0, 1, (n_points, 1))], 1).astype(
        np.float32
    )
    sample = {
        "__key__": key,
        "lidar.npy": _npy(lidar),
        "lidarseg.npy": _npy(rng.integers(0, 32, n_points).astype(np.uint8)),
    }
    cams, pairs = [], []
    for i in range(6):
        cams.append(
            {
                "channel": f"CAM{i}",
                "sample_data_token": f"{key}c{i}",
                "width": w,
                "height": h,
                "K": np.eye(3).tolist(),
                "T_cam_lidar": np.eye(4).tolist(),
            }
        )
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        sample[f"cam{i}.jpg"] = cv2.imencode(".jpg", img)[1].tobytes()
        sp = ((np.arange(h)[:, None] // 15) * 20 + np.arange(w)[None] // 16).astype(np.uint8)
        sample[f"cam{i}.sp.png"] = cv2.imencode(".png", sp)[1].tobytes()
        pts = np.sort(rng.choice(n_points, pairs_per_cam, replace=False))
        pairs.append(
            np.column_stack(
                [
                    pts,
                    np.full(pairs_per_cam, i),
                    rng.integers(1, h - 1, pairs_per_cam),
                    rng.integers(1, w - 1, pairs_per_cam),
                ]
            )
        )
    sample["cams.json"] = json.dumps(cams).encode()
    sample["pairs.npy"] = _npy(np.concatenate(pairs).astype(np.int32))
    sample["pairs_uvd.npy"] = _npy(np.zeros((len(np.concatenate(pairs)), 3), np.float32))
    return sample


def write_shards(out: Path, samples_per_shard: list[int], make=None, seed: int = 0) -> Path:
    """Write tars + a minimal index.json; ``make(key, rng)`` builds each sample (default: key only)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, n = [], 0
    for s, count in enumerate(samples_per_shard):
        name = f"t-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as tw:
            for _ in range(count):
                key = f"k{n:05d}"
                tw.write(
                    make(key, rng) if make else {"__key__": key, "x.json": json.dumps({"n": n}).encode()}
                )
                n += 1
        shards.append({"file": name, "samples": count})
    write_index(out, "test")
    return out


def _keys(ds, num_workers: int) -> list[str]:
    dl = DataLoader(ds, batch_size=None, num_workers=num_workers, timeout=60 if num_workers else 0)
    return [s["__key__"] for s in dl]


@pytest.mark.parametrize("num_workers,n_shards", [(0, 3), (2, 5), (2, 1), (3, 2)])
def test_worker_split_covers_every_sample_once(tmp_path, num_workers, n_shards):
    d = write_shards(tmp_path, [3] * n_shards)
    keys = _keys(ShardStream(d, seed=1, epochs=1, shuffle_buffer=4), num_workers)
    assert sorted(keys) == [f"k{i:05d}" for i in range(3 * n_shards)]


def test_rank_split_partitions(tmp_path):
    d = write_shards(tmp_path, [2, 2, 2, 2, 2])
    per_rank = [_keys(ShardStream(d, seed=3, epochs=1, rank=r, world_size=2), 2) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"k{i:05d}" for i in range(10)]


def test_seeded_order_is_deterministic_and_epochs_differ(tmp_path):
    d = write_shards(tmp_path, [4, 4, 4])
    a = _keys(ShardStream(d, seed=5, epochs=2, shuffle_buffer=5), 0)
    b = _keys(ShardStream(d, seed=5, epochs=2, shuffle_buffer=5), 0)
    assert a == b and len(a) == 24 and a[:12] != a[12:]


def test_pickle_fields_refused(tmp_path):
    for ext in ("pth", "pyd", "pickle"):
        d = write_shards(
            tmp_path / ext, [2], make=lambda k, r, e=ext: {"__key__": k, f"w.{e}": b"\x80\x04junk"}
        )
        with pytest.raises(UnsafeFieldError, match=r"t-000000\.tar.*k00000.*refused"):
            list(ShardStream(d, epochs=1))


def test_npy_object_array_is_a_bad_sample(tmp_path):
    def make(key, rng):
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # written only to be refused
        return {"__key__": key, "x.npy": buf.getvalue()}

    d = write_shards(tmp_path, [2], make=make)
    with pytest.raises(BadSample, match="k00000"):
        list(ShardStream(d, epochs=1, strict=True))


def test_missing_field_skipped_or_strict(tmp_path, caplog):
    def make(key, rng):
        s = {"__key__": key, "a.json": b"1"}
        if key != "k00001":
            s["b.json"] = b"2"
        return s

    d = write_shards(tmp_path, [3], make=make)
    ds = ShardStream(d, epochs=1, required=["a.json", "b.json"])
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in ds]
    assert keys == ["k00000", "k00002"] and ds.bad_samples == 1
    assert "t-000000.tar" in caplog.text and "k00001" in caplog.text and "b.json" in caplog.text
    with pytest.raises(BadSample, match=r"t-000000\.tar: sample k00001: missing"):
        list(ShardStream(d, epochs=1, required=["a.json", "b.json"], strict=True))


def test_truncated_shard_reported_no_hang(tmp_path, caplog):
    d = write_shards(
        tmp_path, [4, 4], make=lambda k, r: {"__key__": k, "x.npy": _npy(r.normal(size=(200, 4)))}
    )
    # truncated, its record kept true: the tar reader meets it (a record that disagrees stops the stream first:
    # tests/test_stream_integrity.py)
    rewrite_shard(d, "t-000001.tar", data=(d / "t-000001.tar").read_bytes()[:2500])
    ds = ShardStream(d, epochs=1, shuffle_shards=False)
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in ds]
    assert keys[:4] == [f"k{i:05d}" for i in range(4)] and len(keys) < 8
    assert ds.bad_samples >= 1 and "t-000001.tar" in caplog.text
    with pytest.raises(BadSample, match="t-000001.tar"):
        list(ShardStream(d, epochs=1, shuffle_shards=False, strict=True))
    # With workers the bad shard must not hang the loader either.
    assert len(_keys(ShardStream(d, epochs=1), 2)) == len(keys)


def test_make_loader_and_to_device(tmp_path):
    d = write_shards(tmp_path, [3, 3])
    ds = ShardStream(d, epochs=1, transform=lambda s, rng, g: torch.tensor([s["x.json"]["n"]]))
    dl = make_loader(ds, batch_size=2, collate=torch.cat, num_workers=2, timeout=60, drop_last=False)
    got = sorted(int(v) for b in dl for v in to_device(b, "cpu"))
    assert got == list(range(6))
    assert to_device({"a": [torch.ones(1)], "b": "s"}, "cpu")["b"] == "s"


def test_buffer_holds_samples_undecoded(tmp_path, monkeypatch):
    """Samples are decoded as they leave the shuffle buffer, not as they enter it: a decoded SLidR
    sample is ~10x its stored bytes, which would make a large buffer unaffordable."""
    import distillkit.train.streaming as streaming

    d = write_shards(tmp_path, [8], make=lambda k, r: {"__key__": k, "x.npy": _npy(r.normal(size=(50, 4)))})
    calls = []
    real = streaming.decode_sample
    monkeypatch.setattr(streaming, "decode_sample", lambda raw, *a: calls.append(raw["__key__"]) or real(raw, *a))
    it = iter(ShardStream(d, epochs=1, shuffle_buffer=8))
    first = next(it)
    assert calls == [first["__key__"]] and isinstance(first["x.npy"], np.ndarray)
    assert len([first, *it]) == 8 and len(calls) == 8


def test_select_skips_before_decoding_and_counts(tmp_path, caplog):
    from distillkit.train.streaming import JsonFieldFilter

    def make(key, rng):
        n = int(key[1:])
        scene = "a" if n % 2 else "b"
        # The samples of scene b would not even decode: skipped ones must never be decoded.
        return {"__key__": key, "meta.json": json.dumps({"scene": scene}).encode(),
                "x.npy": _npy(np.zeros(3)) if scene == "a" else b"not npy"}

    d = write_shards(tmp_path, [4, 4], make=make)
    ds = ShardStream(d, epochs=1, select=JsonFieldFilter("meta.json", "scene", {"a"}, "scenes of split 'x'"),
                     strict=True)
    with caplog.at_level(logging.INFO, logger="distillkit.train.streaming"):
        keys = sorted(s["__key__"] for s in ds)
    assert keys == ["k00001", "k00003", "k00005", "k00007"] and ds.skipped == 4 and ds.bad_samples == 0
    assert "kept 4, skipped 4 sample(s) not among the scenes of split 'x'" in caplog.text
    # A worker whose shards hold no selected sample stops its stream (with a warning), no spinning.
    none = ShardStream(d, epochs=None, select=JsonFieldFilter("meta.json", "scene", {"c"}, "scenes of split 'y'"))
    with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
        assert list(none) == []
    assert "is among the scenes of split 'y': stopping" in caplog.text
