"""Build shards: plan on the client, one task per shard on an executor, ``index.json`` last.

A shard task sets its pipeline up once per worker process, streams the shard's samples from
``Pipeline.build_refs`` through the schema check into the tar (one sample in memory at a time,
each field decoded at most once for checks and statistics), renames the tar into place and
writes a per-shard record ``{stem}.json``. On a rerun a task whose record, tar size and sha256
still match, whose plan and manifest fingerprint are unchanged and whose input files have the
same sizes and mtimes returns the record without rebuilding, so an interrupted build resumes
where it stopped and produces the same bytes as an uninterrupted one.

Where the shards go is an ``OutputLocation`` (``pipelines.output``): a local folder (renames, ``flock``)
or a prefix of an object store (``output.dir = "s3://bucket/prefix"``: whole-object uploads, a conditional lock
object, resume from one listing); this module builds the same way into either.

Feedback while building: a task reports its shard's cumulative counts (inputs passed, samples
written, rejected) through ``Executor.progress`` as it takes its inputs (at most five times a second, sample
counts alone at most twice; its final count always), so the bar (in inputs) moves during the first shard, not
after it; the client draws the bar at most five times a second. Python warnings and ``distillkit`` log records
of WARNING and above raised in worker processes come back with the task's result (or on its exception, when
it fails) and are logged once per build by the client at their own level (above the bar), instead of each
worker printing them on its own stderr, through the bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from distillkit.build_info import build_info
from distillkit.pipelines.base import Rejection, SampleRef
from distillkit.pipelines.executor import ClusterError, Executor, open_executor
from distillkit.pipelines.jobqueue import is_job_queue, refuse_idle_gpu_jobs
from distillkit.pipelines.manifest import Manifest, ManifestError
from distillkit.pipelines.output import (
    LOCK_NAME,
    BuildError,
    Found,
    LocalFolder,
    OutputLocation,
    check_dataset,
    output_location,
)
from distillkit.pipelines.placement import shard_context, worker_pipeline
from distillkit.pipelines.registry import get_pipeline
from distillkit.pipelines.schema import SchemaError, validate_sample
from distillkit.pipelines.shards import INDEX_FORMAT_VERSION, ShardRecord, record_name, shard_filename, sum_stats
from distillkit.remote import RemoteError

log = logging.getLogger(__name__)
LOCK_FILE = LOCK_NAME
"""The build's lock inside its output (a file locked with ``flock``; an object in an object store)."""

__all__ = ["LOCK_FILE", "BuildError", "BuildResult", "ShardTask", "build", "build_shard", "plan_tasks", "run_shard"]


@dataclass
class ShardTask:
    """One unit of work: the refs of one output shard."""

    index: int
    refs: list[SampleRef]
    manifest: Manifest
    fingerprint: str
    raise_errors: bool = False
    gpu_remote: bool = False
    """Send the pipeline's torch stages to the cluster's GPU workers (``pipelines.placement``)."""
    progress: Callable[[int, Sequence[int]], None] | None = None
    """``Executor.progress``'s reporter: ``(index, [inputs passed, samples written, rejected])``."""
    found: Found | None = None
    """What the client's one listing of a remote output holds of this shard (``OutputLocation.scan``); None
    for a local folder, where the worker looks itself."""


