"""CUDA checks (skipped without a GPU) and a CPU smoke run of the GPU benchmark script."""

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


def test_gpu_bench_script_runs_on_cpu(slidr_shards, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_slidr.py"), "--shards", str(slidr_shards),
                    "--device", "cpu", "--steps", "1", "--size", "small", "--workers", "0", "--batch-size", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=300, cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["loader"]["samples_per_s"] > 0 and 0 <= result["loader"]["data_wait_fraction"] <= 1
    assert result["preloaded"]["data_wait_fraction"] < 0.05  # a pre-loaded batch never waits for data


@pytest.mark.slow
def test_device_check_script_runs_on_cpu(tmp_path):
    """bench/device_check.sh is the one prepared GPU call: keep it working (its CPU smoke mode)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "WHEELS": "none",
           "PY": sys.executable, "DEVICE": "cpu", "SIZE": "small", "SYNTH": "small", "STEPS": "1",
           "TRAIN_STEPS": "4", "WORKERS": "0", "BUILD_WORKERS": "2", "EVAL_EPOCHS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "out" / "log.txt").read_text()
    assert proc.returncode == 0 and "== done" in log, log[-3000:]
    assert all(f"== {s}: rc=0" in log for s in ("env", "synth", "build", "bench", "train", "eval")), log[-3000:]
    assert json.loads((tmp_path / "out" / "gpu_slidr.json").read_text())["loader"]["timed_steps"] == 1
    assert "mIoU" in (tmp_path / "out" / "eval.txt").read_text()
