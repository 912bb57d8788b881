"""Builds on SLURM or PBS: a manifest's ``[cluster]`` with ``kind = "slurm"`` / ``"pbs"`` starts its own workers.

``distillkit build`` then starts a dask scheduler in its own process and submits ``cluster.jobs`` batch jobs through
dask-jobqueue (``SLURMCluster`` / ``PBSCluster``); each job runs ``cluster.processes`` dask workers sharing
``cluster.cores`` and ``cluster.memory``. ``cluster.gpu_jobs`` more jobs each request ``cluster.gpus_per_job`` GPUs
(``--gres=gpu:N`` on SLURM, ``ngpus=N`` in the PBS select) and run one single-threaded worker per GPU that advertises
the dask resource ``GPU`` and sees only its own device: the GPU workers of the embedded cluster
(``pipelines.executor.dask_client``), which the torch stages go to (``pipelines.placement``). The build waits until
every worker has joined (``cluster.join_timeout`` seconds, then one line saying how many did) and cancels the jobs
when it ends, also on an error or Ctrl-C.

Every worker reads the inputs and writes the shards itself: inputs and ``output.dir`` must be on a filesystem all
nodes share, or in object storage (docs/cluster.md).

This module imports neither dask-jobqueue nor distributed at import time: the manifest checks
(:func:`check_cluster`) run on machines without them.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distillkit.pipelines.placement import GPU, gpu_worker_env

log = logging.getLogger(__name__)

LOCAL = "local"
KINDS = (LOCAL, "slurm", "pbs")
"""``cluster.kind``: the embedded/explicit dask cluster of ``cluster.scheduler``, or a job queue."""
_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
_LABELS = {"slurm": "SLURM", "pbs": "PBS"}
_QUEUE_COMMANDS = {"slurm": "squeue", "pbs": "qstat"}
_LIST_OURS = {"slurm": "squeue --name distillkit,distillkit-gpu",
              "pbs": "qselect -N distillkit; qselect -N distillkit-gpu"}
"""How to list this build's jobs by hand (job names ``distillkit`` and ``distillkit-gpu``; PBS's qstat has no name
filter, qselect -N has)."""
INSTALL = "pip install 'dask-jobqueue>=0.9'"
"""What to install for ``kind = "slurm"`` / ``"pbs"`` (said in the error when it is absent)."""
SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:8786"
"""The scheduler address in a printed job script: the real one is known only once the scheduler runs."""

# HH:MM:SS, MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (SLURM's forms, sbatch(1) --time). A bare number is refused: SLURM
# reads "30" as 30 minutes, PBS as 30 seconds. PBS takes [[HH:]MM:]SS only: the day forms are converted for it
# (:func:`queue_walltime`).
_WALLTIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d{1,2}))?(?::(?P<ds>\d{1,2}))?"
                       r"|\d+(?::\d{1,2}){1,2})$")
_BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
"""Set to 1 in every job, as the embedded cluster sets them for its workers (pipelines/executor.py ``dask_client``)."""


class JobQueueError(Exception):
    """A job-queue cluster cannot start or its workers did not join (one line)."""


def is_job_queue(cluster: Mapping[str, Any] | None) -> bool:
    """Whether a manifest's ``[cluster]`` names a job queue (``kind`` other than ``"local"``).

    Args:
        cluster: the manifest's validated ``[cluster]`` section, or None.
    """
    return bool(cluster) and cluster.get("kind", LOCAL) != LOCAL  # type: ignore[union-attr]


def check_cluster(file: str | Path, cluster: Mapping[str, Any]) -> None:
    """Check a validated ``[cluster]`` section's job-queue keys (types are checked by the schema already).

    Args:
        file: the manifest (named in the error).
        cluster: the section, defaults filled in.

    Raises:
        ManifestError: one line naming the key: a walltime missing or malformed, a size below 1, a memory that is
            not a size, a job queue together with ``scheduler``, or dask-jobqueue not installed.
    """
    from distillkit.pipelines.manifest import ManifestError

    kind = cluster["kind"]
    if kind == LOCAL:
        return
    label = _LABELS[kind]
    if cluster["scheduler"]:
        raise ManifestError(file, "cluster.scheduler", f"must be empty with cluster.kind = {kind!r}: the {label} "
                                                      f"cluster starts its own scheduler, got {cluster['scheduler']!r}")
    if not cluster["walltime"]:
        raise ManifestError(file, "cluster.walltime", f"required with cluster.kind = {kind!r} (e.g. \"01:00:00\")")
    if not _WALLTIME.match(cluster["walltime"]):
        bare = " (a bare number is minutes on SLURM, seconds on PBS: write it as HH:MM:SS)" \
            if cluster["walltime"].isdigit() else ""
        raise ManifestError(file, "cluster.walltime", f"expected [D-]HH:MM:SS, got {cluster['walltime']!r}{bare}")
    for key in ("cores", "jobs", "processes", "gpus_per_job", "join_timeout"):
        if cluster[key] < 1:
            raise ManifestError(file, f"cluster.{key}", f"must be >= 1, got {cluster[key]}")
    if cluster["gpu_jobs"] < 0:
        raise ManifestError(file, "cluster.gpu_jobs", f"must be >= 0, got {cluster['gpu_jobs']}")
    if cluster["processes"] > cluster["cores"]:
        raise ManifestError(file, "cluster.processes", f"{cluster['processes']} worker processes need at least as "
                                                       f"many cores per job, got cores = {cluster['cores']}")
    from dask.utils import parse_bytes

    try:
        if parse_bytes(cluster["memory"]) <= 0:
            raise ValueError
    except (ValueError, TypeError):
        raise ManifestError(file, "cluster.memory", f"expected a size like \"16GiB\", got {cluster['memory']!r}") \
            from None
    for key in ("job_extra_directives", "job_script_prologue"):
        bad = [item for item in cluster[key] if not isinstance(item, str)]
        if bad:
            raise ManifestError(file, f"cluster.{key}", f"expected a list of strings, got {bad[0]!r}")
    if importlib.util.find_spec("dask_jobqueue") is None:
        raise ManifestError(file, "cluster.kind", f"{kind!r} needs dask-jobqueue, which is not installed: {INSTALL}")


def queue_walltime(kind: str, walltime: str) -> str:
    """``walltime`` as the queue of ``kind`` reads it: unchanged for SLURM; for PBS, whose ``-l walltime`` takes
    no days, a ``D-HH[:MM[:SS]]`` becomes ``HH:MM:SS`` (``1-00:00:00`` -> ``24:00:00``, ``2-12`` -> ``60:00:00``).

    Args:
        kind: ``"slurm"`` or ``"pbs"``.
        walltime: a walltime that :func:`check_cluster` accepted.
    """
    match = _WALLTIME.match(walltime)
    if kind != "pbs" or match is None or match["days"] is None:
        return walltime
    hours = int(match["days"]) * 24 + int(match["dh"])
    return f"{hours:02d}:{int(match['dm'] or 0):02d}:{int(match['ds'] or 0):02d}"


def job_kwargs(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """The dask-jobqueue ``Job`` keywords of the CPU jobs (``SLURMJob`` / ``PBSJob``, dask_jobqueue/core.py
    ``Job.__init__`` and slurm.py / pbs.py).

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
    """
    kwargs: dict[str, Any] = {
        "cores": cluster["cores"],
        "memory": cluster["memory"],
        "processes": cluster["processes"],
        "walltime": queue_walltime(cluster["kind"], cluster["walltime"]),
        "job_name": "distillkit",
        "job_extra_directives": list(cluster["job_extra_directives"]),
        # One BLAS/OpenMP thread per worker thread, first (the user's lines may override): every worker thread
        # runs a shard of its own, so the parallelism is across shards, as on the embedded cluster; left unset,
        # OpenMP would start one thread per core of the job in every worker thread.
        "job_script_prologue": [*(f"export {var}=1" for var in _BLAS_THREADS), *cluster["job_script_prologue"]],
        "worker_extra_args": [],
    }
    for key in ("queue", "account", "interface", "local_directory", "python"):
        if cluster[key]:
            kwargs[key] = cluster[key]
    if cluster["log_directory"]:
        # dask-jobqueue makes the folder as given (core.py ``Job.__init__``, os.makedirs) and writes it into
        # ``#SBATCH -o``, where SLURM does not expand "~": a "~/logs" would become ./~/logs here and on the nodes.
        kwargs["log_directory"] = str(Path(cluster["log_directory"]).expanduser())
    return kwargs


def gpu_job_kwargs(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of a GPU job: ``gpus_per_job`` GPUs, one single-threaded worker per GPU advertising the
    ``GPU`` resource (as the embedded cluster's GPU workers: one thread each, the torch stages' batches queue on
    the resource), each pinned to its own device by this module's preload (:func:`dask_setup`).

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
    """
    kwargs = job_kwargs(cluster)
    gpus = cluster["gpus_per_job"]
    # cores = gpus makes dask-jobqueue give each worker one thread (cores / processes, core.py
    # ``worker_process_threads``); the job asks the queue for that many CPUs.
    kwargs.update(cores=gpus, processes=gpus, job_name="distillkit-gpu")
    if cluster["gpu_queue"]:
        kwargs["queue"] = cluster["gpu_queue"]
    if cluster["kind"] == "slurm":
        kwargs["job_extra_directives"] = [*kwargs["job_extra_directives"], f"--gres=gpu:{gpus}"]
    else:
        # PBSJob writes its default "-l select=1:ncpus=..:mem=.." only without a resource_spec (pbs.py): the GPU
        # count joins that same select statement.
        from dask.utils import parse_bytes

        mem = import_dask_jobqueue().pbs.pbs_format_bytes_ceil(parse_bytes(cluster["memory"]))
        kwargs["resource_spec"] = f"select=1:ncpus={gpus}:ngpus={gpus}:mem={mem}"
    kwargs["worker_extra_args"] = ["--resources", f"{GPU}=1"]
    if gpus > 1:
        # Every process of a job sees all its GPUs: the preload narrows each to the one of its index.
        kwargs["worker_extra_args"] += ["--preload", __name__]
    return kwargs


