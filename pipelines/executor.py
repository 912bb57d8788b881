"""Where shard tasks run: an embedded dask LocalCluster, an existing scheduler, or in-process.

The runner only sees ``open_executor(...)`` yielding an object whose ``map(fn, tasks, keys)``
yields results as they complete, so pipelines never know which executor (if any) runs them.
``scheduler="serial"`` runs every task in this process, in order: the same bytes as dask, and
a failing stage shows a plain traceback (with ``build --raise-errors``) that ``pdb`` can enter.

``Executor.progress(on_report)`` gives tasks a way to report progress while they run (so a bar moves
before the first shard finishes): in-process it is ``on_report`` itself; on dask a picklable
``EventReporter`` that sends each report as a dask event (``Worker.log_event``, fire and forget) to the
one topic of distillkit's progress, tagged with the build's token, which this client subscribes to.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from distillkit.pipelines.jobqueue import JobQueueError, WorkerWatch, describe, is_job_queue, job_queue_client
from distillkit.pipelines.placement import GPU, gpu_worker_env

log = logging.getLogger(__name__)

SERIAL = "serial"
Reporter = Callable[[int, Sequence[int]], None]
"""``report(task_id, counts)``: a running task's cumulative counts (called on a worker, received on the client)."""


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

    def progress(self, on_report: Reporter) -> AbstractContextManager[Reporter]:
        """For the duration of the block, a reporter for tasks to call; each call reaches ``on_report``
        on this process (on dask, on the client's event-loop thread: ``on_report`` must be thread-safe;
        reports may arrive late, after the task's result, and a retried task reports again from 0)."""
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

    @contextmanager
    def progress(self, on_report: Reporter) -> Iterator[Reporter]:
        yield on_report  # same process, same thread: nothing to carry


class DaskExecutor:
    """Tasks on a dask ``distributed`` cluster through ``client``."""

    def __init__(self, client: Any, description: str, local: bool, watch: WorkerWatch | None = None):
        """Args:
            client: the cluster's client.
            description: for logs.
            local: every worker runs on this machine.
            watch: a job queue's watch of its workers: ``map`` stops with :class:`ClusterError` once they are
                all gone for good.
        """
        self.client, self.description, self.local, self.watch = client, description, local, watch
        workers = client.scheduler_info()["workers"]
        self._gpu = sorted(a for a, w in workers.items() if w.get("resources", {}).get(GPU, 0) > 0)
        self._cpu = sorted(a for a in workers if a not in self._gpu)
        self.gpu_workers = len(self._gpu)

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
            spare_gpu_workers: bool = False) -> Iterator[Any]:
        only = self._cpu if spare_gpu_workers and self._gpu and self._cpu else None
        return map_tasks(self.client, fn, tasks, keys, only, watch=self.watch)

    @contextmanager
    def progress(self, on_report: Reporter) -> Iterator[Reporter]:
        # One topic for every build, each report tagged with its build's token: the scheduler keeps every topic
        # it ever saw (with its last events), so a topic per build would grow a long-lived shared scheduler's
        # memory build after build; with one, it holds at most ``distributed.admin.low-level-log-length``
        # events. Builds sharing a scheduler skip each other's reports by the token; builds sharing a client
        # share its one subscription (a client holds one handler per topic).
        token = uuid.uuid4().hex
        # The (un)subscription happens under the lock, so a build ending and one starting on the same client
        # cannot leave the topic unsubscribed; the event handler never takes it (a dict read is atomic).
        with _listeners_lock:
            listeners = _listeners.setdefault(self.client.id, {})
            if not listeners:
                self.client.subscribe_topic(PROGRESS_TOPIC, functools.partial(_dispatch, listeners))
            listeners[token] = on_report
        try:
            yield EventReporter(PROGRESS_TOPIC, token)
        finally:
            with _listeners_lock:
                listeners.pop(token, None)
                if not listeners:
                    _listeners.pop(self.client.id, None)
                    try:
                        self.client.unsubscribe_topic(PROGRESS_TOPIC)
                    except (ValueError, OSError, RuntimeError):  # the client is already closing: nothing to stop
                        pass


_listeners_lock = threading.Lock()
_listeners: dict[str, dict[str, Reporter]] = {}
"""Per dask client id: the ``on_report`` of each build in progress, by the build's token."""


def _dispatch(listeners: dict[str, Reporter], event: tuple[float, Any]) -> None:
    """Hand a progress event to the build whose token it carries (reports of other builds are skipped)."""
    msg = event[1]
    if not (isinstance(msg, (list, tuple)) and len(msg) > 1):
        return
    on_report = listeners.get(msg[0])
    if on_report is not None:
        on_report(int(msg[1]), [int(c) for c in msg[2:]])


PROGRESS_TOPIC = "distillkit-progress"
"""The dask event topic of every build's progress reports (``DaskExecutor.progress``)."""


