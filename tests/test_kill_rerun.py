"""Kill and rerun, per pipeline: SIGKILL a real ``distillkit build`` (a subprocess on a dask LocalCluster) at
seeded moments, rerun it to completion and require exactly the files of an uninterrupted build.

What a kill may leave: complete shards under their final names (written to a temporary name and renamed), the
temporary files of shards in flight, and no ``index.json`` unless the build had finished. What the rerun must
give: byte-identical shards, records and ``index.json``, no temporary file, every shard left whole by the kill
reused, and ``verify`` clean. Every build here runs in a folder of its own with the same relative ``output.dir``,
because ``index.json`` records the output folder as given.

Moments: the build holds its folder and has finished N shards (N drawn from the seed's share of the build, 0
included), plus a drawn delay of up to 0.3 s, so kills land while workers write shards, between shards and
before ``index.json``. ``DISTILLKIT_KILL_SEEDS=N`` (default 2) runs N seeds per pipeline; the seed also picks one
or two workers; each test prints its moment. Then a single worker is killed mid-shard, once under a nanny
(LocalCluster) and once without one (``dask worker --no-nanny``): the build must finish by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.runner import LOCK_FILE, build

from .conftest import keep_audio_files, scheduler_address

KILL_SEEDS = int(os.environ.get("DISTILLKIT_KILL_SEEDS", "2"))
OUT = "out"  # every build's output.dir, relative to the build's own folder (see the module docstring)


@dataclass(frozen=True)
class KillCase:
    """One pipeline's small build: the packaged demo manifest, the key naming its source, extra settings."""

    manifest: str
    source_key: str
    sets: tuple[str, ...]


CASES = {
    # samples or files per shard small enough for 3-6 shards, so the kills fall between and inside shards
    "slidr": KillCase("demo-slidr", "source.dataroot", ('source.scenes=["scene-0061", "scene-1094"]',  # 6 keyframes
                                                        "output.samples_per_shard=1")),
    "audio": KillCase("demo-audio", "source.root", ("output.files_per_shard=2", "stages.audio.store_waveform=false",
                                                    "output.max_rejected=1.0")),
    "comodo": KillCase("demo-comodo", "source.root", ("stages.frames.size=64", "output.recordings_per_shard=1",
                                                      "output.max_rejected=1.0")),
    "uniseg": KillCase("demo-uniseg", "source.root", ("output.samples_per_shard=1",)),
}


def _source(name: str, request: pytest.FixtureRequest, tmp: Path) -> Path:
    """The pipeline's small synthetic input, from the suite's own fixtures and makers."""
    if name == "slidr":
        return request.getfixturevalue("synth_nuscenes")
    if name == "uniseg":
        return request.getfixturevalue("six_images")
    if name == "audio":
        from distillkit.sensors.synth.audio import make_audio

        root = make_audio(tmp / "audio", seed=0, size="small")
        keep_audio_files(root, 8)  # 4 shards of 2 files: enough moments, a quarter of the decoding
        return root
    from distillkit.sensors.synth.ego import make_ego

    return make_ego(tmp / "ego", seed=1, size="small")


def _settings(case: KillCase, source: Path) -> list[str]:
    return [f"{case.source_key}={source}", f"output.dir={OUT}", *case.sets]


@pytest.fixture(scope="module", autouse=True)
def _provenance_without_git() -> Iterator[None]:
    """Records and ``index.json`` name the git commit of the checkout and whether it had local edits; that can
    change between two builds while the checkout is edited, and the test process caches it. Without git (as a
    wheel without its commit file) every build here, in this process and in its subprocesses, records the same
    provenance, so the records and ``index.json`` are compared byte for byte."""
    from distillkit.build_info import build_info

    patch = pytest.MonkeyPatch()
    patch.setenv("GIT_DIR", os.devnull)  # inherited by the builds, their dask workers and the external ones
    build_info.cache_clear()
    yield
    patch.undo()
    build_info.cache_clear()  # later tests read this checkout's own git state again
    build_info.cache_clear()