def refuse_idle_gpu_jobs(file: str | Path, pipeline: str, cluster: Mapping[str, Any],
                         torch_stages: Mapping[str, str]) -> None:
    """Refuse GPU jobs a manifest gives nothing to do: they exist for the torch stages' batches
    (``pipelines.placement``), and without one they would hold GPUs to run CPU tasks. Checked before anything is
    submitted, by ``build`` and ``build --print-job-script`` alike.

    Args:
        file: the manifest's path (named in the error).
        pipeline: the manifest's pipeline name.
        cluster: its validated ``[cluster]`` section.
        torch_stages: ``Pipeline.torch_stages(m)``.

    Raises:
        ManifestError: ``cluster.gpu_jobs`` > 0 with no torch stage.
    """
    from distillkit.pipelines.manifest import ManifestError

    if is_job_queue(cluster) and cluster["gpu_jobs"] and not torch_stages:
        raise ManifestError(file, "cluster.gpu_jobs", f"{cluster['gpu_jobs']} GPU job(s) asked for, but this "
                                                      f"{pipeline!r} manifest has no torch stage to run on them: "
                                                      "set cluster.gpu_jobs = 0")


def cluster_class(kind: str) -> Any:
    """``dask_jobqueue.SLURMCluster`` or ``PBSCluster`` for ``kind``.

    Args:
        kind: ``"slurm"`` or ``"pbs"``.

    Raises:
        JobQueueError: dask-jobqueue is not installed.
    """
    try:
        dask_jobqueue = import_dask_jobqueue()
    except ImportError:
        raise JobQueueError(f"cluster.kind = {kind!r} needs dask-jobqueue, which is not installed: {INSTALL}") \
            from None
    return getattr(dask_jobqueue, _CLASSES[kind])


