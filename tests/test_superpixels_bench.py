"""bench/run.py's plumbing (registry, figure ratios, rendering into the marked section of a doc); the
benchmarks themselves are run by hand (docs/benchmarks.md), never timed in tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import END, START, render, write_doc  # noqa: E402
from bench.suite import ENTRIES, Figure, Result, entry  # noqa: E402


def test_every_registered_entry_has_a_title_and_run():
    for name in ENTRIES:
        mod = entry(name)
        assert isinstance(mod.TITLE, str) and callable(mod.run)
    with pytest.raises(KeyError, match="unknown benchmark"):
        entry("nope")


def test_ratio_is_how_many_times_better_ours_is():
    assert Figure("t", 2.0, "s", "ref", 6.0).ratio == 3.0  # a time: reference / ours
    assert Figure("r", 30.0, "images/s", "ref", 10.0, higher_is_better=True).ratio == 3.0  # a rate: ours / ref


def test_render_replaces_only_the_marked_section(tmp_path):
    res = Result("Thing", [Figure("fast path", 2.0, "ms", "slow path", 8.0)], notes=["a note"])
    results = {"device": "cpu", "date": "today", "machine": {"cpus": 2, "load_avg_1m": 1.5},
               "entries": {"thing": {**res.to_json(), "seconds": 3.0}}}
    doc = tmp_path / "b.md"
    doc.write_text("# Title\n\nkept above\n")
    write_doc(render([results]), doc)
    first = doc.read_text()
    assert first.startswith("# Title\n\nkept above\n") and START in first and END in first
    assert "| fast path | 2 ms | slow path: 8 ms | 4 |" in first and "- a note" in first
    doc.write_text(first + "\nkept below\n")
    results["entries"]["thing"]["figures"][0]["ratio"] = 5.0
    write_doc(render([results]), doc)
    second = doc.read_text()
    assert second.count(START) == 1 and "kept below" in second and "| 5 |" in second


def test_an_entry_measured_after_the_others_names_its_date_and_load():
    res = Result("Thing", [Figure("fast path", 2.0, "ms", "slow path", 8.0)])
    later = {**res.to_json(), "seconds": 3.0, "measured": "2026-12-04 16:50 UTC", "load_avg_1m": 0.4}
    results = {"device": "cpu", "date": "2026-11-26 22:14 UTC", "machine": {"cpus": 2, "load_avg_1m": 1.5},
               "entries": {"old": {**res.to_json(), "seconds": 3.0}, "new": later}}
    text = render([results])
    assert "(`--only new`, 3 s, measured 2026-12-04 16:50 UTC, load average 0.4)" in text
    assert "(`--only old`, 3 s)" in text  # the heading's run: its date is the heading's
