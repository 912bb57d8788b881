"""CUDA checks (skipped without a GPU), the suite's trainer entry on CPU and a CPU smoke run of the device script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.gpu
def test_train_slidr_on_cuda_bf16(slidr_shards, tmp_path):
    from distillkit.train.slidr import train_main

    m = train_main(slidr_shards, tmp_path / "cuda", device="cuda", max_steps=3, log_every=1)
    assert m["step"] == 3 and np.isfinite(m["loss"])
    ck = torch.load(m["checkpoint"], weights_only=True, map_location="cpu")
    assert ck["step"] == 3


@pytest.mark.gpu
def test_device_decode_matches_cpu_decode_on_cuda(slidr_shards):
    from distillkit.train.image_decode import decode_crops
    from distillkit.train.slidr import SIZES, make_stream
    from distillkit.train.slidr_aug import slidr_collate

    it = iter(make_stream(slidr_shards, "small", seed=3, strict=True, decode_on_device=True))
    batch = slidr_collate([next(it)])
    args = (batch["jpegs"], batch["boxes"], batch["flips"], SIZES["small"].crop)
    gpu, cpu = decode_crops(*args, "cuda").cpu(), decode_crops(*args, "cpu")
    # nvJPEG and libjpeg-turbo differ in IDCT rounding by a few grey levels at most
    assert (gpu - cpu).abs().mean() < 2 / 255


@pytest.mark.gpu
def test_projection_torch_cuda_matches_numpy(slidr_shards, synth_nuscenes):
    from distillkit.preprocess.projection import project_points
    from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes, read_lidar_bin

    kf = plan_keyframes(load_nuscenes(synth_nuscenes, "v1.0-mini"))[0][0]
    args = (read_lidar_bin(kf.lidar_path), np.array([c.T_cam_lidar for c in kf.cameras]),
            np.array([c.K for c in kf.cameras]), np.array([[c.width, c.height] for c in kf.cameras]))
    a, b = project_points(*args), project_points(*args, backend="torch")
    np.testing.assert_array_equal(a.index, b.index)


def test_trainer_bench_entry_runs_on_cpu(slidr_shards):
    """The suite's trainer entry (bench/suite/trainer.py), small networks on CPU: every mode measured,
    the pre-loaded batch never waits for data, and each part alone is faster than the whole step."""
    from bench.suite.trainer import measure

    r = measure(slidr_shards, "cpu", "small", steps=2, batch_size=1, workers=0)
    assert r["loader"]["timed_steps"] == 2 and r["loader"]["samples_per_s"] > 0
    assert 0 <= r["loader"]["data_wait_fraction"] <= 1
    assert r["preloaded"]["data_wait_fraction"] < 0.05
    step = r["preloaded"]["samples_per_s"]
    assert r["teacher_forward_samples_per_s"] > step and r["point_net_fwd_bwd_samples_per_s"] > step
    assert r["nvjpeg_images_per_s"] is None  # CUDA only


@pytest.mark.slow
def test_device_check_script_runs_on_cpu(tmp_path):
    """bench/device_check.sh is the one prepared GPU call: keep it working (its CPU smoke mode)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "WHEELS": "none",
           "PY": sys.executable, "DEVICE": "cpu", "SIZE": "small", "SYNTH": "small", "TRAIN_STEPS": "4",
           "WORKERS": "0", "BUILD_WORKERS": "2", "EVAL_EPOCHS": "2", "SUITE": "--quick --only trainer",
           "TESTS": "tests/test_gpu_superpixels.py"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert proc.returncode == 0 and "== done" in log, log[-3000:]
    assert all(f"== {s}: rc=0" in log for s in ("env", "synth", "build", "suite", "train", "eval")), log[-3000:]
    # without CUDA the CUDA tests skip
    assert "== pytest: rc=0" in log and "skipped" in (tmp_path / "out" / "pytest.txt").read_text(), log[-3000:]
    bench = json.loads((tmp_path / "out" / "bench-cpu.json").read_text())
    assert bench["entries"]["trainer"]["extra"]["loader"]["timed_steps"] == 1
    assert "mIoU" in (tmp_path / "out" / "eval.txt").read_text()
