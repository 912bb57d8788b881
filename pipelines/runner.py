"""Build shards: plan on the client, one task per shard on an executor, ``index.json`` last.

A shard task sets its pipeline up once per worker process, streams the shard's samples from
``Pipeline.build_refs`` through the schema check into the tar (one sample in memory at a time,
each field decoded at most once for checks and statistics), renames the tar into place and
writes a per-shard record ``{stem}.json``. On a rerun a task whose record, tar size and sha256
still match, whose plan and manifest fingerprint are unchanged and whose input files have the
same sizes and mtimes returns the record without rebuilding, so an interrupted build resumes
where it stopped and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from distillkit.build_info import build_info
from distillkit.pipelines.base import Rejection, SampleRef
from distillkit.pipelines.executor import ClusterError, Executor, open_executor
from distillkit.pipelines.manifest import Manifest, ManifestError
from distillkit.pipelines.placement import shard_context, worker_pipeline
from distillkit.pipelines.registry import get_pipeline
from distillkit.pipelines.schema import SchemaError, validate_sample
from distillkit.pipelines.shards import ShardRecord, sha256_file, shard_filename, write_json_atomic, write_shard

log = logging.getLogger(__name__)
INDEX_FORMAT_VERSION = 1
LOCK_FILE = ".distillkit.lock"


class BuildError(Exception):
    """The build cannot start or could not finish (the output folder is unusable or taken, a task
    failed); the message is one line."""


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


@dataclass
class BuildResult:
    index_path: Path
    planned: int
    written: int
    rejected: list[dict[str, str]]
    reused_shards: int
    built_shards: int

    @property
    def rejected_fraction(self) -> float:
        """Rejected over written + rejected: the units are samples (or windows) and inputs
        rejected whole, which is the planned inputs for one-sample-per-input pipelines."""
        total = self.written + len(self.rejected)
        return len(self.rejected) / total if total else 0.0


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
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


def _existing_record(out_dir: Path, task: ShardTask, stamp: str) -> ShardRecord | None:
    tar = out_dir / shard_filename(task.manifest.name, task.index)
    rec_path = tar.with_suffix(".json")
    if not (tar.is_file() and rec_path.is_file()):
        return None
    try:
        rec = ShardRecord(**json.loads(rec_path.read_text()))
    except (ValueError, TypeError):
        return None
    if rec.task_fingerprint != task.fingerprint or rec.inputs_stamp != stamp or rec.bytes != tar.stat().st_size:
        return None
    if sha256_file(tar) != rec.sha256:
        return None
    return rec


def build_shard(task: ShardTask) -> tuple[int, ShardRecord, bool]:
    """Run on a worker: build (or reuse) one shard. Returns (shard index, record, reused)."""
    m = task.manifest
    out_dir = m.output_dir
    pipeline = get_pipeline(m.pipeline)
    # stamped before building: inputs changed during the build make the next run rebuild
    stamp = inputs_stamp([p for ref in task.refs for p in pipeline.input_files(ref)])
    reused = _existing_record(out_dir, task, stamp)
    # --raise-errors rebuilds a shard that rejected inputs on unexpected errors, so they surface
    if reused is not None and not (task.raise_errors and any(r["stage"] == "build" for r in reused.rejected)):
        return task.index, reused, True
    pipeline = worker_pipeline(m)
    rejected: list[dict[str, str]] = []
    stats: dict[str, float] = {}
    keys: list[str] = []

    def checked() -> Iterator[tuple[str, dict[str, bytes]]]:
        seen: set[str] = set()
        for item in pipeline.build_refs(task.refs, m, raise_errors=task.raise_errors):
            if isinstance(item, Rejection):
                rejected.append(item.to_json())
                continue
            if item.key in seen:
                raise ValueError(f"{m.pipeline}: build yielded the key {item.key} twice in one shard")
            seen.add(item.key)
            try:
                view = validate_sample(pipeline, item.key, item.fields)
                sample_stats = pipeline.sample_stats(view)
            except SchemaError as exc:
                rejected.append({"source": item.source, "stage": "schema", "reason": str(exc)})
                continue
            for k, v in sample_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
            keys.append(item.key)
            yield item.key, item.fields

    path = out_dir / shard_filename(m.name, task.index)
    with shard_context(task.gpu_remote) as devices:
        size, digest, n = write_shard(path, checked())
    record = ShardRecord(
        file=path.name,
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
    )
    write_json_atomic(path.with_suffix(".json"), record.to_json())
    return task.index, record, False


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
    """Build every shard of manifest ``m`` and write ``index.json`` last.

    Args:
        m: a validated manifest.
        scheduler: ``"serial"``, ``""`` (embedded LocalCluster) or a dask address; default
            the manifest's ``cluster.scheduler``.
        workers: LocalCluster worker processes; default the manifest's ``cluster.workers``.
        progress: show a progress bar.
        raise_errors: stop at the first unexpected exception in a stage, with its traceback,
            instead of rejecting that input (``Rejected`` inputs are still recorded).
    """
    out_dir = m.output_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ManifestError(m.path, "output.dir", f"cannot create {out_dir}: {exc.strerror or exc}") from None
    with _build_lock(out_dir, m):
        return _build_locked(m, out_dir, scheduler, workers, progress, raise_errors)


def _build_locked(m: Manifest, out_dir: Path, scheduler: str | None, workers: int | None, progress: bool,
                  raise_errors: bool) -> BuildResult:
    tasks, rejected, planned, fingerprint = plan_tasks(m, raise_errors)
    pipeline = get_pipeline(m.pipeline)
    cluster = m.data["cluster"]
    scheduler = cluster["scheduler"] if scheduler is None else scheduler
    workers = cluster["workers"] if workers is None else workers
    _check_output(out_dir, m)
    records: dict[int, ShardRecord] = {}
    reused = 0
    torch_stages = pipeline.torch_stages(m)
    gpu_workers = cluster["gpu_workers"]
    if gpu_workers < 0:
        gpu_workers = _visible_gpus() if scheduler == "" and any(d != "cpu" for d in torch_stages.values()) else 0
    with open_executor(scheduler, workers, cluster["threads_per_worker"], gpu_workers) as executor:
        log.debug("building %d shards on %s", len(tasks), executor.description)
        remote = _place_torch_stages(torch_stages, executor)
        # Only now, with the plan made, the cluster up and the torch stages placed, does the folder change:
        # a rerun that cannot start leaves a finished dataset as it was.
        _unpublish(out_dir)
        _remove_stale(out_dir, m.name, len(tasks))
        for task in tasks:
            task.gpu_remote = remote
        # A token per build: the fingerprint leaves out output.dir, so two builds of one manifest into
        # two folders on one shared scheduler would otherwise share task keys and one would write nothing.
        run = uuid.uuid4().hex[:8]
        keys = [f"{m.name}-shard-{t.index:06d}-{t.fingerprint[:12]}-{run}" for t in tasks]
        bar = tqdm(total=len(tasks), desc=f"build {m.name}", unit="shard", disable=not progress)
        for index, record, was_reused in executor.map(build_shard, tasks, keys, spare_gpu_workers=remote):
            records[index] = record
            reused += was_reused
            bar.update(1)
            bar.set_postfix(rejected=len(rejected) + sum(len(r.rejected) for r in records.values()))
        bar.close()
    shard_records = [records[i] for i in range(len(tasks))]
    for rec in shard_records:
        rejected.extend(rec.rejected)
    totals: dict[str, float] = {}
    for rec in shard_records:
        for k, v in rec.stats.items():
            totals[k] = totals.get(k, 0.0) + v
    written = sum(r.samples for r in shard_records)
    info = build_info()
    makers = sorted({r.built_by or "unrecorded" for r in shard_records})
    if len(makers) > 1:
        log.warning("%s: its shards were written by %d versions of distillkit (%s); remove the folder to "
                    "rebuild it with one", out_dir, len(makers), ", ".join(makers))
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
             if k not in ("rejected", "stats", "task_fingerprint", "inputs_stamp", "devices", "built_by")}
            for r in shard_records
        ],
        "rejected": rejected,
        "stats": pipeline.finalize_stats(totals),
    }
    if torch_stages:
        index["torch_stages"] = {
            stage: {"backend": "torch", "requested": requested, "gpu_workers": executor.gpu_workers,
                    "devices": sorted({d for r in shard_records for d in r.devices.get(stage, [])})}
            for stage, requested in torch_stages.items()
        }
    index_path = out_dir / "index.json"
    write_json_atomic(index_path, index)
    return BuildResult(index_path, planned, written, rejected, reused, len(tasks) - reused)


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


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


@contextmanager
def _build_lock(out_dir: Path, m: Manifest) -> Iterator[None]:
    """An exclusive lock on the output folder for the whole build: a second build into it (which
    would delete the first's temporary files and mix two manifests' shards) stops at once.

    Raises:
        BuildError: another build holds the folder.
    """
    fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise BuildError(f"{out_dir}: another build is writing this folder (lock {LOCK_FILE}); wait for it "
                             "or set a different output.dir") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            # NFS without lockd, Lustre without -o flock: building is still right, only not guarded.
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second build into this "
                        "folder", out_dir, exc.strerror or exc)
        yield
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _check_output(out_dir: Path, m: Manifest) -> None:
    """Refuse a folder holding a dataset of another name, rather than mix with or delete it.

    Raises:
        BuildError: the folder holds another dataset.
    """
    index = out_dir / "index.json"
    if not index.is_file():
        return
    try:
        old = json.loads(index.read_text()).get("name")
    except (ValueError, OSError, AttributeError):
        old = None
    if old is not None and old != m.name:
        raise BuildError(f"{out_dir} holds the dataset {old!r}, not {m.name!r}: set a different output.dir "
                         "or remove that dataset first")


def _unpublish(out_dir: Path) -> None:
    """Remove ``index.json`` before any shard changes: it marks a finished dataset (readers trust it), so a
    rebuild killed midway leaves no index over a mix of old and new shards. Written again at the end."""
    (out_dir / "index.json").unlink(missing_ok=True)


def _remove_stale(out_dir: Path, name: str, n_tasks: int) -> None:
    """Shards numbered past the current plan (a smaller plan, bigger shards) would look like
    part of the dataset to a glob; remove them and leftover temporary files. Only this dataset's
    exact names match (``uni-000003.tar``, not ``uni-b-000003.tar``)."""
    shard = re.compile(rf"{re.escape(name)}-(\d{{6}})\.tar")
    for path in out_dir.glob(f"{name}-*.tar"):
        match = shard.fullmatch(path.name)
        if match and int(match.group(1)) >= n_tasks:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
    temp = re.compile(rf"\.({re.escape(name)}-\d{{6}}\.(tar|json)|index\.json)\.tmp-.*")
    for tmp in out_dir.glob(".*.tmp-*"):
        if temp.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