@dataclass
class BuildResult:
    index_path: Path | str
    """``index.json``: a path, or a URL for a build into object storage."""
    planned: int
    written: int
    rejected: list[dict[str, str]]
    reused_shards: int
    built_shards: int
    units: tuple[str, str] = ("samples", "inputs")
    """What one sample and one input are, plural (``Pipeline.units``): ("windows", "recordings")."""
    whole_inputs: int = 0
    """Rejections of whole inputs (while planning, or an input failing as a whole): each counts as one sample."""

    @property
    def rejected_fraction(self) -> float:
        """Rejected over written + rejected: the units are samples (or windows) and inputs
        rejected whole, which is the planned inputs for one-sample-per-input pipelines."""
        total = self.written + len(self.rejected)
        return len(self.rejected) / total if total else 0.0

    def over_limit(self, limit: float) -> str | None:
        """The one-line reason a build with more rejections than ``limit`` (``output.max_rejected``)
        fails, in the units the ratio counts; ``None`` within the limit.

        Args:
            limit: the largest accepted ``rejected_fraction``, a fraction in [0, 1].
        """
        fraction = self.rejected_fraction
        if fraction <= limit:
            return None
        sample, whole = self.units
        n = len(self.rejected)
        said = f"{n} of {self.written + n} {sample} rejected ({fraction:.1%}"
        if self.whole_inputs and sample != whole:  # the ratio counts a whole input as one sample: say so
            said += f"; {self.whole_inputs} of them {whole} rejected whole, each counted as one"
        # The smallest whole percent that would have passed: the value to set if the losses are acceptable.
        enough = math.ceil(fraction * 100 - 1e-9) / 100
        if enough < fraction:
            enough += 0.01
        folder = self.index_path.parent if isinstance(self.index_path, Path) else self.index_path.rsplit("/", 1)[0]
        return (f"{said}) > output.max_rejected {limit:.1%} of {sample}; the {self.written} written {sample} are in "
                f"{folder} and index.json lists every rejection with its reason: fix those inputs, "
                f"or accept the loss with --set output.max_rejected={enough:.2f}")


def refs_fingerprint(refs: list[SampleRef], content_hash: str) -> str:
    h = hashlib.sha256(content_hash.encode())
    for ref in refs:
        h.update(json.dumps([ref.key, ref.source, ref.payload], sort_keys=True).encode())
    return h.hexdigest()


def inputs_stamp(paths: list[str]) -> str:
    """sha256 over (path, size, mtime) of a shard's input files: a rerun rebuilds a shard whose
    inputs were replaced or touched since it was written, not only one whose plan changed."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(os.fsencode(path) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())  # fsencode: names not UTF-8
        except OSError:
            h.update(os.fsencode(path) + b"\0missing\n")
    return h.hexdigest()


def _existing_record(out: OutputLocation, task: ShardTask, stamp: str) -> ShardRecord | None:
    """The record of this task's shard if a finished, intact shard of the same plan and inputs is there."""

    def same_plan(rec: ShardRecord) -> bool:
        return rec.task_fingerprint == task.fingerprint and rec.inputs_stamp == stamp

    return out.existing_record(shard_filename(task.manifest.name, task.index), same_plan, task.found)


REPORT_EVERY_S = 0.5
"""Least time between two reports of a task's sample counts: enough for a live bar, few messages."""
INPUT_REPORT_EVERY_S = 0.2
"""Least time between two reports of a task's input count: an input that takes long is shown within about
this time of starting it, and a shard of many quick inputs sends at most five messages a second, not one per
input (a scheduler relaying thousands of tiny events per second for a bar is wasted work)."""


class _ShardProgress:
    """A task's cumulative counts, sent through ``ShardTask.progress``: when the pipeline takes its next input,
    at most every ``INPUT_REPORT_EVERY_S`` (a report held back then goes with the next one, at the latest the
    final one: ``flush``), and otherwise at most every ``REPORT_EVERY_S`` (a window pipeline yields many samples
    per input)."""

    def __init__(self, task: ShardTask):
        self.task, self.inputs, self.samples, self.rejected = task, 0, 0, 0
        self._last: float | None = None
        self._sent: tuple[int, int, int] | None = None

    def update(self, input_taken: bool = False) -> None:
        if self.task.progress is None:
            return
        t = time.monotonic()
        every = INPUT_REPORT_EVERY_S if input_taken else REPORT_EVERY_S
        if self._last is None or t - self._last >= every:
            self._send(t)

    def flush(self) -> None:
        """Send the counts if any report was held back: the task's last report is always its final count."""
        if self.task.progress is not None and self._sent != (self.inputs, self.samples, self.rejected):
            self._send(time.monotonic())

    def _send(self, t: float) -> None:
        self._last = t
        self._sent = (self.inputs, self.samples, self.rejected)
        self.task.progress(self.task.index, list(self._sent))  # type: ignore[misc]