def import_dask_jobqueue() -> Any:
    """``import dask_jobqueue``, keeping Ctrl-C a ``KeyboardInterrupt``.

    Importing dask-jobqueue sets the process's SIGINT handler to ``lambda *_: sys.exit()`` (dask_jobqueue/runner.py
    line 18, imported by its ``__init__`` through slurm.py): a Ctrl-C would then end the build with exit status 0,
    as if it had finished. Its jobs were still cancelled (``SystemExit`` runs the ``finally`` blocks), but a script
    checking the status would go on. Python's own handler is put back, whenever the module was first imported.

    Raises:
        ImportError: dask-jobqueue is not installed.
    """
    import signal
    import threading

    import dask_jobqueue

    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__module__", "") == "dask_jobqueue.runner" and \
            threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return dask_jobqueue


def job_scripts(cluster: Mapping[str, Any], address: str = SCHEDULER_PLACEHOLDER) -> list[tuple[str, int, str]]:
    """The job scripts a build would submit, without submitting anything: (what, how many, script) for the CPU
    jobs and, with ``gpu_jobs``, the GPU jobs.

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
        address: the scheduler address written into the worker command.
    """
    job_cls = cluster_class(cluster["kind"]).job_cls
    warn_ignored(cluster)
    # dask-jobqueue's Job makes ``log_directory`` when constructed (core.py ``Job.__init__``): a script that is
    # only printed must leave no folder behind, so the ones it made are removed again (only those, only if empty).
    made = _missing_folders(cluster["log_directory"])
    try:
        out = [("job", cluster["jobs"],
                job_cls(address, name="distillkit-worker", **job_kwargs(cluster)).job_script())]
        if cluster["gpu_jobs"]:
            script = job_cls(address, name="distillkit-gpu-worker", **gpu_job_kwargs(cluster)).job_script()
            out.append(("GPU job", cluster["gpu_jobs"], script))
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not made by us after all, or not empty: leave it
                pass
    return out


