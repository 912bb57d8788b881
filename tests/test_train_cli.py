"""`distillkit train/eval slidr` as a user runs them, and bad shards met by the SLidR trainer."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.pipelines.codecs import npy_bytes
from distillkit.pipelines.shards import iter_samples, load_index, write_shard
from distillkit.train.slidr import make_stream
from distillkit.train.streaming import BadSample


def test_train_resume_eval_cli(slidr_shards, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "step=2" in r.output and (out / "latest.pt").is_file()
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "3",
                                  "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "step=3" in r.output
    r = CliRunner().invoke(main, ["eval", "slidr", "--checkpoint", str(out / "latest.pt"), "--shards",
                                  str(slidr_shards)])
    assert r.exit_code == 0, r.output
    assert "linear probe mIoU distilled" in r.output and "driveable_surface" in r.output


def test_cli_refuses_unknown_method_and_missing_cuda(slidr_shards):
    r = CliRunner().invoke(main, ["train", "nope", "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and "unknown method 'nope'" in r.output
    import torch

    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.output


@pytest.fixture
def bad_shards(slidr_shards, tmp_path):
    """Shard 0: first sample has zero pairs, second lacks cam2.sp.png. Shard 1: truncated."""
    out = tmp_path / "bad"
    shutil.copytree(slidr_shards, out)
    first, second = load_index(out)["shards"][:2]
    samples = list(iter_samples(out / first["file"]))
    samples[0][1]["pairs.npy"] = npy_bytes(np.zeros((0, 4), np.int32))
    samples[0][1]["pairs_uvd.npy"] = npy_bytes(np.zeros((0, 3), np.float32))
    del samples[1][1]["cam2.sp.png"]
    write_shard(out / first["file"], samples)
    path = out / second["file"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out, first["file"], [k for k, _ in samples], second["file"]


def test_bad_samples_named_counted_skipped(bad_shards, caplog):
    out, shard0, keys, shard1 = bad_shards
    stream = make_stream(out, "small", seed=0, strict=False, epochs=1)
    with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
        good = [ex["key"] for ex in stream]
    text = caplog.text
    assert f"{shard0}: sample {keys[0]}" in text and "zero point-pixel pairs" in text
    assert f"{shard0}: sample {keys[1]}" in text and "cam2.sp.png" in text
    assert shard1 in text
    assert keys[0] not in good and keys[1] not in good and keys[2] in good
    assert stream.bad_samples >= 3


def test_strict_stops_at_first_bad_sample(bad_shards):
    out, shard0, keys, _ = bad_shards
    stream = make_stream(out, "small", seed=0, strict=True, epochs=1)
    stream.shuffle_shards = False
    with pytest.raises(BadSample, match=shard0):
        list(stream)
