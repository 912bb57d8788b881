"""Shared fixtures: one synthetic nuScenes dataset and one shard build per test session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# One math thread per process unless the caller says otherwise: the suite runs on 2 cores beside dask workers,
# and torch's default of one thread per core made the small trainers' steps 2x (idle) to 9x (under load) slower
# there (docs/decisions.md "Torch threads"). Set before torch is imported; subprocesses and workers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEMO_MANIFEST = ROOT / "manifests" / "demo-slidr.toml"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_nuscenes(tmp_path_factory) -> Path:
    """Synthetic nuScenes (small, seed 0), read-only for tests: copy it before mutating."""
    from distillkit.sensors.synth.nuscenes import make_nuscenes

    return make_nuscenes(tmp_path_factory.mktemp("synth") / "nuscenes", seed=0, size="small")


def slidr_manifest(dataroot: Path, out: Path, *extra: str):
    from distillkit.pipelines.catalog import load_manifest

    return load_manifest(DEMO_MANIFEST, [f"source.dataroot={dataroot}", f"output.dir={out}", *extra])


@pytest.fixture(scope="session")
def slidr_shards(synth_nuscenes, tmp_path_factory) -> Path:
    """Shards built from ``synth_nuscenes`` by the real runner on a 2-worker LocalCluster."""
    from distillkit.pipelines.runner import build

    out = tmp_path_factory.mktemp("shards") / "slidr"
    build(slidr_manifest(synth_nuscenes, out, "cluster.workers=2"), progress=False)
    return out


@pytest.fixture
def nuscenes_copy(synth_nuscenes, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may break."""
    dst = tmp_path / "nuscenes"
    shutil.copytree(synth_nuscenes, dst)
    return dst


@pytest.fixture(scope="module")
def six_images(tmp_path_factory) -> Path:
    """Six synthetic images (with ground truth) in a folder of their own, per test module (tests write beside
    them)."""
    from distillkit.sensors.synth.images import make_images

    src = make_images(tmp_path_factory.mktemp("synth") / "images", seed=2)
    root = tmp_path_factory.mktemp("six")
    for p in sorted((src / "images").glob("scene_000[0-5].*")):
        (root / p.name).write_bytes(p.read_bytes())
    return root


def keep_audio_files(root: Path, n: int) -> list[str]:
    """Delete all but the first ``n`` clips (sorted paths) of a synthetic audio tree and their labels.csv rows
    (small shard builds for speed); returns the kept paths relative to ``root``."""
    keep = sorted(p.relative_to(root).as_posix() for p in root.rglob("clip_*"))[:n]
    for p in list(root.rglob("clip_*")):
        if p.relative_to(root).as_posix() not in keep:
            p.unlink()
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in keep])
                                     + "\n")
    return keep


def build_serial(manifest: str, out: Path, *sets: str) -> Path:
    """Build the packaged ``manifest`` in-process into ``out`` with ``--set`` style ``sets``; returns ``out``."""
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.runner import build

    build(load_manifest(manifest, [f"output.dir={out}", "cluster.scheduler=serial", *sets]), progress=False)
    return out


def kill_build_at_shard(monkeypatch, index: int = 1) -> None:
    """Make the next in-process build stop as if killed (``KeyboardInterrupt``) when it starts shard ``index``."""
    from distillkit.pipelines import runner

    real = runner.build_shard

    def dies(task):
        if task.index == index:
            raise KeyboardInterrupt  # the build killed midway
        return real(task)

    monkeypatch.setattr(runner, "build_shard", dies)


def scheduler_address(sched_file: Path) -> str | None:
    """The address in a ``dask scheduler --scheduler-file``, or None while it is not (wholly) written: the file
    exists before its JSON is complete, so a test waits until it parses."""
    try:
        return json.loads(Path(sched_file).read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's own process group: ``tcp://127.0.0.1:PORT``)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