class _CountedRefs(list):
    """The shard's refs, counting those a pipeline has moved past: when it takes ref ``i``, refs
    ``0..i-1`` are done (a batching pipeline may still hold a few of them; the count catches up)."""

    def __init__(self, refs: list[SampleRef], counts: _ShardProgress):
        super().__init__(refs)
        self._counts = counts

    def __iter__(self) -> Iterator[SampleRef]:
        for i, ref in enumerate(super().__iter__()):
            if i > self._counts.inputs:
                self._counts.inputs = i
                self._counts.update(input_taken=True)
            yield ref


def build_shard(task: ShardTask) -> tuple[int, ShardRecord, bool]:
    """Run on a worker: build (or reuse) one shard. Returns (shard index, record, reused)."""
    m = task.manifest
    out = output_location(m.data["output"]["dir"])
    pipeline = get_pipeline(m.pipeline)
    # stamped before building: inputs changed during the build make the next run rebuild
    stamp = inputs_stamp([p for ref in task.refs for p in pipeline.input_files(ref)])
    reused = _existing_record(out, task, stamp)
    # --raise-errors rebuilds a shard that rejected inputs on unexpected errors, so they surface
    if reused is not None and not (task.raise_errors and any(r["stage"] == "build" for r in reused.rejected)):
        return task.index, reused, True
    pipeline = worker_pipeline(m)
    rejected: list[dict[str, str]] = []
    stats: dict[str, float] = {}
    keys: list[str] = []
    counts = _ShardProgress(task)

    def checked() -> Iterator[tuple[str, dict[str, bytes]]]:
        seen: set[str] = set()
        for item in pipeline.build_refs(_CountedRefs(task.refs, counts), m, raise_errors=task.raise_errors):
            if isinstance(item, Rejection):
                rejected.append(item.to_json())
                counts.rejected = len(rejected)
                counts.update()
                continue
            if item.key in seen:
                raise ValueError(f"{m.pipeline}: build yielded the key {item.key} twice in one shard")
            seen.add(item.key)
            try:
                view = validate_sample(pipeline, item.key, item.fields)
                sample_stats = pipeline.sample_stats(view)
            except SchemaError as exc:
                rejected.append({"source": item.source, "stage": "schema", "reason": str(exc)})
                counts.rejected = len(rejected)
                counts.update()
                continue
            for k, v in sample_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
            keys.append(item.key)
            counts.samples = len(keys)
            counts.update()
            yield item.key, item.fields

    tar_name = shard_filename(m.name, task.index)
    with shard_context(task.gpu_remote) as devices:
        size, digest, n = out.write_shard(tar_name, checked())
    counts.inputs = len(task.refs)
    counts.flush()
    record = ShardRecord(
        file=tar_name,
        samples=n,
        bytes=size,
        sha256=digest,
        first_key=keys[0] if keys else None,
        last_key=keys[-1] if keys else None,
        task_fingerprint=task.fingerprint,
        inputs_stamp=stamp,
        rejected=rejected,
        stats=stats,
        devices={stage: sorted(used) for stage, used in devices.items()},
        built_by=built_by(),
        inputs=len(task.refs),
    )
    out.write_json(record_name(tar_name), record.to_json())  # after its shard: a record means a finished shard
    return task.index, record, False


Note = tuple[int, str]
"""A warning for the client to log: (logging level, message)."""