def _files(out_dir: Path) -> dict[str, str]:
    """Every file of a build folder by name, with its sha256; the build lock (an empty file kept on purpose) aside.
    Hidden temporary files are included, so a leftover one shows up as a difference."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != LOCK_FILE}


@dataclass
class Reference:
    """A pipeline's uninterrupted build: what every killed build of it must end as."""

    case: KillCase
    source: Path
    files: dict[str, str]
    shards: int


@pytest.fixture(scope="module", params=sorted(CASES))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The pipeline's uninterrupted build (in-process, serial: the suite checks elsewhere that every executor
    writes the same bytes), built once per pipeline for all its seeds."""
    name = request.param
    case = CASES[name]
    source = _source(name, request, tmp_path_factory.mktemp(f"kill-{name}-data"))
    folder = tmp_path_factory.mktemp(f"kill-{name}-reference")
    with contextlib.chdir(folder):
        build(load_manifest(case.manifest, _settings(case, source)), scheduler="serial", progress=False)
    files = _files(folder / OUT)
    shards = sum(n.endswith(".tar") for n in files)
    assert "index.json" in files and shards >= 3, files  # a kill needs shards to land between
    return Reference(case, source, files, shards)


def kill_build_at(args: list[str], cwd: Path, ready: Callable[[], bool], delay_s: float,
                  timeout_s: float = 180.0) -> int | None:
    """Run a ``distillkit`` command in its own process group and SIGKILL the whole group (client, scheduler,
    nannies, workers) ``delay_s`` after ``ready()`` first holds.

    Args:
        args: the command line after ``python -m distillkit``.
        cwd: the folder to run it in.
        ready: polled every 10 ms; the moment it returns True starts the delay.
        delay_s: seconds from then to the kill.
        timeout_s: give up waiting for ``ready`` (a failure) after this long.

    Returns:
        ``None`` if the kill ended the command, else its exit status (0: it finished before the kill).
    """
    proc = subprocess.Popen([sys.executable, "-m", "distillkit", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_until(ready, proc, timeout_s)
        time.sleep(delay_s)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the command already finished
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode == -signal.SIGKILL:
        return None
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return proc.returncode


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll ``ready`` every 10 ms until it holds or ``proc`` has exited; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ready() and proc.poll() is None:
        assert time.monotonic() < deadline, f"{proc.args}: not ready after {timeout_s} s"
        time.sleep(0.01)


@pytest.mark.parametrize("seed", range(KILL_SEEDS))
def test_killed_build_reruns_to_identical_bytes(reference: Reference, seed: int, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the whole build (client, scheduler, workers) at the seed's moment, then rerun it in-process."""
    case = reference.case
    rng = random.Random(f"{case.manifest}-{seed}")
    # stratified: seed s of N waits for a shard count drawn from the s-th N-th of the build, so even the
    # default two seeds kill once early and once late
    after = int((seed + rng.random()) * reference.shards / KILL_SEEDS)
    delay_s, workers = rng.uniform(0.0, 0.3), 1 + seed % 2
    out = tmp_path / OUT
    sets = [a for s in _settings(case, reference.source) for a in ("--set", s)]

    def ready() -> bool:
        # the build holds the folder (its lock file exists) and has finished ``after`` shards
        return (out / LOCK_FILE).exists() and len(list(out.glob(f"{case.manifest}-*.json"))) >= after

    status = kill_build_at(["build", case.manifest, "--quiet", "--workers", str(workers), *sets], tmp_path, ready,
                           delay_s)
    moment = (f"seed {seed}, {workers} worker(s): killed {delay_s:.2f} s after "
              + (f"shard record {after}" if after else "the build took its folder"))

    left = _files(out) if out.exists() else {}
    print(moment, "| exit", status, "| left:", sorted(left))  # shown when the test fails (and with -s)
    finished = {n for n in left if not n.startswith(".")}
    # whatever sits under a final name is complete and final: a shard, its record, and index.json only if whole
    assert {n: left[n] for n in finished} == {n: reference.files.get(n) for n in finished}, moment
    assert status is None or "index.json" in left, moment  # a build that exited 0 published its index
    records = sum(n.endswith(".json") and n != "index.json" for n in finished)

    monkeypatch.chdir(tmp_path)
    result = build(load_manifest(case.manifest, _settings(case, reference.source)), scheduler="serial",
                   progress=False)
    # every shard the kill left whole is reused, not rebuilt
    assert (result.reused_shards, result.built_shards) == (records, reference.shards - records), moment
    assert _files(out) == reference.files, moment  # same bytes, no temporary file left
    report = verify(out)
    assert not report.problems and report.shards == reference.shards, (moment, report.problems)