@dataclass(frozen=True)
class EventReporter:
    """Sends ``report(task_id, counts)`` from a dask worker as an event on ``topic``, tagged with the build's
    ``token`` (travels with the task)."""

    topic: str
    token: str = ""

    def __call__(self, task_id: int, counts: Sequence[int]) -> None:
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):  # not on a worker (a test calling the task directly): nobody listens
            return
        # Progress is best effort: a report that cannot be sent must never fail the shard.
        try:
            worker.log_event(self.topic, [self.token, int(task_id), *(int(c) for c in counts)])
        except Exception:  # noqa: BLE001
            pass


@contextmanager
def open_executor(scheduler: str = "", workers: int = 2, threads_per_worker: int = 1,
                  gpu_workers: int = 0, cluster: Mapping[str, Any] | None = None) -> Iterator[Executor]:
    """An executor for ``scheduler``: ``"serial"`` (in-process), ``""`` (an embedded cluster of
    ``workers`` processes, plus ``gpu_workers`` that advertise the ``GPU`` resource) or a dask
    scheduler address (``tcp://host:8786``; its workers say themselves which own a GPU).

    Args:
        scheduler: ``"serial"``, ``""`` or a dask scheduler address.
        workers: the embedded cluster's worker processes.
        threads_per_worker: threads of each of those.
        gpu_workers: the embedded cluster's GPU workers.
        cluster: the manifest's ``[cluster]`` section: with ``kind = "slurm"`` / ``"pbs"`` and no ``scheduler``,
            the build's workers are batch jobs (``pipelines.jobqueue``) instead of an embedded cluster (the
            arguments above are then unused).

    Raises:
        ClusterError: the scheduler cannot be reached or the cluster does not start (or its jobs' workers did
            not join in time).
    """
    if scheduler == SERIAL:
        yield SerialExecutor()
        return
    if not scheduler and is_job_queue(cluster):
        assert cluster is not None
        if (workers, threads_per_worker, gpu_workers) != (2, 1, 0):  # this function's defaults, the manifest's
            log.warning("cluster.workers / threads_per_worker / gpu_workers (--workers) size the embedded cluster "
                        "only: ignored with cluster.kind = %r (jobs, cores, processes and gpu_jobs size its jobs)",
                        cluster["kind"])
        try:
            with job_queue_client(cluster) as (client, watch):
                yield DaskExecutor(client, f"dask {describe(cluster)}", local=False, watch=watch)
        except JobQueueError as exc:
            raise ClusterError(str(exc)) from None
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
        # Workers keep logging while they close: a heartbeat that meets the closing scheduler logs
        # "Failed to communicate with scheduler during heartbeat" with a traceback on the terminal
        # after a build that went well. Errors during the build still show (they happen before this);
        # the client goes first, so no future of ours is pending while the workers stop.
        _quiet_workers(client)
        client.close()
        cluster.close()
        quiet.setLevel(level)


def _quiet_distributed_logs() -> None:
    """Run on each worker at shutdown: only critical messages from ``distributed`` from now on."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


QUIET_TIMEOUT_S = 10
"""Seconds ``_quiet_workers`` waits for the workers' answer."""


def _quiet_workers(client: Any, timeout: float = QUIET_TIMEOUT_S) -> bool:
    """Quiet the embedded cluster's workers before it closes (best effort: a dead worker has nothing to say).

    ``Client.run`` takes no timeout and waits for every worker it knows; one that hangs (stuck in a C call,
    say) must not hang the end of a finished build, so the call runs on a daemon thread given ``timeout``
    seconds, after which the cluster closes anyway (a late answer is simply dropped).

    Args:
        client: the embedded cluster's client.
        timeout: seconds to wait for the workers' answer.

    Returns:
        Whether every worker answered in time.
    """
    def call() -> None:
        try:
            client.run(_quiet_distributed_logs, on_error="ignore")
        except Exception:  # noqa: BLE001 - shutting down anyway; never mask the build's own outcome
            pass

    worker = threading.Thread(target=call, name="distillkit-quiet-workers", daemon=True)
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


def map_tasks(
    client: Any, fn: Callable[[Any], Any], tasks: Sequence[Any], keys: Sequence[str],
    workers: list[str] | None = None, watch: WorkerWatch | None = None,
) -> Iterator[Any]:
    """Submit one task per item with explicit keys (writes are not pure functions) and
    yield results as they finish, on ``workers`` only when given. Futures are held until
    iteration ends so dask never forgets work in flight.

    Args:
        client: the cluster's client.
        fn: the task function.
        tasks: one item per task.
        keys: one dask key per task.
        workers: run only there (default: anywhere).
        watch: a job queue's watch of its workers: once they are all gone for good it cancels the futures still
            running (which wakes ``as_completed``) and the iteration stops with :class:`ClusterError`.

    Raises:
        ClusterError: ``watch`` saw every worker gone.
    """
    from distributed import as_completed

    futures = client.map(fn, tasks, key=list(keys), pure=False, retries=1, workers=workers,
                         allow_other_workers=False)
    watching = watch.watching(lambda: client.cancel(futures)) if watch is not None else nullcontext()
    try:
        with watching:
            for future in as_completed(futures):
                if watch is not None and watch.message:
                    raise ClusterError(watch.message)
                yield future.result()
    finally:
        for future in futures:
            future.cancel()