def run_shard(task: ShardTask) -> tuple[int, ShardRecord, bool, list[Note]]:
    """The task the executor runs: ``build_shard`` plus the warnings it raised where nobody would show
    them once (see ``_collect_notes``). Returns (shard index, record, reused, notes).

    A task that fails takes its notes along on the exception (``notes_of``; also ``add_note``, so a
    traceback, ``--raise-errors``'s included, shows them under the error): a warning logged just before a
    failure is often the one that explains it.
    """
    notes: list[Note] = []
    try:
        with _collect_notes() as notes:
            index, record, reused = build_shard(task)
    except Exception as exc:
        if notes:
            exc.distillkit_notes = list(notes)  # type: ignore[attr-defined]
            for level, message in notes:
                exc.add_note(f"{logging.getLevelName(level)} (shard {task.index}): {message}")
        raise
    return index, record, reused, notes


def notes_of(exc: BaseException) -> list[Note]:
    """The notes a failed ``run_shard`` attached to its exception (empty when none).

    Args:
        exc: the exception a shard task raised, as the client received it.
    """
    notes = getattr(exc, "distillkit_notes", None)
    return [(int(level), str(message)) for level, message in notes] if isinstance(notes, list) else []


_notes_lock = threading.Lock()
_notes_users = 0
_notes_pending: list[Note] = []
_notes_saved: dict[str, Any] = {}


class _NoteHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not fail the shard
            message = str(record.msg)
        with _notes_lock:
            _notes_pending.append((record.levelno, message))


def _note_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    text = str(message)
    with _notes_lock:
        _notes_pending.append((logging.WARNING, text if category is UserWarning else f"{category.__name__}: {text}"))


@contextmanager
def _collect_notes() -> Iterator[list[Note]]:
    """Collect, for the client to log once, the Python warnings a shard task shows and (in a process
    without logging configured, i.e. a dask worker) ``distillkit`` log records of WARNING and above.

    Each worker process would otherwise print the same warning (a random-init teacher, say) on its
    own stderr, once per worker and through the client's progress bar. Python's warning filters
    still decide what is shown. Installed process-wide while any task of this process runs (tasks
    may share a process on threads; ``catch_warnings`` is not thread-safe); a note goes to whichever
    task ends first, which is enough, since the client logs each message once per build.
    """
    global _notes_users
    out: list[Note] = []
    with _notes_lock:
        if _notes_users == 0:
            _notes_saved["showwarning"] = warnings.showwarning
            warnings.showwarning = _note_warning
            # In the CLI or under pytest the root logger has handlers, which already show (and capture)
            # records in-process: collect records only where they would reach stderr through logging's
            # last resort.
            owner = logging.getLogger("distillkit")
            if not owner.hasHandlers():
                handler = _NoteHandler(logging.WARNING)
                owner.addHandler(handler)
                _notes_saved["handler"] = handler
        _notes_users += 1
    try:
        yield out
    finally:
        with _notes_lock:
            _notes_users -= 1
            out.extend(_notes_pending)
            _notes_pending.clear()
            if _notes_users == 0:
                warnings.showwarning = _notes_saved.pop("showwarning")
                handler = _notes_saved.pop("handler", None)
                if handler is not None:
                    logging.getLogger("distillkit").removeHandler(handler)


def built_by() -> str:
    """``version@commit`` (``-dirty`` when the checkout had changes) of this process's distillkit."""
    info = build_info()
    commit = (info["commit"] or "unknown")[:12]
    return f"{info['version']}@{commit}{'-dirty' if info['dirty'] else ''}"


