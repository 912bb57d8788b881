"""Where a pipeline's torch stages run: on a dask worker that owns a GPU, or where the shard is built.

A cluster's GPU workers advertise the dask resource ``GPU`` (the embedded cluster starts one per
visible CUDA device; on a cluster of your own, ``dask worker ... --resources GPU=1``). When a
build has GPU workers and the pipeline declares torch stages (``Pipeline.torch_stages``), shard
tasks go to the other workers, which read inputs, decode and write shards, and each torch stage
call (:func:`run_stage`) ships its batch to a GPU worker and waits for the result. Without GPU
workers the stage runs in the shard's own process, on CUDA if that process sees one
(``device = "auto"``), else on the CPU torch path.

The stage itself is a method of the pipeline taking ``device=``; it runs on the pipeline set up
in the executing process (:func:`worker_pipeline`), so a model is loaded where it is used, once
per process. ``setup`` must therefore not load GPU models eagerly: a CPU worker that only ships
batches would load them for nothing.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from distillkit.pipelines.registry import get_pipeline
from distillkit.preprocess.devices import DEVICES, resolve_device

if TYPE_CHECKING:
    from distillkit.pipelines.base import Pipeline
    from distillkit.pipelines.manifest import Manifest

GPU = "GPU"
"""The dask worker resource that marks a worker owning one GPU."""
__all__ = ["DEVICES", "GPU", "gpu_worker_env", "resolve_device", "run_stage", "shard_context", "worker_pipeline"]

_READY: OrderedDict[tuple[str, str], Pipeline] = OrderedDict()
_KEEP_READY = 4
"""Set-up pipelines a process keeps (the most recently used): a long-lived worker of a shared cluster
serves build after build, and each may hold a model on its GPU."""
_READY_LOCK = threading.Lock()
_task = threading.local()


def worker_pipeline(m: Manifest) -> Pipeline:
    """The manifest's pipeline, ``setup`` run once in this process for this manifest."""
    key = (m.pipeline, m.content_hash())
    with _READY_LOCK:
        if key not in _READY:
            pipeline = type(get_pipeline(m.pipeline))()  # a private instance: setup may hold state
            pipeline.setup(m)
            _READY[key] = pipeline
            while len(_READY) > _KEEP_READY:
                _READY.popitem(last=False)
        _READY.move_to_end(key)
        return _READY[key]


@contextmanager
def shard_context(remote: bool) -> Iterator[dict[str, set[str]]]:
    """Around one shard's build, in its thread: whether torch stages go to GPU workers, and the
    devices each stage ran on (filled by :func:`run_stage`, recorded in the shard's record)."""
    devices: dict[str, set[str]] = {}
    previous = getattr(_task, "state", None)
    _task.state = (remote, devices)
    try:
        yield devices
    finally:
        _task.state = previous


def run_stage(m: Manifest, stage: str | tuple[str, ...], method: str, *args: Any, device: str) -> Any:
    """``getattr(pipeline, method)(*args, device=...)`` where this build's torch stages run.

    Args:
        m: the manifest (it names the pipeline; workers set it up once per process).
        stage: the stage's name in ``Pipeline.torch_stages`` and ``index.json`` (``"superpixels"``),
            or the names of the stages one call runs.
        method: the name of a pipeline method taking ``device=`` (``"cpu"`` or ``"cuda"``).
        *args: the batch, pickled to the GPU worker when the stage is placed there.
        device: the stage's requested device (``"auto"``, ``"cpu"``, ``"cuda"``).
    """
    remote, devices = getattr(_task, "state", None) or (False, {})
    if remote and device != "cpu" and not _on_gpu_worker():
        from distributed import get_client

        # Blocking this thread (not seceding) bounds the batches waiting for the GPU by the CPU
        # workers' threads; it cannot deadlock since shard tasks never run on GPU workers.
        future = get_client().submit(_run_here, m, method, args, device, resources={GPU: 1}, pure=False)
        result, used = future.result()
    else:
        result, used = _run_here(m, method, args, device)
    for name in (stage,) if isinstance(stage, str) else stage:
        devices.setdefault(name, set()).add(used)
    return result


def _run_here(m: Manifest, method: str, args: tuple[Any, ...], device: str) -> tuple[Any, str]:
    used = resolve_device(device)
    return getattr(worker_pipeline(m), method)(*args, device=used), used


def _on_gpu_worker() -> bool:
    try:
        from distributed import get_worker

        return get_worker().state.total_resources.get(GPU, 0) > 0
    except (ImportError, ValueError, AttributeError):
        return False


def gpu_worker_env(index: int) -> dict[str, str]:
    """The environment of the embedded cluster's ``index``-th GPU worker: it sees only its device
    (the ``index``-th of those this process may see, when ``CUDA_VISIBLE_DEVICES`` is set)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": visible[index] if index < len(visible) else str(index)}
