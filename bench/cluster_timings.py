"""Start-up and shut-down figures of docs/cluster.md (issue 24), reproducible with one command:

    OMP_NUM_THREADS=1 .venv/bin/python bench/cluster_timings.py [--repeats 3]

1. ``open_executor`` of the embedded cluster (2 worker processes, the default): seconds from the call until the
   executor is usable, and from leaving the block (after 8 trivial tasks) until the cluster is closed.
2. ``kill -9`` of a process holding a job-queue cluster (dask-jobqueue's own local job class: the job script's
   worker runs as a local process, no queue needed): seconds until every worker process of its jobs has exited,
   which for a real job ends the job (the worker is the job script's last command).

Prints one line per measurement and per repeat; figures on a shared machine move with its load.
"""

from __future__ import annotations

import argparse
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the process killed in 2: a job-queue client with one job of one worker, its worker pids printed once joined
_HOLDER = """
import os, sys, time
import dask_jobqueue.local
from distillkit.pipelines import jobqueue
cluster = {"kind": "slurm", "jobs": 1, "processes": 1, "cores": 1, "memory": "1GiB", "walltime": "00:10:00",
           "gpu_jobs": 0, "gpus_per_job": 1, "gpu_queue": "", "job_extra_directives": [], "job_script_prologue": [],
           "queue": "", "account": "", "interface": "", "local_directory": "", "log_directory": "", "python": "",
           "scheduler": "", "join_timeout": 120}
with jobqueue.job_queue_client(cluster, dask_jobqueue.local.LocalCluster) as (client, _):
    # each worker process and its nanny (its parent, the job script's command)
    print("pids", *client.run(os.getpid).values(), *client.run(os.getppid).values(), flush=True)
    time.sleep(600)
"""


def embedded(repeats: int) -> None:
    """Figure 1: the embedded cluster's start and stop."""
    from distillkit.pipelines.executor import open_executor

    for i in range(repeats):
        t0 = time.monotonic()
        with open_executor("", workers=2) as executor:
            t1 = time.monotonic()
            # a few tasks first, so the workers have run something before they are stopped, as after a build
            list(executor.map(operator.neg, range(8), [f"neg-{i}-{k}" for k in range(8)]))
            t2 = time.monotonic()
        t3 = time.monotonic()
        print(f"embedded LocalCluster (2 workers), repeat {i + 1}: start {t1 - t0:.2f} s, stop {t3 - t2:.2f} s",
              flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent, which was killed) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def kill9(repeats: int) -> None:
    """Figure 2: workers of a killed job-queue build."""
    for i in range(repeats):
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        if not line or line[0] != "pids":
            holder.kill()
            raise SystemExit(f"the job-queue client did not start: {line}")
        pids = [int(p) for p in line[1:]]
        t0 = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        while any(_alive(p) for p in pids) and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        left = [p for p in pids if _alive(p)]
        print(f"kill -9 of a job-queue build, repeat {i + 1}: its worker and nanny processes exited "
              f"{time.monotonic() - t0:.2f} s later" + (f" (still running: {left})" if left else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    embedded(args.repeats)
    kill9(args.repeats)


if __name__ == "__main__":
    main()
