"""Where shard tasks run: an embedded dask LocalCluster or an existing scheduler.

The runner only sees ``map_tasks(fn, tasks, keys)`` yielding results as they complete,
so pipelines never know which cluster (if any) runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


class ClusterError(Exception):
    """The scheduler could not be reached or the cluster failed to start."""


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