def plan_tasks(m: Manifest, raise_errors: bool = False) -> tuple[list[ShardTask], list[dict[str, str]], int, str]:
    """Plan the build: (tasks, inputs rejected while planning, planned refs, fingerprint)."""
    pipeline = get_pipeline(m.pipeline)
    refs, plan_rejected = pipeline.plan(m)
    if not refs and not plan_rejected:
        source = m.data.get("source", {})
        where = next((f"source.{k} = {source[k]}" for k in ("root", "dataroot") if k in source), "the source")
        raise ManifestError(m.path, "source", f"no inputs found under {where}")
    first: dict[str, SampleRef] = {}
    for ref in refs:
        if ref.key in first:
            raise ManifestError(m.path, "source", f"two inputs give the sample key {ref.key!r}: "
                                                  f"{first[ref.key].source} and {ref.source}; rename one")
        first[ref.key] = ref
    per = pipeline.refs_per_shard(m)
    content = m.content_hash()
    tasks = []
    for i in range(0, len(refs), per):
        chunk = refs[i : i + per]
        tasks.append(ShardTask(i // per, chunk, m, refs_fingerprint(chunk, content), raise_errors))
    fingerprint = refs_fingerprint(refs, content)
    return tasks, plan_rejected, len(refs) + len(plan_rejected), fingerprint


def build(m: Manifest, scheduler: str | None = None, workers: int | None = None,
          progress: bool = True, raise_errors: bool = False) -> BuildResult:
    """Build every shard of manifest ``m`` and write ``index.json`` last, into ``output.dir``: a local folder or
    an object store's prefix (``pipelines.output``, ``pipelines.output_s3``).

    Args:
        m: a validated manifest.
        scheduler: ``"serial"``, ``""`` (embedded LocalCluster) or a dask address; default
            the manifest's ``cluster.scheduler``.
        workers: LocalCluster worker processes; default the manifest's ``cluster.workers``.
        progress: show a progress bar.
        raise_errors: stop at the first unexpected exception in a stage, with its traceback,
            instead of rejecting that input (``Rejected`` inputs are still recorded).
    """
    try:
        out = output_location(m.data["output"]["dir"])  # a local folder or an object store's prefix
    except RemoteError as exc:  # a protocol fsspec does not know, or whose package is not installed
        raise ManifestError(m.path, "output.dir", str(exc)) from None
    out.prepare(m)
    with out.lock(m):
        return _build_locked(m, out, scheduler, workers, progress, raise_errors)


def _build_locked(m: Manifest, out: OutputLocation, scheduler: str | None, workers: int | None, progress: bool,
                  raise_errors: bool) -> BuildResult:
    tasks, rejected, planned, fingerprint = plan_tasks(m, raise_errors)
    pipeline = get_pipeline(m.pipeline)
    cluster = m.data["cluster"]
    scheduler = cluster["scheduler"] if scheduler is None else scheduler
    workers = cluster["workers"] if workers is None else workers
    check_dataset(out, m)
    records: dict[int, ShardRecord] = {}
    reused = 0
    torch_stages = pipeline.torch_stages(m)
    if scheduler == "":  # (a scheduler given on the command line overrides the job queue)
        refuse_idle_gpu_jobs(m.path, m.pipeline, cluster, torch_stages)
    gpu_workers = cluster["gpu_workers"]
    if gpu_workers < 0:
        # a job queue's GPU workers are its GPU jobs' (cluster.gpu_jobs): the login node's GPUs are not counted
        local = scheduler == "" and not is_job_queue(cluster)
        gpu_workers = _visible_gpus() if local and any(d != "cpu" for d in torch_stages.values()) else 0
    with open_executor(scheduler, workers, cluster["threads_per_worker"], gpu_workers, cluster=cluster) as executor:
        log.debug("building %d shards on %s", len(tasks), executor.description)
        remote = _place_torch_stages(torch_stages, executor)
        # Only now, with the plan made, the cluster up and the torch stages placed, does the folder change:
        # a rerun that cannot start leaves a finished dataset as it was.
        out.unpublish()
        listing = out.scan()  # one listing of a remote prefix (None locally): stale shards, reusable ones
        out.remove_stale(m.name, len(tasks), listing)
        for task in tasks:
            task.gpu_remote = remote
            task.found = out.found(listing, shard_filename(m.name, task.index))
        # A token per build: the fingerprint leaves out output.dir, so two builds of one manifest into
        # two folders on one shared scheduler would otherwise share task keys and one would write nothing.
        run = uuid.uuid4().hex[:8]
        keys = [f"{m.name}-shard-{t.index:06d}-{t.fingerprint[:12]}-{run}" for t in tasks]
        bar = tqdm(total=sum(len(t.refs) for t in tasks), desc=f"build {m.name}", unit="input", disable=not progress)
        tracker = _BuildProgress(bar, tasks, len(rejected))
        said: set[Note] = set()

        def say(notes: list[Note]) -> None:
            for note in notes:  # each worker raises the same warning: say it once per build, at its level
                if note not in said:
                    said.add(note)
                    log.log(note[0], "%s", note[1])

        # Log records (ours, and the workers' warnings logged below) go above the bar, not through it.
        with logging_redirect_tqdm() if progress else nullcontext(), executor.progress(tracker.report) as reporter:
            for task in tasks:
                task.progress = reporter
            try:
                for index, record, was_reused, notes in executor.map(run_shard, tasks, keys,
                                                                      spare_gpu_workers=remote):
                    records[index] = record
                    reused += was_reused
                    tracker.finish(index, record)
                    say(notes)
            except Exception as exc:
                # --raise-errors shows them in the traceback (add_note); without it the CLI prints one line,
                # so they are logged here, above it.
                if not raise_errors:
                    say(notes_of(exc))
                raise
            finally:
                tracker.close()
    # Every task has finished and the executor is closed (a LocalCluster's workers with it): any temporary file
    # left now is a killed worker's partial shard or record, which nothing will finish or rename.
    left = out.remove_temp_files(m.name)
    if left:
        log.info("%s: removed %d temporary file(s) left by killed workers", out, left)
    shard_records = [records[i] for i in range(len(tasks))]
    # An input rejected while planning, or one whose rejection names the input itself (not one of its windows).
    sources = {ref.source for task in tasks for ref in task.refs}
    whole_inputs = len(rejected) + sum(r["source"] in sources for rec in shard_records for r in rec.rejected)
    for rec in shard_records:
        rejected.extend(rec.rejected)
    totals = sum_stats(rec.stats for rec in shard_records)  # verify recomputes them the same way
    written = sum(r.samples for r in shard_records)
    info = build_info()
    makers = sorted({r.built_by or "unrecorded" for r in shard_records})
    if len(makers) > 1:
        log.warning("%s: its shards were written by %d versions of distillkit (%s); remove the folder to "
                    "rebuild it with one", out, len(makers), ", ".join(makers))
    stats = pipeline.finalize_stats(totals)
    index = {
        "format_version": INDEX_FORMAT_VERSION,
        "pipeline": m.pipeline,
        "name": m.name,
        "manifest": m.data,
        "manifest_hash": m.content_hash(),
        "package_version": info["version"],
        "git": {"commit": info["commit"], "dirty": info["dirty"]},
        "built_by": makers,
        "input_fingerprint": fingerprint,
        "counts": {"planned": planned, "written": written, "rejected": len(rejected)},
        "shards": [
            {k: v for k, v in r.to_json().items()
             if k not in ("rejected", "stats", "task_fingerprint", "inputs_stamp", "devices", "built_by", "inputs")}
            for r in shard_records
        ],
        "rejected": rejected,
        "stats": stats,
        # what each statistic counts or measures (Pipeline.stat_units): `stats` reads it here, importing no pipeline
        "stat_units": {k: unit for k in stats if (unit := pipeline.unit_of_stat(k))},
    }
    if torch_stages:
        index["torch_stages"] = {
            stage: {"backend": "torch", "requested": requested, "gpu_workers": executor.gpu_workers,
                    "devices": sorted({d for r in shard_records for d in r.devices.get(stage, [])})}
            for stage, requested in torch_stages.items()
        }
    out.write_json("index.json", index)  # last: it marks the dataset finished
    return BuildResult(out.index_path, planned, written, rejected, reused, len(tasks) - reused,
                       units=pipeline.units, whole_inputs=whole_inputs)


DRAW_EVERY_S = 0.2
"""Least time between two draws of the build's bar: reports from many tasks at once would otherwise redraw
the terminal line for each."""


class _BuildProgress:
    """The build's bar: inputs passed (per-shard reports while tasks run, exact counts when they finish)
    with samples written and inputs rejected beside it. ``report`` may run on dask's event-loop thread,
    late or after a retry: counts only grow until the shard's result sets them exactly.

    Drawn at most every ``DRAW_EVERY_S``; a change that comes sooner is drawn by a timer at the end of that
    interval (tqdm's own ``mininterval`` would skip it, and the skipped one may be the last for minutes)."""

    def __init__(self, bar: tqdm, tasks: list[ShardTask], plan_rejected: int):
        self.bar, self.plan_rejected = bar, plan_rejected
        self._sizes = {t.index: len(t.refs) for t in tasks}
        self._counts = {t.index: (0, 0, 0) for t in tasks}
        self._finished: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._drawn = -math.inf
        self._timer: threading.Timer | None = None
        self.draws = 0
        """Times the bar was drawn (for tests)."""

    def report(self, index: int, counts: Sequence[int]) -> None:
        with self._lock:
            if self._closed or index in self._finished or index not in self._counts or len(counts) != 3:
                return
            old = self._counts[index]
            new = (min(max(old[0], counts[0]), self._sizes[index]), max(old[1], counts[1]), max(old[2], counts[2]))
            self._set(index, new)

    def finish(self, index: int, record: ShardRecord) -> None:
        with self._lock:
            self._finished.add(index)
            self._set(index, (self._sizes[index], record.samples, len(record.rejected)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.bar.close()  # draws the final counts

    def _set(self, index: int, new: tuple[int, int, int]) -> None:
        old, self._counts[index] = self._counts[index], new
        samples = sum(c[1] for c in self._counts.values())
        rejected = self.plan_rejected + sum(c[2] for c in self._counts.values())
        self.bar.set_postfix(samples=samples, rejected=rejected, refresh=False)
        # Count without letting tqdm draw (its mininterval would decide, and might skip the last change).
        self.bar.n += new[0] - old[0]
        wait = self._drawn + DRAW_EVERY_S - time.monotonic()
        if wait <= 0:
            self._draw()
        elif self._timer is None:
            self._timer = threading.Timer(wait, self._draw_later)
            self._timer.daemon = True
            self._timer.start()

    def _draw_later(self) -> None:
        with self._lock:
            self._timer = None
            if not self._closed:
                self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        self.draws += 1
        self.bar.refresh()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _place_torch_stages(torch_stages: dict[str, str], executor: Executor) -> bool:
    """Whether the torch stages go to GPU workers; says once where they run.

    Raises:
        ClusterError: a stage asks for ``"cuda"`` and neither a GPU worker nor (in-process) CUDA exists.
    """
    if not torch_stages:
        return False
    if executor.gpu_workers:
        log.info("torch stages %s on %d GPU worker(s)", ", ".join(torch_stages), executor.gpu_workers)
        return True
    if not executor.local:
        # A cluster of its own: its workers decide ("auto" = their CUDA if they have one).
        log.warning("torch stages %s: no worker advertises a GPU resource; each worker runs them on its own "
                    "CUDA device if it has one, else on the CPU torch path", ", ".join(torch_stages))
        return False
    import torch

    if torch.cuda.is_available():
        return False
    pinned = [stage for stage, device in torch_stages.items() if device == "cuda"]
    if pinned:
        raise ClusterError(f"{', '.join(pinned)}: device = \"cuda\" but there is no GPU here and no GPU worker; "
                           "set the stage's device to \"auto\" to run the CPU torch path")
    log.info("torch stages %s run on the CPU torch path: there is no GPU here", ", ".join(torch_stages))
    return False


def _build_lock(out_dir: Path, m: Manifest) -> Any:
    """The lock a build of ``m`` into the local folder ``out_dir`` holds (``LocalFolder.lock``).

    Raises:
        BuildError: another build holds the folder.
    """
    return LocalFolder(out_dir).lock(m)
