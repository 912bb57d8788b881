"""The README's "Using it" block and docs/comodo.md's quick start run as written, on synthetic data.

The commands are parsed out of the Markdown each run, so the test follows the documents when they change.
Each runs in order as ``python -m distillkit ...`` in a fresh folder and must exit 0. What a CPU test machine
cannot run as written (real datasets under ``/data``, a cluster at ``tcp://host:8786``, a paper-sized run on
CUDA) is replaced through ``SUBSTITUTIONS`` below: one row per replacement, each with its reason.
"""

from __future__ import annotations

import json
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTILLKIT = [sys.executable, "-m", "distillkit"]

pytestmark = pytest.mark.slow


def bash_block(doc: Path, heading: str | None = None) -> list[str]:
    """The commands of the first ```bash block of ``doc`` (after the line ``heading`` when given): continuation
    lines joined, comments and blank lines dropped, ``a && b`` split into two commands.

    Args:
        doc: a Markdown file.
        heading: the exact heading line the block follows (``"## Using it"``); None = the file's first block.
    """
    lines = doc.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) if heading else 0
    opening = next(i for i in range(start, len(lines)) if lines[i].strip() == "```bash")
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].strip() == "```")
    text = "\n".join(lines[opening + 1 : closing]).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(shlex.join(words[:cut]))
            words = words[cut + 1 :]
    return commands


@dataclass(frozen=True)
class Sub:
    """Replace ``pattern`` (a regex over the command line) by ``replacement`` (``str.format``-ed with the
    run's values: ``synth_nuscenes``, ``synth_ego``, ``scheduler``); ``None`` skips the command."""

    pattern: str
    replacement: str | None
    why: str


SUBSTITUTIONS: tuple[Sub, ...] = (
    Sub(r"^pip install \.$", None,
        "the package is installed in this environment already (tests/test_packaging.py builds and installs the "
        "wheel)"),
    Sub(r"/data/nuscenes\b", "{synth_nuscenes}", "the README's own `synth nuscenes` output stands for nuScenes"),
    Sub(r"/data/ego4d/v2\b", "{synth_ego}", "the README's own `synth ego` output stands for Ego4D"),
    Sub(r"^(distillkit build my-slidr\.toml)", r"\1 --set source.dataroot={synth_nuscenes} "
                                                r"--set source.version=v1.0-mini",
        "the edits the README's `init` line leaves to the user: the copy points at data/nuscenes, v1.0-trainval"),
    Sub(r"tcp://host:8786", "{scheduler}", "a `dask scheduler` and one `dask worker` this test starts"),
    Sub(r"^(distillkit build comodo-ego4d (?!.*output\.max_rejected).*)$", r"\1 --set output.max_rejected=0.2",
        "the synthetic recordings' deliberate 400 ms stall rejects 1 of 6 windows, over the real-data 5% "
        "(docs/comodo.md); the build exits 1 without it"),
    Sub(r"--device cuda", "--device cpu", "CPU test machines (the GPU path has tests of its own)"),
    Sub(r"--size paper", "--size small", "the paper's networks take minutes per step on a CPU"),
    Sub(r" --teacher-checkpoint \S+", "", "MoCo v2's weights are not downloaded here; a small run accepts the "
                                          "seeded random teacher"),
    Sub(r"^(distillkit train comodo (?!.*--teacher-arch).*)$", r"\1 --teacher-arch conv3d",
        "without stored teacher embeddings the build's TimeSformer runs per batch: minutes per step on a CPU"),
    Sub(r"^(distillkit train comodo (?!.*--batch-size).*)$", r"\1 --batch-size 4",
        "the synthetic build holds 5 windows, fewer than the default batch of 32"),
    Sub(r"^(distillkit train (?!.*--max-steps)(?!.*--help).*)$", r"\1 --max-steps 2", "as the next row"),
    Sub(r"--max-steps \d+", "--max-steps 2", "a few steps show the command works; training is tested elsewhere"),
    Sub(r"^(distillkit eval slidr (?!.*--epochs).*)$", r"\1 --epochs 5",
        "the released probe's 100 epochs; a few show the command works (the probe is tested elsewhere)"),
    Sub(r"batch_size=\d+", "batch_size=2", "the synthetic build holds 6 pretrain keyframes"),
)
"""Applied in order to every command before it runs. Beyond these, when the last ``train`` of a method had no
``--out`` (its folder is a dated ``runs/METHOD/...`` the README cannot name), an ``eval`` of that method whose
``--checkpoint`` does not exist gets the ``latest.pt`` of the run folder that train printed (``run folder:
PATH``). After a ``train --out``, the ``--checkpoint`` runs as written, so a typo in it fails the test."""


