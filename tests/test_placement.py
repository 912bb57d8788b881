"""Torch stages on GPU workers: a dask worker advertising the ``GPU`` resource gets the torch
stage's batches while the other workers build and write the shards, and the bytes are the same as
an in-process build. Without CUDA the "GPU" worker runs the CPU torch path (``device = "auto"``),
which is all the resource placement needs to be checked; bench/device_check.sh runs this file on a
real GPU too."""

from __future__ import annotations

import json
import logging

import pytest
from distributed import get_task_stream

from distillkit.pipelines.executor import ClusterError, dask_client
from distillkit.pipelines.placement import resolve_device
from distillkit.pipelines.runner import build
from tests.conftest import slidr_manifest

TORCH = "stages.superpixels.backend=torch"
ONE_SCENE = ('source.scenes=["scene-0061"]', "output.samples_per_shard=1")  # 3 keyframes, 3 shards


def test_torch_stage_batches_go_to_the_gpu_worker_and_bytes_match_serial(synth_nuscenes, tmp_path, caplog):
    import torch

    with caplog.at_level(logging.INFO, logger="distillkit"):
        serial = build(slidr_manifest(synth_nuscenes, tmp_path / "serial", TORCH, *ONE_SCENE,
                                      "cluster.scheduler=serial"), progress=False)
    said = [r.getMessage() for r in caplog.records if "CPU torch path" in r.getMessage()]
    assert len(said) == (0 if torch.cuda.is_available() else 1), said  # without a GPU: said once, not per shard
    with dask_client("", workers=1, gpu_workers=1) as client:
        workers = client.scheduler_info()["workers"]
        gpu = {a for a, w in workers.items() if w.get("resources", {}).get("GPU")}
        assert len(gpu) == 1 and len(workers) == 2
        with get_task_stream(client) as stream:
            placed = build(slidr_manifest(synth_nuscenes, tmp_path / "placed", TORCH, *ONE_SCENE),
                           scheduler=client.scheduler.address, progress=False)
    ran: dict[str, set[str]] = {}
    for task in stream.data:
        ran.setdefault("shard" if "-shard-" in str(task["key"]) else "stage", set()).add(task["worker"])
    assert ran["shard"] and not ran["shard"] & gpu, "shard tasks must stay off the GPU worker"
    assert ran["stage"] == gpu, "every superpixel batch must run on the GPU worker"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine "auto" is CUDA in both builds
    index = json.loads(placed.index_path.read_text())
    assert index["torch_stages"] == {"superpixels": {"backend": "torch", "requested": "auto", "gpu_workers": 1,
                                                     "devices": [device]}}
    serial_index = json.loads(serial.index_path.read_text())
    assert serial_index["torch_stages"]["superpixels"]["gpu_workers"] == 0
    assert len(index["shards"]) == 3
    for a, b in zip(serial_index["shards"], index["shards"], strict=True):
        assert a["sha256"] == b["sha256"], f"{a['file']}: placed build differs from the in-process one"


def test_cuda_without_a_gpu_is_a_clear_error(synth_nuscenes, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    m = slidr_manifest(synth_nuscenes, tmp_path / "out", TORCH, "stages.superpixels.device=cuda",
                       "cluster.scheduler=serial")
    with pytest.raises(ClusterError, match='superpixels: device = "cuda" but there is no GPU'):
        build(m, progress=False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


def test_skimage_build_records_no_torch_stage(slidr_shards):
    assert "torch_stages" not in json.loads((slidr_shards / "index.json").read_text())


def _on_gpu_worker(_: int) -> bool:
    from distillkit.pipelines.placement import _on_gpu_worker

    return _on_gpu_worker()


def test_a_gpu_worker_knows_it_is_one():
    """A shard task that lands on a GPU worker (a cluster of GPU workers only) runs its torch stage in place:
    shipping it to a GPU worker from the only GPU worker's only thread would wait for itself."""
    with dask_client("", workers=1, gpu_workers=1) as client:
        workers = client.scheduler_info()["workers"]
        for address, info in workers.items():
            has_gpu = bool(info.get("resources", {}).get("GPU"))
            assert client.submit(_on_gpu_worker, 0, workers=[address], pure=False).result() is has_gpu
    assert _on_gpu_worker(0) is False  # not in a worker at all


def test_a_worker_keeps_only_its_recent_pipelines(synth_nuscenes, tmp_path):
    """A long-lived worker of a shared cluster sets up one pipeline per manifest (models included) and
    keeps the few it used last, not every manifest it ever served."""
    from distillkit.pipelines import placement

    placement._READY.clear()
    ms = [slidr_manifest(synth_nuscenes, tmp_path / f"o{i}", f"stages.superpixels.n_segments={20 + i}")
          for i in range(placement._KEEP_READY + 2)]
    for m in ms:
        placement.worker_pipeline(m)
    assert len(placement._READY) == placement._KEEP_READY
    kept = placement.worker_pipeline(ms[-1])
    assert kept is placement.worker_pipeline(ms[-1])  # still set up once
    assert (ms[0].pipeline, ms[0].content_hash()) not in placement._READY
