"""Where shard tasks run: an embedded dask LocalCluster, an existing scheduler, or in-process.

The runner only sees ``open_executor(...)`` yielding an object whose ``map(fn, tasks, keys)``
yields results as they complete, so pipelines never know which executor (if any) runs them.
``scheduler="serial"`` runs every task in this process, in order: the same bytes as dask, and
a failing stage shows a plain traceback (with ``build --raise-errors``) that ``pdb`` can enter.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from distillkit.pipelines.placement import GPU, gpu_worker_env

SERIAL = "serial"


class ClusterError(Exception):
    """The scheduler could not be reached or the cluster failed to start."""


class Executor(Protocol):
    description: str
    local: bool
    """Every worker runs on this machine (serial, or the embedded cluster)."""
    gpu_workers: int
    """Workers advertising the ``GPU`` resource (``pipelines.placement``); 0 in-process."""

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
            spare_gpu_workers: bool = False) -> Iterator[Any]:
        """Run ``fn`` on every task; yield the results as tasks finish (in any order).
        ``spare_gpu_workers``: keep the tasks off GPU workers (when other workers exist), which
        then serve only the torch stages' batches."""
        ...


class SerialExecutor:
    """Every task in this process, in order; exceptions propagate with their traceback."""

    description = "in-process (serial)"
    local = True
    gpu_workers = 0

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
            spare_gpu_workers: bool = False) -> Iterator[Any]:
        for task in tasks:
            yield fn(task)


class DaskExecutor:
    """Tasks on a dask ``distributed`` cluster through ``client``."""

    def __init__(self, client: Any, description: str, local: bool):
        self.client, self.description, self.local = client, description, local
        workers = client.scheduler_info()["workers"]
        self._gpu = sorted(a for a, w in workers.items() if w.get("resources", {}).get(GPU, 0) > 0)
        self._cpu = sorted(a for a in workers if a not in self._gpu)
        self.gpu_workers = len(self._gpu)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
            spare_gpu_workers: bool = False) -> Iterator[Any]:
        only = self._cpu if spare_gpu_workers and self._gpu and self._cpu else None
        return map_tasks(self.client, fn, tasks, keys, only)


@contextmanager
def open_executor(scheduler: str = "", workers: int = 2, threads_per_worker: int = 1,
                  gpu_workers: int = 0) -> Iterator[Executor]:
    """An executor for ``scheduler``: ``"serial"`` (in-process), ``""`` (an embedded cluster of
    ``workers`` processes, plus ``gpu_workers`` that advertise the ``GPU`` resource) or a dask
    scheduler address (``tcp://host:8786``; its workers say themselves which own a GPU).

    Raises:
        ClusterError: the scheduler cannot be reached or the cluster does not start.
    """
    if scheduler == SERIAL:
        yield SerialExecutor()
        return
    gpus = f" + {gpu_workers} GPU" if gpu_workers else ""
    where = scheduler or f"LocalCluster({workers} workers{gpus})"
    with dask_client(scheduler, workers, threads_per_worker, gpu_workers) as client:
        yield DaskExecutor(client, f"dask {where}", local=not scheduler)


@contextmanager
def dask_client(scheduler: str = "", workers: int = 2, threads_per_worker: int = 1,
                gpu_workers: int = 0) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` when given, else to an embedded
    ``LocalCluster`` of ``workers`` processes (processes, not threads: SLIC and JPEG work holds the GIL
    in places, and memory limits are enforced only on processes) and ``gpu_workers`` more, each
    with one thread, the ``GPU`` resource and one CUDA device of its own."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, ValueError, TypeError) as exc:  # unreachable, or not an address at all
            raise ClusterError(f"cannot reach dask scheduler {scheduler}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
        return
    # The embedded scheduler lives in this process: its INFO chatter (and the tracebacks it
    # logs for connections closed during an orderly shutdown) would bury our output.
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        # the scheduler serves HTTP (health, metrics) even without a dashboard: any free port, so two builds on
        # one machine never collide on 8787
        dashboard_address=":0",
        silence_logs=logging.ERROR,
        # One BLAS/OpenMP thread per worker thread: the parallelism is across shards.
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    # GPU workers: LocalCluster's own worker template with one thread, the GPU resource and one
    # device each; scaling to the spec's size starts the workers it names that are not running.
    for i in range(gpu_workers):
        spec = copy.deepcopy(cluster.new_spec)
        spec["options"].update(nthreads=1, resources={GPU: 1})
        spec["options"]["env"] = {**spec["options"].get("env", {}), **gpu_worker_env(i)}
        cluster.worker_spec[f"gpu-{i}"] = spec
    if gpu_workers:
        cluster.scale(len(cluster.worker_spec))
    client = Client(cluster)
    if gpu_workers:
        client.wait_for_workers(workers + gpu_workers, timeout=120)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        quiet.setLevel(level)


def map_tasks(
    client: Any, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
    workers: list[str] | None = None,
) -> Iterator[Any]:
    """Submit one task per item with explicit keys (writes are not pure functions) and
    yield results as they finish, on ``workers`` only when given. Futures are held until
    iteration ends so dask never forgets work in flight."""
    from distributed import as_completed

    futures = client.map(fn, tasks, key=list(keys), pure=False, retries=1, workers=workers,
                         allow_other_workers=False)
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
