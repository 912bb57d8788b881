"""Builds on SLURM / PBS through dask-jobqueue (``pipelines/jobqueue.py``): the ``[cluster]`` keys and their errors,
the generated job scripts, a build through dask-jobqueue's own cluster machinery, and one against a real SLURM
(skipped where ``sbatch`` is absent or no controller answers; ``bench/slurm_single_node.sh`` stands one up)."""

from __future__ import annotations

import hashlib
import operator
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines import jobqueue
from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.cli import main
from distillkit.pipelines.executor import ClusterError, open_executor
from distillkit.pipelines.inspect import verify
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import build
from distillkit.sensors.synth.audio import make_audio
from tests.conftest import build_serial, keep_audio_files

dask_jobqueue = pytest.importorskip("dask_jobqueue")
dask_jobqueue_local = pytest.importorskip("dask_jobqueue.local")

SLURM = ["cluster.kind=slurm", "cluster.walltime=00:10:00"]


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    """Six small synthetic sound files (three shards of two)."""
    root = make_audio(tmp_path_factory.mktemp("audio") / "src", seed=3, size="small")
    keep_audio_files(root, 6)
    return root


def _sets(root: Path, out: Path | None, *extra: str) -> list[str]:
    where = [f"output.dir={out}"] if out else []
    return [f"source.root={root}", *where, "output.files_per_shard=2", "output.max_rejected=1.0", *extra]


@pytest.fixture(scope="module")
def serial_shards(audio, tmp_path_factory) -> Path:
    """The reference: the same manifest built in-process."""
    out = tmp_path_factory.mktemp("serial") / "shards"
    return build_serial("demo-audio", out, *_sets(audio, None))


def _tar_shas(shard_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shard_dir.glob("*.tar"))}


def _cluster(audio: Path, *extra: str) -> dict:
    return load_manifest("demo-audio", [f"source.root={audio}", *SLURM, *extra]).data["cluster"]


# --- the manifest ------------------------------------------------------------------------------------------------

def test_local_is_the_default_and_cluster_keys_leave_the_fingerprint(audio):
    local = load_manifest("demo-audio", [f"source.root={audio}"])
    assert local.data["cluster"]["kind"] == "local" and not jobqueue.is_job_queue(local.data["cluster"])
    slurm = load_manifest("demo-audio", [f"source.root={audio}", *SLURM, "cluster.jobs=8", "cluster.queue=gpu",
                                         "cluster.gpu_jobs=2", 'cluster.job_script_prologue=["module load x"]'])
    assert jobqueue.is_job_queue(slurm.data["cluster"])
    assert slurm.content_hash() == local.content_hash()


def test_a_toml_time_is_a_walltime(audio):
    # --set cluster.walltime=01:30:00 parses as a TOML local time: it means its text
    assert _cluster(audio, "cluster.walltime=01:30:00")["walltime"] == "01:30:00"
    assert _cluster(audio, "cluster.walltime=2-00:00:00")["walltime"] == "2-00:00:00"


@pytest.mark.parametrize("sets, key, says", [
    (["cluster.kind=sge"], "cluster.kind", "must be one of"),
    (["cluster.kind=slurm"], "cluster.walltime", "required with cluster.kind = 'slurm'"),
    ([*SLURM, "cluster.walltime=1h"], "cluster.walltime", "expected [D-]HH:MM:SS"),
    ([*SLURM, 'cluster.walltime="30"'], "cluster.walltime", "a bare number is minutes on SLURM, seconds on PBS"),
    ([*SLURM, "cluster.memory=lots"], "cluster.memory", "expected a size"),
    ([*SLURM, "cluster.jobs=0"], "cluster.jobs", "must be >= 1"),
    ([*SLURM, "cluster.processes=4", "cluster.cores=2"], "cluster.processes", "cores = 2"),
    ([*SLURM, "cluster.gpu_jobs=-1"], "cluster.gpu_jobs", "must be >= 0"),
    ([*SLURM, "cluster.scheduler=tcp://h:8786"], "cluster.scheduler", "starts its own scheduler"),
    ([*SLURM, "cluster.job_script_prologue=[1]"], "cluster.job_script_prologue", "list of strings"),
    (["cluster.kind=pbs", "cluster.walltime=00:10:00", "cluster.join_timeout=0"], "cluster.join_timeout", ">= 1"),
])
def test_bad_cluster_keys_are_one_line(audio, sets, key, says):
    with pytest.raises(ManifestError) as err:
        load_manifest("demo-audio", [f"source.root={audio}", *sets])
    assert err.value.key == key and says in err.value.reason and "\n" not in str(err.value)