def _missing_folders(path: str) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (none for ``""``)."""
    if not path:
        return []
    folder = Path(path).expanduser().absolute()
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def start_cluster(cluster: Mapping[str, Any], cluster_cls: Any = None) -> Any:
    """A started dask-jobqueue cluster with the section's CPU and GPU jobs submitted (not yet joined).

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
        cluster_cls: the ``JobQueueCluster`` class (default by ``kind``; tests pass ``dask_jobqueue.local``'s).

    Raises:
        JobQueueError: a submission failed (``sbatch`` / ``qsub`` missing, or refusing a job: a bad partition or
            account); the jobs submitted before it are cancelled.
    """
    cls = cluster_cls or cluster_class(cluster["kind"])
    label = _LABELS[cluster["kind"]]
    warn_ignored(cluster)
    kwargs = job_kwargs(cluster)
    # A free dashboard port (the class defaults to 8787: two builds on one login node would collide).
    scheduler_options: dict[str, Any] = {"dashboard_address": ":0"}
    if cluster["interface"]:
        scheduler_options["interface"] = cluster["interface"]
    jq = cls(scheduler_options=scheduler_options, silence_logs=logging.ERROR, **_only_known(cls, kwargs))
    try:
        # One spec per job, named as JobQueueCluster.scale names them; GPU jobs are copies of the template
        # with their own keywords (SpecCluster starts whatever ``worker_spec`` names once it corrects its
        # state, distributed/deploy/spec.py ``_correct_state_internal``), as the embedded cluster adds its GPU
        # workers.
        for _ in range(cluster["jobs"]):
            jq.worker_spec.update(jq.new_worker_spec())
        gpus = cluster["gpus_per_job"]
        for i in range(cluster["gpu_jobs"]):
            spec = copy.deepcopy(jq.new_spec)
            spec["options"].update(_only_known(cls, gpu_job_kwargs(cluster)))
            # a job running several workers is one spec with a group (core.py JobQueueCluster.__init__)
            spec.pop("group", None)
            if gpus > 1:
                spec["group"] = [f"-{g}" for g in range(gpus)]
            jq.worker_spec[f"{jq._name}-gpu-{i}"] = spec
        # Submit now and wait for every sbatch / qsub to return: ``scale()`` only schedules the submission on the
        # cluster's event loop (spec.py ``scale``, ``loop.add_callback(self._correct_state)``) and a refused job
        # would then surface only as workers that never join. There is no public synchronous form; this is what
        # SpecCluster.__init__ itself does (distributed 2026.8.0, deploy/spec.py:292, ``self.sync(self.
        # _correct_state)``); tests/test_jobqueue.py::test_a_refused_submission_* checks it still works.
        jq.sync(jq._correct_state)
    except (OSError, RuntimeError, ValueError) as exc:  # sbatch/qsub missing, refusing a job, or unparsable output
        submitted = sum(1 for job in jq.workers.values() if getattr(job, "job_id", None))
        _cancel_after_failed_start(jq)
        # Job._call puts the command's stderr last (dask_jobqueue/core.py ``_call``): sbatch's own reason
        reason = next((ln.strip() for ln in reversed(str(exc).splitlines()) if ln.strip()), type(exc).__name__)
        also = f" ({submitted} job(s) submitted before it were cancelled)" if submitted else ""
        raise JobQueueError(f"cannot start the {label} cluster: {reason}{also}") from None
    except BaseException:
        _cancel_after_failed_start(jq)
        raise
    return jq


def _cancel_after_failed_start(jq: Any) -> None:
    """Close a cluster whose start failed: cancels the jobs that were submitted (``scancel`` / ``qdel``).

    SpecCluster's close ends by asserting that every job object still alive has stopped (distributed/deploy/
    spec.py:469). After a normal build the jobs are gone by then (``SpecCluster._created`` holds them weakly), but
    here the failed start's traceback keeps them alive: one whose submission failed is still ``created``, and
    dask-jobqueue's ``Job.close`` cancels a job without changing its status (core.py ``Job.close``), so a
    submitted one is still ``running``. Either way the close would stop half-way on that ``AssertionError``,
    leaving the cluster "closing", and distributed's exit hook would then wait 10 s for it (spec.py
    ``close_clusters``) before the process ends. So each job is first marked as what this close makes of it:
    ``failed`` (never submitted: nothing to cancel) or ``closing`` (cancelled below). Any other error while
    closing is logged, never raised in place of the start's own error."""
    from distributed.core import Status

    for job in list(jq.workers.values()):
        job.status = Status.closing if getattr(job, "job_id", None) else Status.failed
    try:
        jq.close()
    except Exception as exc:  # noqa: BLE001 - the failed start is what the user must see
        log.debug("closing the job-queue cluster after a failed start: %r", exc)


