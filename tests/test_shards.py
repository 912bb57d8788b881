"""The shard writer: deterministic bytes, atomic writes, readable by stock tools."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import webdataset as wds

from distillkit.pipelines.codecs import load_npy, npy_bytes
from distillkit.pipelines.shards import iter_samples, sha256_file, write_shard


def _samples(n=3):
    rng = np.random.default_rng(0)
    return [(f"k{i:03d}", {"a.npy": npy_bytes(rng.normal(size=(4, 2)).astype(np.float32)),
                           "meta.json": b'{"i": %d}' % i}) for i in range(n)]


def test_write_is_deterministic_and_atomic(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    size_a, sha_a, n = write_shard(a, _samples())
    _, sha_b, _ = write_shard(b, _samples())
    assert n == 3 and sha_a == sha_b == sha256_file(a) and size_a == a.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no temp files left


def test_stock_tar_and_webdataset_read(tmp_path):
    path = tmp_path / "s-000000.tar"
    write_shard(path, _samples())
    listing = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["k000.a.npy", "k000.meta.json", "k001.a.npy", "k001.meta.json", "k002.a.npy",
                       "k002.meta.json"]
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in got] == ["k000", "k001", "k002"]
    np.testing.assert_array_equal(load_npy(got[1]["a.npy"]), load_npy(_samples()[1][1]["a.npy"]))
    assert [k for k, _ in iter_samples(path)] == ["k000", "k001", "k002"]


@pytest.mark.parametrize("key", ["a.b", "", "_meta"])
def test_bad_keys_refused(tmp_path, key):
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shard(tmp_path / "x.tar", [(key, {"a.json": b"{}"})])
    assert not (tmp_path / "x.tar").exists()


def test_pickle_fields_refused(tmp_path):
    with pytest.raises(ValueError, match="code-executing"):
        write_shard(tmp_path / "x.tar", [("k", {"model.pth": b"x"})])
    with pytest.raises(ValueError, match="object"):
        npy_bytes(np.array([{}], dtype=object))
