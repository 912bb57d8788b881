"""A lab's own pipeline and trainer, installed with pip, found through entry points, and run
through the distillkit CLI: synth, build (dask and serial, same bytes), verify, stats, show,
train, resume, eval.

The plugin (``tests/plugin_toy``) is the hard case the pipeline contract was reshaped for: a ref
is a whole recording whose windows are enumerated on the worker, a teacher model is set up once
per worker process and embeds windows in batches that cross recordings, and partial windows are
rejected with their position.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distillkit.pipelines.codecs import load_npy
from distillkit.pipelines.shards import iter_samples, load_index

PLUGIN = Path(__file__).resolve().parent / "plugin_toy"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The plugin pip-installed into a private target directory (the test venv stays untouched);
    subprocesses see it through PYTHONPATH, as a user's environment would hold it."""
    root = tmp_path_factory.mktemp("plugin")
    site, src = root / "site", root / "src"
    shutil.copytree(PLUGIN, src)  # setuptools writes build/ and egg-info into the tree it builds
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    assert (site / "distillkit_toy").is_dir()
    return {**os.environ, "PYTHONPATH": str(site)}


def dk(env: dict[str, str], cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "distillkit"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if ok:
        assert proc.returncode == 0, f"distillkit {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_plugin_builds_verifies_shows_and_trains(plugin_env, tmp_path):
    env, cwd = plugin_env, tmp_path
    dk(env, cwd, "synth", "toy", "data/toy")
    manifest = "distillkit_toy:demo-toy.toml"  # a manifest packaged in the plugin
    dask = dk(env, cwd, "build", manifest, "--quiet", "--workers", "2", "--set", "output.dir=dask")
    dk(env, cwd, "build", manifest, "--quiet", "--scheduler", "serial", "--set", "output.dir=serial")
    index = load_index(cwd / "dask")
    assert index["pipeline"] == "toy" and len(index["shards"]) == 3  # 6 recordings, 2 per shard
    for entry in index["shards"]:  # the serial executor writes the same bytes as dask
        assert (cwd / "dask" / entry["file"]).read_bytes() == (cwd / "serial" / entry["file"]).read_bytes()

    # windows enumerated on the worker, keys deterministic, partial windows and the broken file rejected
    keys = [k for e in index["shards"] for k, _ in iter_samples(cwd / "dask" / e["file"])]
    assert keys[:2] == ["rec00_000000", "rec00_000001"] and len(keys) == len(set(keys)) == index["counts"]["written"]
    stages = sorted(r["stage"] for r in index["rejected"])
    assert stages.count("read") == 1 and stages.count("window") == 5
    assert any(r["source"] == "broken.csv" for r in index["rejected"])
    assert "from 6 inputs" in dask.stdout

    # the teacher ran in batches across recordings: embeddings equal the teacher applied window by window
    sys.path.insert(0, env["PYTHONPATH"])
    try:
        from distillkit_toy.pipeline import make_teacher
    finally:
        sys.path.remove(env["PYTHONPATH"])
    import torch

    teacher = make_teacher(32, 8, 0)
    _, sample = next(iter_samples(cwd / "dask" / index["shards"][1]["file"]))
    signal = load_npy(sample["signal.npy"])
    with torch.no_grad():
        expected = teacher(torch.from_numpy(signal)[None]).numpy()[0]
    np.testing.assert_allclose(load_npy(sample["teacher.npy"]), expected, atol=1e-6)

    assert "0 faults" in dk(env, cwd, "verify", "dask").stdout
    assert "std:" in dk(env, cwd, "stats", "dask").stdout
    dk(env, cwd, "show", "dask", "--out", "toy.png")
    assert np.asarray(Image.open(cwd / "toy.png").convert("L")).std() > 5

    # the plugin's trainer through distillkit's loop: its own keys in --help, stored config, resume, eval
    assert "--hidden" in dk(env, cwd, "train", "toy", "--help").stdout
    dk(env, cwd, "train", "toy", "--shards", "dask", "--out", "run", "--max-steps", "40", "--set", "lr=0.02")
    dk(env, cwd, "train", "toy", "--shards", "dask", "--out", "run", "--max-steps", "50", "--resume")
    first = json.loads((cwd / "run" / "log.jsonl").read_text().splitlines()[0])
    assert first["config"]["lr"] == 0.02 and first["config"]["hidden"] == 32
    report = dk(env, cwd, "eval", "toy", "--checkpoint", "run/latest.pt", "--shards", "dask").stdout
    mse = {k: float(v) for k, v in (line.split(": ") for line in report.strip().splitlines())}
    assert mse["mse_distilled"] < 0.5 * mse["mse_random"], mse


def test_plugin_is_listed_and_errors_are_one_line(plugin_env, tmp_path):
    env = plugin_env
    assert "toy" in dk(env, tmp_path, "train", "--help").stdout
    bad = dk(env, tmp_path, "train", "toy", "--shards", str(tmp_path), "--set", "hidden=wide", ok=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: train toy: hidden: expected int, got str 'wide'"]
    unknown = dk(env, tmp_path, "synth", "nope", "out", ok=False)
    assert unknown.returncode == 2 and "unknown synth kind 'nope'" in unknown.stderr and "toy" in unknown.stderr
