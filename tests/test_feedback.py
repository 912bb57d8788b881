"""Feedback on long work and the small things a user trips on (issue 19, items 6 and 9).

- the build's bar counts inputs and moves inside a shard (tasks report while they run, in-process and
  through dask events); workers' warnings reach the user once, above the bar; the embedded cluster
  shuts down without dask's own tracebacks;
- the evaluations' bars (``train.progress``) follow the terminal;
- ``synth --help`` lists the kinds, ``init --force``, ``manifests`` prints whole descriptions, ``stats``
  names units, and docs/reading.md's field table names every field of every pipeline's schema.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines import runner
from distillkit.pipelines.catalog import load_manifest, packaged_manifests
from distillkit.pipelines.cli import main
from distillkit.pipelines.registry import PIPELINES, SYNTH
from distillkit.train import progress as progress_mod
from tests.index_helpers import rewrite_shard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(six_images) -> Path:
    """Six synthetic images (with ground truth): the fastest real pipeline (UniSeg, weight-free backbone)."""
    return six_images


def _manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-uniseg", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         *extra])


# ---------------------------------------------------------------- the build's progress


def test_a_shard_task_reports_its_counts_while_it_runs(images, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "REPORT_EVERY_S", 0.0)  # every change, so the test sees each step
    monkeypatch.setattr(runner, "INPUT_REPORT_EVERY_S", 0.0)
    m = _manifest(images, tmp_path / "out", "output.samples_per_shard=6")
    (tmp_path / "out").mkdir()
    tasks, _, _, _ = runner.plan_tasks(m)
    assert len(tasks) == 1 and len(tasks[0].refs) == 6
    reports: list[tuple[int, list[int]]] = []
    tasks[0].progress = lambda index, counts: reports.append((index, list(counts)))
    index, record, reused = runner.build_shard(tasks[0])
    assert not reused and record.samples == 6
    assert {i for i, _ in reports} == {0}
    inputs = [c[0] for _, c in reports]
    samples = [c[1] for _, c in reports]
    # reported during the shard, growing: inputs passed 1..5 before the last one, samples 1..6
    assert inputs == sorted(inputs) and set(range(1, 6)) <= set(inputs) and max(inputs[:-1]) < 6
    assert samples == sorted(samples) and samples[-1] == 6 and 1 in samples
    assert reports[-1] == (0, [6, 6, 0])  # the final count is always sent
    # sample counts are throttled, and so is taking the next input (at most every INPUT_REPORT_EVERY_S);
    # a report held back goes with the next one, at the latest with the final count
    monkeypatch.setattr(runner, "REPORT_EVERY_S", 60.0)
    monkeypatch.setattr(runner, "INPUT_REPORT_EVERY_S", 60.0)
    reports.clear()
    for p in (tmp_path / "out").glob("*.tar"):
        p.unlink()  # force a rebuild
    runner.build_shard(tasks[0])
    assert len(reports) == 2 and reports[-1] == (0, [6, 6, 0]), reports


def test_input_reports_are_throttled_and_the_last_is_sent():
    """A shard of many quick inputs: a handful of messages, not one per input; the final count arrives."""
    sent: list[list[int]] = []
    task = runner.ShardTask(0, [None] * 2000, None, "")  # type: ignore[arg-type, list-item]
    task.progress = lambda index, counts: sent.append(list(counts))
    counts = runner._ShardProgress(task)
    t0 = time.process_time()
    for _ in runner._CountedRefs(task.refs, counts):
        pass
    counts.inputs = len(task.refs)
    counts.flush()
    took = time.process_time() - t0
    assert len(sent) <= 2 + took / runner.INPUT_REPORT_EVERY_S, (len(sent), took)  # was 1999 + 1
    assert sent[-1] == [2000, 0, 0]
    counts.flush()
    assert len(sent[-1]) == 3 and sent.count([2000, 0, 0]) == 1  # nothing new: nothing sent


def test_the_build_bar_counts_inputs_with_samples_and_rejections(images, tmp_path, capsys):
    runner.build(_manifest(images, tmp_path / "out", "output.samples_per_shard=4"), progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n")
    last = [line for line in bar.splitlines() if line.startswith("build demo-uniseg")][-1]
    assert "6/6" in last and "input" in last and "samples=6" in last and "rejected=0" in last, last


def test_the_tracker_keeps_counts_growing_and_exact_at_the_end():
    """Reports come late, twice (a retried task) or after the result: the bar never goes back nor past the
    shard, and a finished shard's counts are its record's."""
    from tqdm import tqdm

    tasks = [runner.ShardTask(i, [None] * 3, None, "") for i in range(2)]  # type: ignore[arg-type, list-item]
    bar = tqdm(total=6, file=io.StringIO())
    tracker = runner._BuildProgress(bar, tasks, plan_rejected=1)
    tracker.report(0, [2, 5, 0])
    tracker.report(0, [1, 1, 0])  # a retry starting again: ignored until it passes the mark
    tracker.report(1, [9, 1, 1])  # more inputs than the shard holds: capped
    assert bar.n == 5
    record = runner.ShardRecord(file="x", samples=4, bytes=0, sha256="", first_key=None, last_key=None,
                                task_fingerprint="", inputs_stamp="", rejected=[{"source": "s"}], stats={})
    tracker.finish(0, record)
    tracker.report(0, [3, 9, 9])  # late, after the result: ignored
    assert bar.n == 6 and bar.postfix == "rejected=3, samples=5"
    tracker.close()
    tracker.report(1, [3, 3, 3])  # after the build: ignored, no error


def test_the_bar_is_drawn_at_a_bounded_rate_and_shows_the_last_report():
    from tqdm import tqdm

    tasks = [runner.ShardTask(0, [None] * 1000, None, "")]  # type: ignore[arg-type, list-item]
    screen = io.StringIO()
    bar = tqdm(total=1000, file=screen, mininterval=0)
    tracker = runner._BuildProgress(bar, tasks, plan_rejected=0)
    start = time.monotonic()
    for i in range(1, 1001):
        tracker.report(0, [i, i, 0])
    elapsed = time.monotonic() - start
    assert tracker.draws <= 2 + elapsed / runner.DRAW_EVERY_S, (tracker.draws, elapsed)  # was one per report
    time.sleep(runner.DRAW_EVERY_S * 3)  # no more reports: the timer draws the last one
    assert "1000/1000" in screen.getvalue().replace("\r", "\n").splitlines()[-1]
    tracker.close()


def test_dask_tasks_report_through_events_and_workers_are_quieted_before_closing():
    from distillkit.pipelines.executor import DaskExecutor, _quiet_workers, dask_client

    got: list[tuple[int, list[int]]] = []
    with dask_client("", workers=1) as client:
        executor = DaskExecutor(client, "test", local=True)
        other: list[tuple[int, list[int]]] = []
        with executor.progress(lambda i, c: got.append((i, list(c)))) as reporter, \
                executor.progress(lambda i, c: other.append((i, list(c)))):
            client.submit(reporter, 7, [1, 2, 3], pure=False).result()
            deadline = time.monotonic() + 30
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
        assert got == [(7, [1, 2, 3])]
        assert other == []  # a second build on the same scheduler does not see this one's reports
        # one topic for every build: a long-lived scheduler keeps no growing set of topics
        with executor.progress(lambda i, c: None) as again:
            client.submit(again, 1, [1, 1, 1], pure=False).result()
        topics = [t for t in client.get_events() if t.startswith("distillkit")]
        assert topics == ["distillkit-progress"], topics
        assert set(client.run(logging.getLogger("distributed").getEffectiveLevel).values()) != {logging.CRITICAL}
        _quiet_workers(client)
        assert set(client.run(logging.getLogger("distributed").getEffectiveLevel).values()) == {logging.CRITICAL}


def test_quieting_the_workers_gives_up_on_a_worker_that_hangs():
    from distillkit.pipelines.executor import _quiet_workers

    release = threading.Event()

    class HangingClient:
        def run(self, fn, **kw):
            release.wait(60)  # a worker that never answers

    t0 = time.monotonic()
    assert _quiet_workers(HangingClient(), timeout=0.2) is False
    assert time.monotonic() - t0 < 5  # the build's end is not held up (was: forever)
    release.set()


# ---------------------------------------------------------------- warnings once, above the bar


def _warn_twice() -> None:
    warnings.warn("a teacher without weights", UserWarning, stacklevel=1)
    warnings.warn("an old format", DeprecationWarning, stacklevel=1)


def test_task_warnings_are_collected_and_the_hooks_restored():
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with runner._collect_notes() as notes:
            _warn_twice()
        assert warnings.showwarning is before
        assert notes == [(logging.WARNING, "a teacher without weights"),
                         (logging.WARNING, "DeprecationWarning: an old format")]

        # tasks on threads of one worker: every note reaches one of them, none is lost or repeated
        results: list[list[tuple[int, str]]] = []
        barrier = threading.Barrier(2)

        def task() -> None:
            with runner._collect_notes() as mine:
                barrier.wait()
                warnings.warn("from a thread", UserWarning, stacklevel=1)
                barrier.wait()
            results.append(mine)

        threads = [threading.Thread(target=task) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(n for r in results for _, n in r) == ["from a thread", "from a thread"]
        assert warnings.showwarning is before


def test_a_process_without_logging_hands_distillkit_warnings_to_the_client():
    """In a dask worker (no handler anywhere) ``distillkit`` warnings would go to stderr through logging's last
    resort, once per worker; they are collected instead. Run in a fresh interpreter: pytest configures logging."""
    code = ("import logging\n"
            "from distillkit.pipelines.runner import _collect_notes\n"
            "with _collect_notes() as notes:\n"
            "    logging.getLogger('distillkit.x').warning('shard %d: odd input', 3)\n"
            "    logging.getLogger('distillkit.x').info('not a warning')\n"
            "print(notes, logging.getLogger('distillkit').handlers)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(30, 'shard 3: odd input')] []" and out.stderr == "", (out.stdout, out.stderr)


def test_a_serial_build_says_a_warning_of_every_shard_once(images, tmp_path, monkeypatch, caplog):
    from distillkit.pipelines.registry import get_pipeline

    pipeline = type(get_pipeline("uniseg"))
    real = pipeline.build_refs

    def warning_build_refs(self, refs, m, raise_errors=False):
        warnings.warn("no weights for the backbone", UserWarning, stacklevel=1)
        yield from real(self, refs, m, raise_errors)

    monkeypatch.setattr(pipeline, "build_refs", warning_build_refs)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every shard raises it again
        with caplog.at_level(logging.WARNING, logger="distillkit"):
            runner.build(_manifest(images, tmp_path / "out", "output.samples_per_shard=2"), progress=False)
    said = [r for r in caplog.records if "no weights for the backbone" in r.getMessage()]
    assert len(said) == 1 and said[0].name == "distillkit.pipelines.runner", said


def test_a_failing_task_keeps_its_notes_with_their_levels(monkeypatch):
    """A warning logged or raised just before a task fails is often the explanation: it goes with the error,
    at its own level (an ERROR stays an ERROR)."""
    monkeypatch.setattr(logging.getLogger("distillkit"), "propagate", False)  # as in a dask worker: no handler

    def fails(task):
        warnings.warn("no weights for the backbone", UserWarning, stacklevel=1)
        logging.getLogger("distillkit.x").error("the input is corrupt")
        raise RuntimeError("decode failed")

    monkeypatch.setattr(runner, "build_shard", fails)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="decode failed") as info:
            runner.run_shard(runner.ShardTask(4, [], None, ""))  # type: ignore[arg-type]
    assert runner.notes_of(info.value) == [(logging.WARNING, "no weights for the backbone"),
                                           (logging.ERROR, "the input is corrupt")]
    assert info.value.__notes__ == ["WARNING (shard 4): no weights for the backbone",
                                    "ERROR (shard 4): the input is corrupt"]  # shown under any traceback


@pytest.mark.parametrize("raise_errors", [False, True])
def test_a_failed_build_still_says_the_task_warnings(images, tmp_path, monkeypatch, caplog, raise_errors):
    def fails(task):
        warnings.warn("no weights for the backbone", UserWarning, stacklevel=1)
        raise RuntimeError("decode failed")

    monkeypatch.setattr(runner, "build_shard", fails)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="distillkit"), pytest.raises(RuntimeError) as info:
            runner.build(_manifest(images, tmp_path / "out"), progress=False, raise_errors=raise_errors)
    said = [r for r in caplog.records if "no weights for the backbone" in r.getMessage()]
    if raise_errors:  # the traceback carries it (logging it too would say it twice)
        assert not said and "WARNING (shard 0): no weights for the backbone" in info.value.__notes__
    else:  # the CLI prints one line for the failure: the warning is logged above it
        assert len(said) == 1 and said[0].levelno == logging.WARNING


@pytest.mark.slow
def test_a_cluster_build_says_each_warning_once_and_ends_without_dask_tracebacks(tmp_path):
    """COMODO's random-init teacher warns in every worker that sets it up: the user reads it once, and the
    finished build prints no traceback of dask's own (two builds: the shutdown race is intermittent)."""
    from distillkit.sensors.synth.ego import make_ego

    data = make_ego(tmp_path / "ego", seed=0)
    for run in range(2):
        out = subprocess.run(
            [sys.executable, "-m", "distillkit", "build", "demo-comodo", "--set", f"source.root={data}",
             "--set", f"output.dir={tmp_path / f'shards{run}'}", "--set", "cluster.workers=2"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stderr.count("RANDOMLY INITIALISED") == 1, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and "heartbeat" not in out.stderr, out.stderr[-3000:]
        # the warning is a line of its own, not glued into a bar line
        said = [line for line in out.stderr.replace("\r", "\n").splitlines() if "RANDOMLY INITIALISED" in line]
        assert said[0].startswith("video teacher"), said


# ---------------------------------------------------------------- the evaluations' bars


def test_eval_bars_show_on_a_terminal_or_when_forced(monkeypatch, capsys):
    monkeypatch.delenv(progress_mod.ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress_mod.progress_enabled()
    assert list(progress_mod.progress(range(3), desc="quiet loop")) == [0, 1, 2]
    assert "quiet loop" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_mod.progress_enabled()
    monkeypatch.setenv(progress_mod.ENV, "0")
    assert not progress_mod.progress_enabled()
    monkeypatch.setenv(progress_mod.ENV, "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert list(progress_mod.progress(range(3), desc="forced loop", unit="epoch", mininterval=0)) == [0, 1, 2]
    captured = capsys.readouterr()
    assert "forced loop" in captured.err and "3/3" in captured.err and captured.out == ""


def test_a_shown_bar_sends_log_records_above_itself(monkeypatch):
    monkeypatch.setenv(progress_mod.ENV, "1")
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        loop = iter(progress_mod.progress(range(2), desc="loop with logs"))
        next(loop)
        assert console not in root.handlers  # replaced by tqdm's handler for the bar's lifetime
        list(loop)
        assert console in root.handlers  # and back when the loop ends
    finally:
        root.removeHandler(console)


def test_shard_sample_count_reads_the_index(tmp_path):
    for name, n in (("a", 4), ("b", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.json").write_text(json.dumps({
            "pipeline": "audio", "shards": [{"file": f"{name}.tar", "samples": n, "bytes": 0, "sha256": "0" * 64}],
            "counts": {"planned": n, "written": n, "rejected": 0}, "stats": {}}))
    assert progress_mod.shard_sample_count(tmp_path / "a") == 4
    assert progress_mod.shard_sample_count([tmp_path / "a", tmp_path / "b"]) == 9
    assert progress_mod.shard_sample_count([tmp_path / "a", tmp_path / "missing"]) is None


def test_the_slidr_eval_reading_bar_reaches_its_total_with_unlabelled_samples(slidr_shards, tmp_path, monkeypatch,
                                                                             caplog):
    import shutil

    from tqdm import tqdm

    from distillkit.pipelines.shards import iter_samples, load_index
    from distillkit.train import slidr_eval

    d = tmp_path / "some-unlabelled"
    shutil.copytree(slidr_shards, d)
    index = load_index(d)
    for entry in index["shards"]:  # every other sample loses its labels, the last one of each shard too
        samples = list(iter_samples(d / entry["file"]))
        for i, (_, fields) in enumerate(samples):
            if i % 2 or i == len(samples) - 1:
                fields.pop("lidarseg.npy", None)
        rewrite_shard(d, entry["file"], samples)
    bars: list[tqdm] = []

    def recorded(iterable=None, desc="", total=None, unit="it", **kw):
        bars.append(tqdm(iterable, desc=desc, total=total, unit=unit, file=io.StringIO()))
        return bars[-1]

    monkeypatch.setattr(slidr_eval, "progress", recorded)
    with caplog.at_level(logging.WARNING, logger="distillkit"):
        clouds = slidr_eval.load_labelled(d)
    written = index["counts"]["written"]
    assert 0 < len(clouds) < written
    assert len(bars) == 1 and bars[0].total == written and bars[0].n == written  # was: stopped at len(clouds)
    assert not [r for r in caplog.records if "bad sample" in r.getMessage()]  # unlabelled is not bad


def test_the_linear_head_shows_its_epochs(monkeypatch, capsys):
    import torch

    from distillkit.train.probe import train_linear_head

    monkeypatch.setenv(progress_mod.ENV, "1")
    train_linear_head([torch.randn(8, 4)], [torch.randint(1, 3, (8,))], 3, epochs=3, desc="probe of test")
    err = capsys.readouterr().err
    assert "probe of test" in err and "/3 " in err and "epoch" in err


# ---------------------------------------------------------------- small things a user trips on


def test_synth_help_lists_every_kind_with_its_sizes():
    out = CliRunner().invoke(main, ["synth", "--help"])
    assert out.exit_code == 0
    kinds = out.output.split("Kinds:", 1)[1]
    for name in SYNTH.names():
        assert re.search(rf"^\s+{name}\s", kinds, re.M), (name, kinds)
    from distillkit.sensors.synth.ego import SIZES

    assert " | ".join(SIZES) in " ".join(kinds.split())


def test_init_refuses_to_overwrite_unless_forced(tmp_path):
    target = tmp_path / "mine.toml"
    first = CliRunner().invoke(main, ["init", "demo-slidr", str(target)])
    assert first.exit_code == 0 and target.is_file()
    target.write_text("# my edits\n")
    again = CliRunner().invoke(main, ["init", "demo-slidr", str(target)])
    assert again.exit_code == 2 and "--force" in again.output and target.read_text() == "# my edits\n"
    forced = CliRunner().invoke(main, ["init", "demo-slidr", str(target), "--force"])
    assert forced.exit_code == 0, forced.output
    assert target.read_text() == (ROOT / "manifests" / "demo-slidr.toml").read_text()
    (tmp_path / "dir" / "demo-slidr.toml").mkdir(parents=True)
    folder = CliRunner().invoke(main, ["init", "demo-slidr", str(tmp_path / "dir"), "--force"])
    assert folder.exit_code == 2 and "is a folder" in folder.output


def test_manifests_prints_each_description_whole():
    out = CliRunner().invoke(main, ["manifests"])
    assert out.exit_code == 0
    text = out.output
    for name, path in packaged_manifests().items():
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            assert line.lstrip("# ").strip() in text, (name, line)


def test_stats_names_units(tmp_path):
    from distillkit.pipelines.inspect import stat_unit, stats_text

    index = {"name": "a", "pipeline": "audio", "counts": {"written": 2, "planned": 2, "rejected": 0},
             "shards": [{"file": "a-000000.tar", "samples": 2, "bytes": 10, "sha256": "0" * 64}], "rejected": [],
             "stats": {"seconds": 12.5, "made_up": 1.0}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    text = stats_text(tmp_path)
    assert "  seconds: 12.5 seconds of audio" in text.splitlines()
    assert "  made_up: 1" in text.splitlines()  # a statistic nobody described: the bare value

    class Ones(dict):
        def __missing__(self, key: str) -> float:
            return 1.0

    # every statistic a built-in pipeline writes has its unit
    totals = Ones({"samples": 2.0, "bins": 10.0, "imu_values": 10.0, "regions_level0": 2.0, "regions_level1": 2.0})
    for name in ("slidr", "comodo", "audio", "uniseg"):
        stats = PIPELINES.get(name).finalize_stats(totals)
        assert stats, name
        assert not [k for k in stats if not stat_unit(name, k)], name


def test_the_build_writes_the_units_and_stats_reads_them_from_the_index(images, tmp_path, monkeypatch):
    from distillkit.pipelines import inspect

    out = tmp_path / "out"
    runner.build(_manifest(images, out), progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["stat_units"]["tokens_per_image"] == "patch tokens per image"
    assert set(index["stat_units"]) == set(index["stats"])  # every statistic of uniseg is described
    index["stat_units"]["tokens_per_image"] = "as written at build time"
    (out / "index.json").write_text(json.dumps(index))

    def no_pipeline(name):
        raise AssertionError("stats must not load the pipeline when index.json has the units")

    monkeypatch.setattr(inspect, "get_pipeline", no_pipeline)
    line = [t for t in inspect.stats_text(out).splitlines() if t.startswith("  tokens_per_image: ")]
    assert len(line) == 1 and line[0].endswith(" as written at build time"), line


def test_the_reading_docs_name_every_field_of_every_pipeline():
    from distillkit.pipelines.codecs import SampleView
    from distillkit.pipelines.uniseg import IMAGE_FIELDS

    doc = (ROOT / "docs" / "reading.md").read_text()
    table = doc.split("## 5. Fields per pipeline", 1)[1]
    rows: dict[str, list[tuple[set[str], str]]] = {}
    current = ""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] == "pipeline" or set(cells[0]) <= {"-", " "} and cells[1].startswith("-"):
            continue
        current = cells[0].strip("`") or current
        rows.setdefault(current, []).append((set(re.findall(r"`([^`]+)`", cells[1])), cells[2]))
    for name in ("slidr", "comodo", "audio", "uniseg"):
        names = set(PIPELINES.get(name).fields(SampleView({}, "k")))
        if name == "uniseg":
            names |= set(IMAGE_FIELDS)
        # numbered fields are written once per camera / frame: the table names the pattern
        names = {re.sub(r"^cam\d+\.", "cam{i}.", re.sub(r"^frame\d+\.", "frame{j:02d}.", n)) for n in names}
        documented = {f: value for fields, value in rows.get(name, []) for f in fields}
        assert names <= set(documented), (name, names - set(documented))
        for field in names:  # the decoded type follows codecs.decode_field's rules
            value = documented[field]
            if field.endswith((".txt", ".flac")):
                assert value.startswith("bytes"), (field, value)
            elif field.endswith(".json"):
                assert value.startswith(("dict", "list")), (field, value)
            elif field.endswith((".npy", ".png", ".jpg")) or field.startswith("image."):
                assert re.match(r"numpy (u?int|float)\d+", value), (field, value)
