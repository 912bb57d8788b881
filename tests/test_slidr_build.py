"""End to end: synthetic nuScenes -> dask -> shards; determinism, resume, stock readers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from distillkit.pipelines.codecs import load_npy
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import load_index
from distillkit.pipelines.slidr import SlidrPipeline
from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes, read_lidar_bin

from .conftest import DEMO_MANIFEST, scheduler_address, slidr_manifest

DISTILLKIT = [sys.executable, "-m", "distillkit"]


def _shas(shard_dir: Path) -> list[tuple[str, str]]:
    return [(s["file"], s["sha256"]) for s in load_index(shard_dir)["shards"]]


def test_index_and_contents(slidr_shards, synth_nuscenes):
    index = load_index(slidr_shards)
    refs, _ = plan_keyframes(load_nuscenes(synth_nuscenes, "v1.0-mini"))
    plan, _ = SlidrPipeline().plan(slidr_manifest(synth_nuscenes, slidr_shards))
    assert index["counts"] == {"planned": len(refs), "written": len(refs), "rejected": 0}
    assert index["pipeline"] == "slidr" and len(index["manifest_hash"]) == 64
    assert set(index["git"]) == {"commit", "dirty"} and index["input_fingerprint"]
    assert index["stats"]["points_per_sample"] > 1000 and index["stats"]["intensity_std"] > 0
    samples = {s["__key__"]: s for s in wds.WebDataset(
        [str(slidr_shards / s["file"]) for s in index["shards"]], shardshuffle=False)}
    assert list(samples) == [r.key for r in plan]  # plan order (a seeded permutation)
    assert sorted(samples) == sorted(r.sample_token for r in refs)  # every keyframe
    for ref in refs[:2]:
        s = samples[ref.sample_token]
        lidar = load_npy(s["lidar.npy"])
        np.testing.assert_array_equal(lidar, read_lidar_bin(ref.lidar_path)[:, :4])
        cams = json.loads(s["cams.json"])
        assert [c["channel"] for c in cams] == [c.channel for c in ref.cameras]
        for i, cam in enumerate(ref.cameras):
            assert s[f"cam{i}.jpg"] == Path(cam.path).read_bytes()  # original bytes, unchanged
        pairs, uvd = load_npy(s["pairs.npy"]), load_npy(s["pairs_uvd.npy"])
        np.testing.assert_array_equal(pairs[:, 3], np.rint(uvd[:, 0]))
        assert (uvd[:, 2] > 1.0).all() and len(load_npy(s["lidarseg.npy"])) == len(lidar)
    report = verify(slidr_shards)
    assert report.ok, report.problems
    assert report.samples == len(refs)


def test_stock_tar_lists_every_member(slidr_shards):
    first = load_index(slidr_shards)["shards"][0]
    names = subprocess.run(["tar", "tf", str(slidr_shards / first["file"])], capture_output=True, text=True,
                           check=True).stdout.split()
    assert names[0].startswith(first["first_key"] + ".")
    assert f"{first['first_key']}.cam5.sp.png" in names and f"{first['last_key']}.pairs.npy" in names


def test_one_worker_gives_identical_bytes(slidr_shards, synth_nuscenes, tmp_path):
    out = tmp_path / "w1"
    build(slidr_manifest(synth_nuscenes, out, "cluster.workers=1"), progress=False)
    assert _shas(out) == _shas(slidr_shards)
    assert (out / "index.json").read_bytes() != b"" and verify(out).ok


def test_rerun_rebuilds_when_manifest_changes(slidr_shards, synth_nuscenes, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(slidr_shards, out)
    same = build(slidr_manifest(synth_nuscenes, out), progress=False)
    assert same.built_shards == 0 and _shas(out) == _shas(slidr_shards)
    changed = build(slidr_manifest(synth_nuscenes, out, "stages.superpixels.n_segments=30"), progress=False)
    assert changed.reused_shards == 0 and _shas(out) != _shas(slidr_shards)


def test_external_dask_scheduler_and_worker(slidr_shards, synth_nuscenes, tmp_path):
    """A real ``dask scheduler`` and ``dask worker`` as separate processes."""
    sched_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
    procs = [subprocess.Popen([*dask, "--scheduler-file", str(sched_file), "--no-dashboard", "--port", "0",
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        # the file exists before it is wholly written: wait until it parses
        while scheduler_address(sched_file) is None and time.time() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen([*worker, "--scheduler-file", str(sched_file), "--nworkers", "1",
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = scheduler_address(sched_file)
        out = tmp_path / "remote"
        result = subprocess.run([*DISTILLKIT, "build", str(DEMO_MANIFEST), "--quiet", "--scheduler", address,
                                 "--set", f"source.dataroot={synth_nuscenes}", "--set", f"output.dir={out}"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert _shas(out) == _shas(slidr_shards)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def test_unreachable_scheduler_is_a_one_line_error(synth_nuscenes, tmp_path):
    result = subprocess.run([*DISTILLKIT, "build", str(DEMO_MANIFEST), "--scheduler", "tcp://127.0.0.1:9",
                             "--set", f"source.dataroot={synth_nuscenes}", "--set", f"output.dir={tmp_path}/o"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot reach dask scheduler")


@pytest.fixture
def broken_copy(slidr_shards, tmp_path):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(slidr_shards, out)
    return out


def test_verify_names_shard_of_flipped_byte(broken_copy):
    entry = load_index(broken_copy)["shards"][0]
    path = broken_copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(broken_copy)
    assert any(p.startswith(entry["file"]) and "sha256" in p for p in report.problems)


def test_verify_names_key_of_schema_fault(broken_copy):
    from distillkit.pipelines.codecs import npy_bytes
    from distillkit.pipelines.shards import iter_samples, write_json_atomic, write_shard

    index = load_index(broken_copy)
    entry = index["shards"][0]
    samples = list(iter_samples(broken_copy / entry["file"]))
    bad_key = samples[1][0]
    pairs = load_npy(samples[1][1]["pairs.npy"])
    pairs[0, 0] = 10**8  # a point that does not exist
    samples[1][1]["pairs.npy"] = npy_bytes(pairs)
    del samples[0][1]["cam3.sp.png"]
    size, sha, _ = write_shard(broken_copy / entry["file"], samples)
    entry.update(bytes=size, sha256=sha)
    write_json_atomic(broken_copy / "index.json", index)
    result = subprocess.run([*DISTILLKIT, "verify", str(broken_copy)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{entry['file']}: {bad_key}: field 'pairs.npy': point index out of range" in result.stdout
    assert f"{entry['file']}: {samples[0][0]}: missing field 'cam3.sp.png'" in result.stdout