# --------------------------------------------------------------------------- a worker killed, the build goes on


def _writing(out: Path) -> bool:
    """A shard is finished and another is being written (its temporary file exists): a worker is mid-shard."""
    names = [p.name for p in out.glob("*")] if out.exists() else []
    return any(n.endswith(".json") for n in names) and any(".tmp-" in n for n in names)


def _finish(proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Wait for a build that must succeed; on a timeout, kill its process group first."""
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]


@pytest.mark.parametrize("reference", ["uniseg"], indirect=True)
def test_a_worker_killed_mid_shard_is_restarted_by_its_nanny(reference: Reference, tmp_path: Path) -> None:
    """The embedded LocalCluster's only worker is SIGKILLed while it writes a shard: its nanny starts a new one,
    the scheduler hands it the lost task, and the build exits 0 with the reference's files and no temporary file
    (the killed writer's is removed at the end of the build)."""
    import psutil

    case, out = reference.case, tmp_path / OUT
    sets = [a for s in _settings(case, reference.source) for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "distillkit", "build", case.manifest, "--quiet", "--workers", "1",
                             *sets], cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_until(lambda: _writing(out), proc, 180.0)
        assert proc.poll() is None, "the build finished before a worker was seen writing a shard"
        # the nanny's worker: a multiprocessing child of the build process (the resource tracker is not one)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 1, workers
        workers[0].send_signal(signal.SIGKILL)
        print("left by the kill:", sorted(p.name for p in out.glob(".*.tmp-*")))  # -s shows what was removed
    finally:
        _finish(proc)
    assert _files(out) == reference.files
    assert verify(out).ok


@pytest.mark.parametrize("reference", ["uniseg"], indirect=True)
def test_a_worker_without_nanny_killed_mid_shard_leaves_the_build_to_the_other(reference: Reference,
                                                                               tmp_path: Path) -> None:
    """A real ``dask scheduler`` and two ``dask worker --no-nanny``; one worker is SIGKILLed while a shard is
    being written and nothing restarts it: the other worker takes its task and the build exits 0 with the
    reference's files and no temporary file."""
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker"]
    sched_file = tmp_path / "scheduler.json"
    # the workers run in the build's folder: output.dir is relative (see the module docstring)
    procs = [subprocess.Popen([*dask, "--scheduler-file", str(sched_file), "--no-dashboard", "--port", "0",
                               "--host", "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        workers = [subprocess.Popen([*worker, "--scheduler-file", str(sched_file), "--no-nanny", "--nthreads", "1",
                                     "--no-dashboard", "--host", "127.0.0.1"], cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        procs += workers
        _wait_until(lambda: scheduler_address(sched_file) is not None, procs[0], 60.0)
        address = scheduler_address(sched_file)
        case, out = reference.case, tmp_path / OUT
        sets = [a for s in _settings(case, reference.source) for a in ("--set", s)]
        proc = subprocess.Popen([sys.executable, "-m", "distillkit", "build", case.manifest, "--quiet", "--scheduler",
                                 address, *sets], cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_until(lambda: _writing(out), proc, 180.0)
            assert proc.poll() is None, "the build finished before a worker was seen writing a shard"
            workers[0].send_signal(signal.SIGKILL)
            print("left by the kill:", sorted(p.name for p in out.glob(".*.tmp-*")))
        finally:
            _finish(proc)
        assert workers[0].wait(timeout=30) == -signal.SIGKILL  # it was running until the kill
        assert _files(out) == reference.files
        assert verify(out).ok
    finally:
        for p in reversed(procs):
            p.kill()
            p.wait(timeout=30)
