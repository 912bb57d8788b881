"""`distillkit demo`'s audio section in its exact configuration (seed 0): the distilled encoder must beat the same
encoder at random init on held-out files, with no NaN anywhere in what the demo prints or writes.

This test also holds the checks of the former ``tests/test_audio_train.py::test_distillation_beats_random_init_on_
fixed_seed`` (800 steps on the medium synthetic set): the step count, a test side of at least 30 segments, the
number of probe splits, and a gain in both accuracy and balanced accuracy, now on the demo's data and steps
(docs/audio.md "The demo"). The demo's ATST-Frame (600 steps on the same shards, the same probe) must gain too,
and the ATST-Clip checkpoint must lower the equal error rate of speaker verification trials (issue 23 item 5).
A few minutes on 2 idle cores."""

from __future__ import annotations

import json
import math
import re

import pytest


def _numbers(node):
    """Every float in a JSON-like tree."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _numbers(v)
    elif isinstance(node, float):
        yield node


@pytest.mark.slow
def test_demo_audio_distilled_beats_random_init(tmp_path, capsys):
    from distillkit.pipelines.demo import run_demo
    from distillkit.pipelines.registry import PIPELINES
    from distillkit.pipelines.shards import load_index
    from distillkit.train.atst_frame import AtstFrameTrainer
    from distillkit.train.audio import AudioTrainer

    results = run_demo(tmp_path, only=["audio"], seed=0)
    printed = capsys.readouterr().out

    # the demo's data: every segment a whole 10 s file, no zero-padded tail
    assert PIPELINES.get("audio").demo.size == "demo"
    stats = load_index(tmp_path / "shards" / "audio")["stats"]
    assert stats["padded_segments"] == 0 and stats["labelled_segments"] == stats["samples"] >= 150

    entry = results["audio"]["train"]["audio"]
    assert entry["metrics"]["step"] == AudioTrainer.demo["max_steps"]
    result = entry["eval"]
    n_splits = AudioTrainer.demo_eval["splits"]
    assert len(result["splits"]["distilled"]) == len(result["splits"]["random_init"]) == n_splits > 1
    # one test segment must not be the gain: 75 test files per split, each 1/75 = 0.013 of a split's accuracy
    assert result["distilled"]["n_test"] == result["random_init"]["n_test"] >= 60
    # mean over the splits: seed 0 measured +0.065 (docs/audio.md "The demo"); 0.03 (the bar of the former medium
    # test) leaves room for another CPU's floating-point path through the steps, and is more than two test
    # segments of every split
    assert result["gain_balanced_accuracy"] > 0.03, printed
    assert result["gain_accuracy"] > 0.03, printed

    # the summary's line and summary.json carry the same headline
    head = entry["headline"]
    assert head["metric"] == f"balanced accuracy (mean of {n_splits} file splits)"
    assert head["gain"] == pytest.approx(head["distilled"] - head["random"])
    assert head["gain"] == pytest.approx(result["gain_balanced_accuracy"])
    assert head["gain"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seed"] == 0
    row = summary["methods"]["audio"]
    assert row["metric"] == head["metric"]
    numbers = ("distilled", "random", "gain")
    assert [row[k] for k in numbers] == pytest.approx([head[k] for k in numbers])
    assert row["steps"] == AudioTrainer.demo["max_steps"] and row["rejected"] == 0

    # no NaN in the printed tables, the summary or the evaluation result
    assert not re.search(r"\bnan\b", printed, flags=re.IGNORECASE), printed
    assert all(math.isfinite(x) for x in _numbers(summary))
    assert all(math.isfinite(x) for x in _numbers(result))

    # ATST-Frame (issue 23): the demo trains it on the same shards and probes the mean of its frame tokens. Seed 0
    # measured +0.064 mean balanced accuracy over 10 splits at 600 steps (docs/audio.md "The demo"); the same bar
    frame = results["audio"]["train"]["atst-frame"]
    assert frame["metrics"]["step"] == AtstFrameTrainer.demo["max_steps"]
    assert len(frame["eval"]["splits"]["distilled"]) == AtstFrameTrainer.demo_eval["splits"] > 1
    assert frame["eval"]["distilled"]["n_test"] >= 60
    assert frame["eval"]["gain_balanced_accuracy"] > 0.03, printed
    assert frame["headline"]["gain"] == pytest.approx(frame["eval"]["gain_balanced_accuracy"])
    assert summary["methods"]["atst-frame"]["steps"] == AtstFrameTrainer.demo["max_steps"]
    assert all(math.isfinite(x) for x in _numbers(frame["eval"]))

    # Speaker verification (issue 23 item 5) on the same checkpoint, the demo's 5 classes standing in for speakers:
    # 1000 target + 1000 non-target trials drawn with trials_seed 0, cosine scoring. Seed 0 measured EER 39.1% at
    # random init against 35.9% distilled (+3.2 points, docs/audio.md "Speaker verification"); 1.5 points is 15
    # trials of either kind, and leaves room for another CPU's path through the 1800 steps.
    trainer = AudioTrainer()
    checkpoint = tmp_path / "runs" / "audio" / "latest.pt"
    config = trainer.resolve_config(AudioTrainer.demo, {"seed": 0})  # the demo's (pipelines/demo.py)
    ver = trainer.evaluate(checkpoint, [tmp_path / "shards" / "audio"], config,
                           options=trainer.resolve_eval_options({"protocol": "verification"}))
    assert ver["eval_protocol"] == "verification" and "trials_seed 0" in ver["protocol"]
    assert ver["gain_eer"] == pytest.approx(ver["random_init"]["eer"] - ver["distilled"]["eer"])
    assert ver["gain_eer"] > 0.015, trainer.format_eval(ver)