def substitute(command: str, values: dict[str, str]) -> str | None:
    """``command`` after ``SUBSTITUTIONS``; None when a row skips it.

    Args:
        command: one command of a block (``distillkit ...``).
        values: the run's ``synth_nuscenes``, ``synth_ego`` and ``scheduler``.
    """
    for sub in SUBSTITUTIONS:
        if re.search(sub.pattern, command):
            if sub.replacement is None:
                return None
            command = re.sub(sub.pattern, sub.replacement.format(**values), command)
    return command


@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    """user + system time of the command's process tree."""


def run_block(commands: list[str], cwd: Path, values: Callable[[], dict[str, str]]) -> Iterator[Ran]:
    """Run ``commands`` in order in ``cwd`` (each substituted, ``distillkit`` as this interpreter's module),
    yielding each result; ``values`` is called before each command (the synth outputs appear as they run)."""
    # method -> the run folder its last train printed, for a train without --out only: its folder is a new
    # runs/METHOD/<date-time> that the README cannot name, so that method's eval --checkpoint is pointed there.
    # With --out the README names the folder, and an eval --checkpoint that does not exist must fail (a typo).
    runs: dict[str, Path] = {}
    for original in commands:
        command = substitute(original, values())
        if command is None:
            continue
        words = shlex.split(command)
        assert words[0] == "distillkit", f"not a distillkit command: {original}"
        args = words[1:]
        if args[:1] == ["eval"] and "--checkpoint" in args:
            at = args.index("--checkpoint") + 1
            if not (cwd / args[at]).exists() and args[1] in runs:
                args[at] = str(runs[args[1]] / "latest.pt")
        before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run([*DISTILLKIT, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        if args[:1] == ["train"]:
            runs.pop(args[1], None)
            if "--out" not in args and (m := re.search(r"^run folder: (.+)$", done.stdout, re.M)):
                runs[args[1]] = cwd / m[1]
        yield Ran(shlex.join(["distillkit", *args]), done.returncode, done.stdout, done.stderr,
                  time.perf_counter() - t0, cpu)


def _failed(r: Ran) -> str:
    return f"`{r.command}` exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A real ``dask scheduler`` and one ``dask worker`` on 127.0.0.1, the worker started in the folder the
    README's commands run in (their manifests hold relative paths): (address, that folder)."""
    work = tmp_path_factory.mktemp("readme")
    sched_file = work.parent / f"{work.name}-scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                               str(sched_file), "--no-dashboard", "--port", "0", "--host", "127.0.0.1"], **quiet)]
    try:
        deadline = time.time() + 60
        while not sched_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                       str(sched_file), "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                                       "--host", "127.0.0.1"], cwd=work, **quiet))
        yield json.loads(sched_file.read_text())["address"], work
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


def _synth_outputs(commands: list[str]) -> dict[str, str]:
    """``synth KIND OUT`` of a block -> {"synth_KIND": OUT}: where the block's own synthetic data goes."""
    out = {}
    for c in commands:
        words = shlex.split(c)
        if words[1:2] == ["synth"] and len(words) >= 4:
            out[f"synth_{words[2]}"] = words[3]
    return out


@pytest.fixture(scope="module")
def readme_run(dask_cluster) -> tuple[Path, list[Ran]]:
    address, work = dask_cluster
    commands = bash_block(ROOT / "README.md", "## Using it")
    values = {**_synth_outputs(commands), "scheduler": address}
    ran = []
    for r in run_block(commands, work, lambda: values):
        ran.append(r)
        if r.returncode != 0:
            break  # the rest depends on it
    return work, ran


def test_block_parsing_and_substitutions_cover_the_readme():
    commands = bash_block(ROOT / "README.md", "## Using it")
    assert len(commands) >= 10 and all(c.startswith(("distillkit ", "pip ")) for c in commands), commands
    values = {"synth_nuscenes": "data/synth", "synth_ego": "data/ego", "scheduler": "tcp://127.0.0.1:1"}
    for c in filter(None, (substitute(c, values) for c in commands)):
        assert "/data/" not in c and "host:8786" not in c and "--size paper" not in c, c


def test_an_eval_checkpoint_is_redirected_only_after_a_train_without_out(tmp_path, monkeypatch):
    """A mistyped ``eval --checkpoint`` in the README must fail the test, not be replaced by the last run."""
    argvs: list[list[str]] = []

    def fake_run(argv, **kw):
        argvs.append(argv)
        return subprocess.CompletedProcess(argv, 0, "run folder: runs/x/20261204-090000\n" if "train" in argv else "",
                                           "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    typo, meant = "runs/a/lates.pt", str(tmp_path / "runs/x/20261204-090000/latest.pt")
    list(run_block(["distillkit train x --out runs/a", f"distillkit eval x --checkpoint {typo}"], tmp_path, dict))
    assert argvs[-1][-1] == typo  # as written: the eval fails, and so does the README test
    list(run_block(["distillkit train x", f"distillkit eval x --checkpoint {typo}"], tmp_path, dict))
    assert argvs[-1][-1] == meant  # no --out: the folder the README cannot name


def test_readme_using_it_runs_as_written(readme_run):
    work, ran = readme_run
    for r in ran:
        print(f"{r.wall_s:6.1f} s wall {r.cpu_s:6.1f} s cpu  {r.command}")  # the cost of each line (-s shows it)
    for r in ran:
        assert r.returncode == 0, _failed(r)
    commands = [r.command for r in ran]
    assert any(" --scheduler tcp://127.0.0.1:" in c for c in commands), commands
    # the SLidR flow to its end: the default build keeps every scene, so the probe has train and val scenes
    probe = next(r for r in ran if r.command.startswith("distillkit eval slidr"))
    assert "official nuScenes train / val scenes" in probe.stdout, probe.stdout


def test_eval_on_a_build_without_val_scenes_is_one_line(readme_run):
    """The old default (SLidR's pretrain scenes only) cannot be evaluated: one line saying what to rebuild,
    before any sample is read."""
    work, ran = readme_run
    train = next(r for r in ran if r.command.startswith("distillkit train slidr --shards"))
    checkpoint = work / re.search(r"^run folder: (.+)$", train.stdout, re.M)[1] / "latest.pt"
    synth = _synth_outputs([r.command for r in ran])["synth_nuscenes"]
    build = subprocess.run([*DISTILLKIT, "build", "slidr-nuscenes", "--quiet", "--scheduler", "serial",
                            "--set", f"source.dataroot={synth}", "--set", "source.version=v1.0-mini",
                            "--set", "source.split=pretrain", "--set", "output.dir=shards/pretrain"],
                           cwd=work, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    r = subprocess.run([*DISTILLKIT, "eval", "slidr", "--checkpoint", str(checkpoint), "--shards",
                        "shards/pretrain"], cwd=work, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shards/pretrain: source.split: built with split "
                                                   "'pretrain', which has no official val scene"), r.stderr
    assert "--set source.split=all" in lines[0]


def test_comodo_quick_start_runs_as_written(tmp_path):
    """docs/comodo.md's block, on its own synthetic data; and without its synthetic-only max_rejected the
    build exits 1 with the count in windows and the value that would pass."""
    commands = bash_block(ROOT / "docs" / "comodo.md")
    assert any(c.startswith("distillkit build comodo-ego4d") for c in commands), commands
    values = {"synth_nuscenes": "", "scheduler": "", **_synth_outputs(commands)}
    ran = []
    for r in run_block(commands, tmp_path, lambda: values):
        ran.append(r)
        assert r.returncode == 0, _failed(r)
        if r.command.startswith("distillkit synth ego"):
            # the same build without its max_rejected override: the packaged 5% fails it, in one line
            strict = shlex.split(next(c for c in commands if c.startswith("distillkit build comodo-ego4d")))
            at = strict.index("output.max_rejected=0.2")
            del strict[at - 1 : at + 1]
            s = subprocess.run([*DISTILLKIT, *strict[1:], "--quiet"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=600)
            assert s.returncode == 1, s.stderr
            said = [line for line in s.stderr.splitlines() if line.startswith("error:")]
            m = re.match(r"error: (\d+) of (\d+) windows rejected \(([\d.]+)%\) > output\.max_rejected 5\.0% of "
                         r"windows; .* --set output\.max_rejected=([\d.]+)$", said[0] if len(said) == 1 else "")
            assert m, s.stderr
            out = next(w.split("=", 1)[1] for w in strict if w.startswith("output.dir="))
            counts = json.loads((tmp_path / out / "index.json").read_text())["counts"]
            # windows on both sides of the ratio: written + rejected windows, as index.json counts them
            assert (int(m[1]), int(m[2])) == (counts["rejected"], counts["written"] + counts["rejected"]), counts
            assert f"{int(m[1]) / int(m[2]):.1%}" == f"{m[3]}%" and int(m[1]) / int(m[2]) <= float(m[4]) <= 0.2
    assert [r.command.split()[1] for r in ran][-1] == "eval"
