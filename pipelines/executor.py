"""Where shard tasks run: an embedded dask LocalCluster, an existing scheduler, or in-process.

The runner only sees ``open_executor(...)`` yielding an object whose ``map(fn, tasks, keys)``
yields results as they complete, so pipelines never know which executor (if any) runs them.
``scheduler="serial"`` runs every task in this process, in order: the same bytes as dask, and
a failing stage shows a plain traceback (with ``build --raise-errors``) that ``pdb`` can enter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

SERIAL = "serial"


class ClusterError(Exception):
    """The scheduler could not be reached or the cluster failed to start."""


class Executor(Protocol):
    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]) -> Iterator[Any]:
        """Run ``fn`` on every task; yield the results as tasks finish (in any order)."""
        ...


class SerialExecutor:
    """Every task in this process, in order; exceptions propagate with their traceback."""

    description = "in-process (serial)"

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]) -> Iterator[Any]:
        for task in tasks:
            yield fn(task)


class DaskExecutor:
    """Tasks on a dask ``distributed`` cluster through ``client``."""

    def __init__(self, client: Any, description: str):
        self.client, self.description = client, description

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]) -> Iterator[Any]:
        return map_tasks(self.client, fn, tasks, keys)


@contextmanager
def open_executor(scheduler: str = "", workers: int = 2, threads_per_worker: int = 1) -> Iterator[Executor]:
    """An executor for ``scheduler``: ``"serial"`` (in-process), ``""`` (an embedded LocalCluster
    of ``workers`` processes) or a dask scheduler address (``tcp://host:8786``).

    Raises:
        ClusterError: the scheduler cannot be reached or the cluster does not start.
    """
    if scheduler == SERIAL:
        yield SerialExecutor()
        return
    where = scheduler or f"LocalCluster({workers} workers)"
    with dask_client(scheduler, workers, threads_per_worker) as client:
        yield DaskExecutor(client, f"dask {where}")


@contextmanager
def dask_client(scheduler: str = "", workers: int = 2, threads_per_worker: int = 1) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` when given, else to an embedded
    ``LocalCluster`` of ``workers`` processes (processes, not threads: SLIC and JPEG work
    holds the GIL in places, and memory limits are enforced only on processes)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
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
        dashboard_address=None,
        silence_logs=logging.ERROR,
        # One BLAS/OpenMP thread per worker thread: the parallelism is across shards.
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
        quiet.setLevel(level)


def map_tasks(
    client: Any, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str]
) -> Iterator[Any]:
    """Submit one task per item with explicit keys (writes are not pure functions) and
    yield results as they finish. Futures are held until iteration ends so dask never
    forgets work in flight."""
    from distributed import as_completed

    futures = client.map(fn, tasks, key=list(keys), pure=False, retries=1)
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()