def warn_ignored(cluster: Mapping[str, Any]) -> None:
    """Log a warning for job-queue settings that do not take effect as written: ``cores`` not a multiple of
    ``processes`` (dask-jobqueue gives each worker ``cores // processes`` threads, core.py
    ``worker_process_threads``: the rest of the cores idle).

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
    """
    cores, processes = cluster["cores"], cluster["processes"]
    if cores % processes:
        log.warning("cluster.cores = %d is not a multiple of cluster.processes = %d: each worker gets %d thread(s), "
                    "%d core(s) per job stay idle", cores, processes, cores // processes, cores % processes)


def _only_known(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the queue keywords a test's ``LocalJob`` does not take (it runs the worker command itself:
    no header, no prologue)."""
    if cls.job_cls.config_name != "local":
        return kwargs
    return {k: v for k, v in kwargs.items()
            if k not in ("account", "job_extra_directives", "job_script_prologue", "resource_spec", "job_name")}


def expected_workers(cluster: Mapping[str, Any]) -> int:
    """The dask workers every job together runs: ``jobs * processes + gpu_jobs * gpus_per_job``.

    Args:
        cluster: the manifest's validated ``[cluster]`` section (a job queue).
    """
    return cluster["jobs"] * cluster["processes"] + cluster["gpu_jobs"] * cluster["gpus_per_job"]


@contextmanager
def job_queue_client(cluster: Mapping[str, Any], cluster_cls: Any = None) -> Iterator[tuple[Any, WorkerWatch]]:
    """A ``distributed.Client`` of a job-queue cluster whose every worker has joined, and the
    :class:`WorkerWatch` of its workers; the jobs are cancelled when the block ends (also on an error or Ctrl-C).

    Args:
        cluster: a validated ``[cluster]`` section naming a job queue.
        cluster_cls: the ``JobQueueCluster`` class (default by ``kind``).

    Raises:
        JobQueueError: the cluster did not start, or not every worker joined within ``join_timeout`` seconds.
    """
    from distributed import Client

    kind, label = cluster["kind"], _LABELS[cluster["kind"]]
    want, timeout = expected_workers(cluster), cluster["join_timeout"]
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the scheduler lives in this process: keep its chatter off the terminal
    started = time.monotonic()
    jq = None
    client = None
    try:
        jq = start_cluster(cluster, cluster_cls)
        client = Client(jq)
        try:
            client.wait_for_workers(want, timeout=timeout)
        except TimeoutError:
            joined = len(client.scheduler_info(n_workers=-1)["workers"])
            what = f"no {label} worker" if not joined else f"only {joined} of {want} {label} workers"
            raise JobQueueError(f"{what} joined in {timeout} s: check `{_QUEUE_COMMANDS[kind]}` "
                                f"(cluster.join_timeout sets the wait)") from None
        log.info("%d %s worker(s) joined in %.1f s", want, label, time.monotonic() - started)
        # the cluster's copy of the scheduler's worker list, kept current by its worker-status subscription
        # (distributed/deploy/cluster.py ``_watch_worker_status``)
        yield client, WorkerWatch(lambda: len(jq.scheduler_info.get("workers", {})), timeout, label)
    finally:
        _close(client, jq, kind)
        quiet.setLevel(level)


class WorkerWatch:
    """Watches a job queue's workers while a build runs. Jobs are not resubmitted: once every job has ended
    (walltime, ``scancel``, a lost node) the scheduler holds the remaining tasks for workers that never come. When
    no worker has been there for ``grace_s`` seconds, :meth:`watching` records :attr:`message` and calls its
    ``on_gone`` (once), which makes the build stop instead of waiting forever.

    Args:
        count: the number of workers now.
        grace_s: how long no worker may be there (the build's ``join_timeout``: a job may be requeued).
        label: ``"SLURM"`` or ``"PBS"``, for the message.
        poll_s: seconds between looks.
    """

    def __init__(self, count: Callable[[], int], grace_s: float, label: str, poll_s: float = 0.5):
        self.count, self.grace_s, self.label, self.poll_s = count, grace_s, label, poll_s
        self.message: str | None = None
        """One line saying why the build stops, once every worker has been gone for ``grace_s`` seconds."""

    @contextmanager
    def watching(self, on_gone: Callable[[], None]) -> Iterator[WorkerWatch]:
        """Watch on a daemon thread for the duration of the block.

        Args:
            on_gone: called on that thread once every worker has been gone ``grace_s`` seconds.
        """
        stop = threading.Event()

        def watch() -> None:
            since: float | None = None
            while not stop.wait(self.poll_s):
                try:
                    n = self.count()
                except Exception:  # noqa: BLE001 - the cluster is closing: nothing left to watch
                    return
                now = time.monotonic()
                since = None if n else since if since is not None else now
                if since is not None and now - since >= self.grace_s:
                    self.message = (f"every {self.label} worker is gone (walltime, scancel or a lost node?) and none "
                                    f"came back in {self.grace_s:g} s: the jobs are not resubmitted; rerun the build "
                                    f"to resume (finished shards are kept)")
                    on_gone()
                    return

        thread = threading.Thread(target=watch, name="distillkit-worker-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(self.poll_s + 5)


def _close(client: Any, jq: Any, kind: str) -> None:
    """Close the client, then cancel every job (scancel / qdel, dask_jobqueue/core.py ``Job.close``), whatever
    happens to the first: a Ctrl-C can leave ``distributed.utils.sync`` raising ``UnboundLocalError`` from
    ``client.close()`` (a cancelled call returns its unset ``result``, utils.py ``sync``), which must neither keep
    the jobs alive nor replace the ``KeyboardInterrupt`` on its way out."""
    try:
        if client is not None:
            client.close()
    except Exception as exc:  # noqa: BLE001 - closing anyway
        log.debug("closing the dask client: %r", exc)
    if jq is None:
        return
    try:
        jq.close()
    except Exception as exc:  # noqa: BLE001 - say how to clean up by hand, keep the build's own outcome
        log.warning("could not cancel the %s jobs (%s): `%s` lists them", _LABELS[kind], type(exc).__name__,
                    _LIST_OURS[kind])


def describe(cluster: Mapping[str, Any]) -> str:
    """A short description for logs: ``SLURMCluster(2 jobs x 1 workers + 1 GPU job x 2 GPUs)``.

    Args:
        cluster: the manifest's validated ``[cluster]`` section (a job queue).
    """
    gpu = f" + {cluster['gpu_jobs']} GPU jobs x {cluster['gpus_per_job']} GPUs" if cluster["gpu_jobs"] else ""
    return f"{_CLASSES[cluster['kind']]}({cluster['jobs']} jobs x {cluster['processes']} workers{gpu})"


def dask_setup(worker: Any) -> None:
    """Worker preload of multi-GPU jobs: the worker named ``...-I`` (the I-th process of its job, as
    ``dask worker --nworkers`` names them, distributed/cli/dask_worker.py) sees only the I-th of the job's GPUs.
    It runs before any task, so before CUDA is initialized in the process.

    Args:
        worker: the dask worker being started (distributed passes it to a preload's ``dask_setup``).
    """
    import os

    name = str(worker.name)
    index = int(name.rsplit("-", 1)[1]) if "-" in name and name.rsplit("-", 1)[1].isdigit() else 0
    os.environ.update(gpu_worker_env(index))