def test_a_job_queue_without_dask_jobqueue_says_what_to_install(audio, monkeypatch):
    real = jobqueue.importlib.util.find_spec
    monkeypatch.setattr(jobqueue.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dask_jobqueue" else real(name, *a))
    with pytest.raises(ManifestError, match=r"cluster\.kind: 'slurm' needs dask-jobqueue.*pip install"):
        load_manifest("demo-audio", [f"source.root={audio}", *SLURM])
    load_manifest("demo-audio", [f"source.root={audio}"])  # a local build needs none


# --- the job scripts ---------------------------------------------------------------------------------------------

def test_slurm_job_scripts(audio):
    cluster = _cluster(audio, "cluster.queue=long", "cluster.account=proj7", "cluster.cores=4", "cluster.processes=2",
                       "cluster.memory=8GiB", "cluster.jobs=3", 'cluster.job_extra_directives=["--constraint=avx2"]',
                       'cluster.job_script_prologue=["module load python/3.11", "source ~/venv/bin/activate"]',
                       "cluster.local_directory=/scratch/dk", "cluster.gpu_jobs=2", "cluster.gpus_per_job=2",
                       "cluster.gpu_queue=gpu")
    (what, count, cpu), (gwhat, gcount, gpu) = jobqueue.job_scripts(cluster, address="tcp://10.0.0.1:8786")
    assert (what, count, gwhat, gcount) == ("job", 3, "GPU job", 2)
    lines = cpu.splitlines()
    assert lines[-1].startswith(f"{sys.executable} -m distributed.cli.dask_worker")  # cluster.python's default
    for directive in ("#SBATCH -p long", "#SBATCH -A proj7", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G",
                      "#SBATCH -t 00:10:00", "#SBATCH --constraint=avx2"):
        assert directive in lines, directive
    worker = lines[-1]
    # the prologue runs before the worker, which is the last line; one BLAS/OpenMP thread per worker thread first
    # (as the embedded cluster sets it), so the user's own lines can override it
    exports = [lines.index(f"export {v}=1") for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")]
    assert max(exports) < lines.index("module load python/3.11") < lines.index("source ~/venv/bin/activate") \
        < len(lines) - 1
    assert "distributed.cli.dask_worker tcp://10.0.0.1:8786" in worker
    assert "--nworkers 2" in worker and "--nthreads 2" in worker and "--local-directory /scratch/dk" in worker
    assert "--resources" not in worker and "gres" not in cpu
    glines = gpu.splitlines()
    assert "#SBATCH --gres=gpu:2" in glines and "#SBATCH --cpus-per-task=2" in glines and "#SBATCH -p gpu" in glines
    assert "--resources GPU=1" in glines[-1] and "--nworkers 2" in glines[-1] and "--nthreads 1" in glines[-1]
    assert f"--preload {jobqueue.__name__}" in glines[-1]  # each of the two workers pinned to its own GPU
    assert "export OMP_NUM_THREADS=1" in glines


def test_cluster_python_runs_the_workers(audio):
    cluster = _cluster(audio, "cluster.python=/opt/dk/bin/python", "cluster.gpu_jobs=1")
    for _, _, script in jobqueue.job_scripts(cluster):
        assert script.splitlines()[-1].startswith("/opt/dk/bin/python -m distributed.cli.dask_worker ")


@pytest.mark.parametrize("walltime, slurm, pbs", [
    ("1-00:00:00", "1-00:00:00", "24:00:00"),
    ("2-12", "2-12", "60:00:00"),
    ("1-02:30", "1-02:30", "26:30:00"),
    ("00:10:00", "00:10:00", "00:10:00"),
    ("45:00", "45:00", "45:00"),
])
def test_walltime_in_each_queues_form(audio, walltime, slurm, pbs):
    # PBS's walltime has no days (-l walltime=[[HH:]MM:]SS): a SLURM-style 1-00:00:00 would be refused by qsub
    (_, _, script), = jobqueue.job_scripts(_cluster(audio, f'cluster.walltime="{walltime}"'))
    assert f"#SBATCH -t {slurm}" in script.splitlines()
    (_, _, script), = jobqueue.job_scripts(_cluster(audio, "cluster.kind=pbs", f'cluster.walltime="{walltime}"'))
    assert f"#PBS -l walltime={pbs}" in script.splitlines()


def test_log_directory_with_a_tilde_is_expanded(audio, tmp_path, monkeypatch):
    # SLURM does not expand "~" in #SBATCH -o, and dask-jobqueue would make a literal ./~/... folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (_, _, script), = jobqueue.job_scripts(_cluster(audio, "cluster.log_directory=~/dk/logs"))
    assert f"#SBATCH -o {tmp_path}/home/dk/logs/distillkit-%J.out" in script.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither ./~ nor (printing only) ~/dk/logs


def test_uneven_cores_are_warned_about(audio, caplog):
    jobqueue.job_scripts(_cluster(audio, "cluster.cores=5", "cluster.processes=2"))
    assert "cluster.cores = 5 is not a multiple of cluster.processes = 2: each worker gets 2 thread(s), 1 core(s) " \
           "per job stay idle" in caplog.text


def test_pbs_job_scripts(audio):
    cluster = _cluster(audio, "cluster.kind=pbs", "cluster.queue=workq", "cluster.cores=8", "cluster.memory=16GiB",
                       "cluster.interface=ib0", "cluster.gpu_jobs=1")
    (_, _, cpu), (_, _, gpu) = jobqueue.job_scripts(cluster)
    assert "#PBS -q workq" in cpu and "#PBS -l select=1:ncpus=8:mem=16GB" in cpu
    assert "#PBS -l walltime=00:10:00" in cpu and "--interface ib0" in cpu and "#SBATCH" not in cpu
    assert "#PBS -l select=1:ncpus=1:ngpus=1:mem=16GB" in gpu and "--resources GPU=1" in gpu
    assert "--preload" not in gpu  # one GPU per job: nothing to pin


def test_cli_prints_the_job_script_and_submits_nothing(audio, tmp_path):
    sets = [f"source.root={audio}", f"output.dir={tmp_path / 'out'}", *SLURM, "cluster.queue=debug",
            f"cluster.log_directory={tmp_path / 'logs' / 'dask'}"]
    result = CliRunner().invoke(main, ["build", "demo-audio", *[a for s in sets for a in ("--set", s)],
                                       "--print-job-script"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/usr/bin/env bash") and "#SBATCH -p debug" in result.output
    assert f"#SBATCH -o {tmp_path / 'logs' / 'dask'}/distillkit-%J.out" in result.output
    # nothing is made: neither the output nor the log folder (dask-jobqueue makes it when a Job is constructed)
    assert jobqueue.SCHEDULER_PLACEHOLDER in result.output and sorted(tmp_path.iterdir()) == []
    local = CliRunner().invoke(main, ["build", "demo-audio", "--set", f"source.root={audio}", "--print-job-script"])
    assert local.exit_code == 2 and 'cluster.kind: "local" submits no job' in local.output


def test_ctrl_c_stays_a_keyboard_interrupt():
    import importlib
    import signal

    before = signal.getsignal(signal.SIGINT)
    try:
        # what importing dask_jobqueue does the first time: SIGINT calls sys.exit(), a Ctrl-C would exit 0
        importlib.reload(importlib.import_module("dask_jobqueue.runner"))
        assert getattr(signal.getsignal(signal.SIGINT), "__module__", "") == "dask_jobqueue.runner"
        jobqueue.cluster_class("slurm")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_gpu_preload_pins_each_worker_to_its_device(monkeypatch):
    class Worker:
        name = "SLURMCluster-gpu-0-1"  # the second process of a job (dask worker --nworkers names them -0, -1)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # what SLURM gives a job holding GPUs 4 and 5
    jobqueue.dask_setup(Worker())
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


# --- builds through dask-jobqueue --------------------------------------------------------------------------------

class _RecordingJob(dask_jobqueue_local.LocalJob):
    """dask-jobqueue's test job (its worker command runs as a local subprocess), recording submissions and
    cancellations."""

    submitted: list[str] = []
    cancelled: list[str] = []

    async def _submit_job(self, script_filename):
        job_id = await super()._submit_job(script_filename)
        _RecordingJob.submitted.append(job_id)
        return job_id

    @classmethod
    async def _close_job(cls, job_id, cancel_command):
        cls.cancelled.append(job_id)
        await super()._close_job(job_id, cancel_command)


class _Recording(dask_jobqueue_local.LocalCluster):
    job_cls = _RecordingJob


@pytest.fixture
def local_jobs(monkeypatch):
    """Job-queue clusters become dask-jobqueue's LocalCluster: the real Job / JobQueueCluster machinery, no queue.
    Yields the ids of the jobs submitted and of those cancelled."""
    _RecordingJob.submitted.clear()
    _RecordingJob.cancelled.clear()
    monkeypatch.setattr(jobqueue, "cluster_class", lambda kind: _Recording)
    return _RecordingJob.submitted, _RecordingJob.cancelled


def test_build_through_the_job_queue_gives_the_serial_bytes(audio, serial_shards, local_jobs, tmp_path):
    out = tmp_path / "jq"
    m = load_manifest("demo-audio", _sets(audio, out, *SLURM, "cluster.jobs=2", "cluster.join_timeout=60"))
    result = build(m, progress=False)
    submitted, cancelled = local_jobs
    assert len(submitted) == 2  # the runner went through the job queue
    assert sorted(cancelled) == sorted(submitted)  # and cancelled every job at the end
    assert result.built_shards == 3
    assert _tar_shas(out) == _tar_shas(serial_shards) and verify(out).ok


def test_gpu_jobs_advertise_the_gpu_resource(audio, local_jobs):
    cluster = _cluster(audio, "cluster.jobs=1", "cluster.gpu_jobs=1", "cluster.join_timeout=60")
    with open_executor("", cluster=cluster) as executor:
        assert executor.gpu_workers == 1 and not executor.local
        info = executor.client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(w["resources"].get("GPU", 0) for w in info) == [0, 1]
    assert len(local_jobs[0]) == 2 and sorted(local_jobs[1]) == sorted(local_jobs[0])


class _PendingJob(dask_jobqueue.slurm.SLURMJob):
    """A SLURM job that the queue accepts and never starts (a full partition): sbatch and scancel recorded."""

    submitted: list[str] = []
    cancelled: list[str] = []

    async def _submit_job(self, script_filename):
        _PendingJob.submitted.append(Path(script_filename).read_text())
        return f"Submitted batch job {4240 + len(_PendingJob.submitted)}"

    @classmethod
    async def _close_job(cls, job_id, cancel_command):
        if job_id:
            cls.cancelled.append(job_id)


class _PendingCluster(dask_jobqueue.SLURMCluster):
    job_cls = _PendingJob


def test_workers_that_never_join_time_out_in_one_line_and_are_cancelled(audio, monkeypatch):
    monkeypatch.setattr(jobqueue, "cluster_class", lambda kind: _PendingCluster)
    _PendingJob.submitted.clear()
    _PendingJob.cancelled.clear()
    cluster = _cluster(audio, "cluster.jobs=2", "cluster.join_timeout=2")
    with pytest.raises(ClusterError) as err:
        with open_executor("", cluster=cluster):
            pass
    assert str(err.value) == "no SLURM worker joined in 2 s: check `squeue` (cluster.join_timeout sets the wait)"
    assert len(_PendingJob.submitted) == 2 and "#SBATCH -t 00:10:00" in _PendingJob.submitted[0]
    assert sorted(_PendingJob.cancelled) == ["4241", "4242"]


def _fake_slurm(bin_dir: Path, sbatch: str) -> Path:
    """``sbatch`` (its body given) and a ``scancel`` that records the job ids it is given, in ``bin_dir``."""
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("sbatch", sbatch), ("scancel", f'echo "$@" >> {bin_dir}/scancelled\n')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    return bin_dir


_REFUSE = 'echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2\nexit 1\n'


@pytest.mark.parametrize("first_ok", [False, True])
def test_a_refused_submission_fails_at_once_with_sbatchs_reason(audio, tmp_path, monkeypatch, caplog, first_ok):
    # sbatch refusing every job, or accepting the first and refusing the next (mkdir is atomic: the two
    # submissions run concurrently)
    body = f'if mkdir {tmp_path}/first 2>/dev/null; then echo "Submitted batch job 4711"; exit 0; fi\n{_REFUSE}' \
        if first_ok else _REFUSE
    bin_dir = _fake_slurm(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    cluster = _cluster(audio, "cluster.jobs=2", "cluster.queue=nope", "cluster.join_timeout=10")
    made = []

    class Recorded(dask_jobqueue.SLURMCluster):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(jobqueue, "cluster_class", lambda kind: Recorded)
    started = time.monotonic()
    with pytest.raises(ClusterError) as err:
        with open_executor("", cluster=cluster):
            pass
    assert time.monotonic() - started < 8  # not after join_timeout
    also = " (1 job(s) submitted before it were cancelled)" if first_ok else ""
    assert str(err.value) == ("cannot start the SLURM cluster: sbatch: error: Batch job submission failed: "
                              f"Invalid partition name specified{also}")
    cancelled = (bin_dir / "scancelled").read_text().split() if first_ok else []
    assert cancelled == (["4711"] if first_ok else [])
    # SpecCluster's close went through (no AssertionError on the job that never started, no false warning): an
    # unclosed cluster would hold the end of the process 10 s (distributed's exit hook waits for it)
    assert "could not cancel" not in caplog.text and [c.status.name for c in made] == ["closed"]


def test_a_missing_sbatch_fails_at_once(audio, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    with pytest.raises(ClusterError, match=r"^cannot start the SLURM cluster: \[Errno 2\] No such file or directory: "
                                           r"'sbatch'$"):
        with open_executor("", cluster=_cluster(audio, "cluster.join_timeout=10")):
            pass


def test_gpu_jobs_without_a_torch_stage_are_refused(audio, tmp_path, local_jobs):
    sets = _sets(audio, tmp_path / "out", *SLURM, "cluster.gpu_jobs=1")
    result = CliRunner().invoke(main, ["build", "demo-audio", "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 2, result.output
    assert "cluster.gpu_jobs: 1 GPU job(s) asked for, but this 'audio' manifest has no torch stage" in result.output
    assert local_jobs[0] == []  # before anything was submitted
    # and --print-job-script says the same instead of printing scripts for idle GPU jobs
    shown = CliRunner().invoke(main, ["build", "demo-audio", "--print-job-script",
                                      *[a for s in sets for a in ("--set", s)]])
    assert shown.exit_code == 2 and "cluster.gpu_jobs: 1 GPU job(s) asked for" in shown.output, shown.output


def test_every_worker_gone_stops_the_build(audio, local_jobs, caplog):
    cluster = _cluster(audio, "cluster.jobs=1", "cluster.join_timeout=60")
    with open_executor("", workers=3, cluster=cluster) as executor:
        assert "size the embedded cluster only: ignored with cluster.kind = 'slurm'" in caplog.text  # workers=3
        executor.watch.grace_s = 1  # join_timeout's 60 s, shortened for the test
        # what a walltime or scancel does to every job: the workers close and the scheduler forgets them
        executor.client.retire_workers(close_workers=True)
        outcome: list[BaseException | list] = []

        def run() -> None:
            try:
                outcome.append(list(executor.map(operator.neg, [1, 2, 3], ["a", "b", "c"])))
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                outcome.append(exc)

        waiter = threading.Thread(target=run, daemon=True)
        waiter.start()
        waiter.join(20)  # before the watch, the build waited for workers that never come
        assert outcome and isinstance(outcome[0], ClusterError), outcome
        assert str(outcome[0]).startswith("every SLURM worker is gone (walltime, scancel or a lost node?) and none "
                                          "came back in 1 s")
    assert sorted(local_jobs[1]) == sorted(local_jobs[0])


def test_jobs_are_cancelled_even_when_closing_the_client_fails():
    class Client:
        def close(self):  # what distributed.utils.sync can raise after a Ctrl-C
            raise UnboundLocalError("cannot access local variable 'result'")

    class Cluster:
        closed = False

        def close(self):
            Cluster.closed = True

    jobqueue._close(Client(), Cluster(), "slurm")
    assert Cluster.closed


# --- a real SLURM ----------------------------------------------------------------------------------------------

def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _slurm_answers(), reason="needs sbatch and a SLURM controller (bench/slurm_single_node.sh)")
def test_build_on_a_real_slurm(audio, serial_shards, tmp_path):
    out = tmp_path / "slurm"
    result = CliRunner().invoke(main, ["build", "demo-audio", "--quiet", *[
        a for s in _sets(audio, out, *SLURM, "cluster.jobs=1", "cluster.memory=1GiB", "cluster.join_timeout=120",
                         f"cluster.log_directory={tmp_path / 'logs'}")
        for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert _tar_shas(out) == _tar_shas(serial_shards) and verify(out).ok
    assert any((tmp_path / "logs").iterdir())  # the worker ran as a SLURM job (its log is the job's output)
