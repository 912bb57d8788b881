"""COMODO as released, wired into the trainer (issue 21 items 1-5): the Mantis-8M student by default at size paper
(refused without weights unless asked for), its pretrained state as the evaluation's baseline, distillation on the
train split and evaluation train -> test when the shards carry the released splits, the released SVM protocol, the
epochs option, the released lr schedule's quirk and the teacher-standardisation switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from distillkit.sensors.synth.ego import make_ego
from distillkit.train import comodo as tc
from distillkit.train.base import ConfigError
from distillkit.train.comodo import ComodoTrainer
from distillkit.train.loop import cosine_lambda
from tests.conftest import build_serial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before mantis imports huggingface_hub


def test_paper_size_is_the_released_recipe_and_small_is_unchanged():
    paper = ComodoTrainer.effective_config(ComodoTrainer.resolve_config({"size": "paper"}, check=False))
    assert (paper["student"], paper["batch_size"], paper["epochs"], paper["max_steps"]) == ("mantis", 128, 20, None)
    assert paper["teacher_standardise"] is False and paper["lr_schedule"] == "clean"
    small = ComodoTrainer.effective_config(ComodoTrainer.resolve_config({}))
    assert (small["student"], small["batch_size"], small["max_steps"], small["epochs"]) == ("transformer", 32, 100,
                                                                                           None)
    assert small["teacher_standardise"] is True
    assert paper["queue_holdout"] is True and small["queue_holdout"] is False
    sources = ComodoTrainer.config_sources(ComodoTrainer.resolve_config({"size": "paper"}, check=False))
    for key, cite in (("student", "train.py:227"), ("epochs", "train.py:48"), ("batch_size", "train.py:49"),
                      ("lr_schedule", "train.py:379"), ("teacher_standardise", "model_util.py:188"),
                      ("queue_holdout", "train.py:292-311")):
        assert cite in sources[key], (key, sources[key])


def test_a_mantis_student_without_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="student_checkpoint: the mantis student needs local Mantis-8M weights"):
        ComodoTrainer.resolve_config({"size": "paper"})  # refused with the configuration, before any run folder
    ComodoTrainer.resolve_config({"size": "paper", "random_student": True})  # asked for: accepted
    with pytest.raises(ConfigError, match="no such file or folder"):
        ComodoTrainer.resolve_config({"size": "paper", "student_checkpoint": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="only the mantis student"):
        ComodoTrainer.resolve_config({"student": "transformer", "student_checkpoint": str(tmp_path)})
    with pytest.raises(ConfigError, match="max_steps or epochs"):
        ComodoTrainer.resolve_config({"max_steps": 5, "epochs": 2})


def _released_lr(step: int, total: int, warmup: int) -> float:
    """transformers.get_linear_schedule_with_warmup's factor after the warm-up (what Breezelled/COMODO
    comodo/train.py:387-391 builds), written out."""
    return max(0.0, (total - step) / max(1, total - warmup))


def test_epochs_and_the_released_schedule():
    config = {"batch_size": 10, "epochs": 3, "max_steps": None, "lr_schedule": "clean"}
    clean = tc.schedule(config, n_windows=1001, queue=100)
    assert (clean["steps"], clean["warmup"], clean["min_lr_ratio"]) == (3 * 101, 30, 0.0)  # last batch kept
    released = tc.schedule({**config, "lr_schedule": "released"}, n_windows=1001, queue=100)
    s0 = 91  # ceil((1001 - 100) / 10): epoch 0 without the queue's windows
    total = s0 + (s0 + 100) * 2  # the release counts the queue's 100 samples as batches (train.py:379-381)
    assert released["released_total"] == total and released["warmup"] == int(0.1 * total)
    f = cosine_lambda(released["steps"], released["warmup"], released["min_lr_ratio"], schedule="linear")
    for step in range(released["warmup"], released["steps"] + 1, 7):  # the decay is the release's straight line
        assert f(step) == pytest.approx(_released_lr(step, total, released["warmup"]))
    assert f(released["steps"]) > 0.2  # the release's lr never decays to 0 within its run
    # the release warms up from 0 (get_linear_schedule_with_warmup: step / W); distillkit's clean schedule from 1/W
    zero = cosine_lambda(released["steps"], released["warmup"], released["min_lr_ratio"], schedule="linear",
                         warmup_from_zero=True)
    assert [zero(s) for s in (0, 1, 7)] == [s / released["warmup"] for s in (0, 1, 7)] and f(0) > 0
    # the queue held out of epoch 0 (train.py:292-311, back at epoch 1): epoch 0 has s0 batches, the others 101
    held = tc.schedule({**config, "queue_holdout": True}, n_windows=1001, queue=100)
    assert held["steps"] == s0 + 2 * 101
    # the paper's recipe on 100k windows (batch 128, queue 16,384, 20 epochs): the warm-up outlasts the run and the
    # lr peaks at about 0.48x (issue 21's figure)
    paper = tc.schedule({"batch_size": 128, "epochs": 20, "max_steps": None, "lr_schedule": "released"},
                        n_windows=100_000, queue=16_384)
    assert paper["warmup"] > paper["steps"]
    peak = cosine_lambda(paper["steps"], paper["warmup"], paper["min_lr_ratio"], schedule="linear")(paper["steps"] - 1)
    assert peak == pytest.approx(0.48, abs=0.01)


def test_teacher_standardisation_is_a_switch():
    raw = torch.randn(20, 16) * 5 + 3
    on = tc.Comodo(tc.SIZES["small"], 16, torch.zeros(20, 128), torch.zeros(6), torch.ones(6), 0.05, 0.1, seed=0)
    off = tc.Comodo(tc.SIZES["small"], 16, torch.zeros(20, 128), torch.zeros(6), torch.ones(6), 0.05, 0.1, seed=0,
                    teacher_standardise=False)
    on.fill_queue(raw)
    off.fill_queue(raw)
    assert not torch.allclose(on.t_mean, torch.zeros(16))
    assert torch.equal(off.t_mean, torch.zeros(16)) and torch.equal(off.t_std, torch.ones(16))
    # off: the frozen head sees the raw embedding (the release's), the same head weights either way
    expected = torch.nn.functional.normalize(off.teacher_head(raw), dim=1)
    torch.testing.assert_close(off.queue, expected)
    assert not torch.allclose(on.queue, off.queue)


@pytest.fixture(scope="module")
def split_shards(tmp_path_factory) -> Path:
    """Synthetic ego data built with the released split files (1 train, 1 val, 1 test recording)."""
    root = make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=3, size="small")
    return build_serial("demo-comodo", tmp_path_factory.mktemp("comodo-split-shards"), f"source.root={root}",
                        "stages.frames.size=32", "source.splits_dir=splits", "output.max_rejected=1.0")


def test_the_train_split_is_distilled_and_without_splits_every_window(split_shards):
    info = tc.shard_info(split_shards)
    assert tc.resolve_split({"split": None}, info) == ("train", info["splits"]["train"])
    assert tc.resolve_split({"split": "all"}, info) == ("all", info["samples"])
    n = sum(1 for _ in tc.make_stream(split_shards, 0, False, epochs=1, shuffle=False, split="train"))
    assert n == info["splits"]["train"] < info["samples"]
    # the queue is drawn from the train split only
    queue = tc.initial_teacher_embeddings(split_shards, info["splits"]["train"] + 5, 0, None, split="train",
                                          share=info["splits"]["train"] / info["samples"])
    assert len(queue) == info["splits"]["train"]
    without = {**info, "splits": {}}
    assert tc.resolve_split({"split": None}, without) == ("all", info["samples"])
    with pytest.raises(ValueError, match="carry no splits"):
        tc.resolve_split({"split": "train"}, without)


def test_the_queue_is_held_out_of_epoch_zero_and_resumes_with_it(split_shards, tmp_path, monkeypatch):
    """queue_holdout: the stream leaves the queue's windows out of epoch 0 only; the keys travel in the checkpoint,
    so a run stopped and resumed inside epoch 0 trains on the same batches as one that was not."""
    info = tc.shard_info(split_shards)
    n = info["splits"]["train"]
    keys = tc.queue_draw(split_shards, 4, 0, None, split="train", share=n / info["samples"])[0]
    stream = tc.make_stream(split_shards, 0, False, epochs=2, shuffle=False, split="train")
    stream.hold_out = frozenset(keys)
    seen = [[] for _ in range(2)]
    previous = None
    for sample in tc.ShardStream.__iter__(stream):  # the stream's own order: epoch 0, then epoch 1
        seen[1 if previous is not None and len(seen[0]) == n - 4 else 0].append(sample)
        previous = sample
    assert stream.held_out == 4 and len(seen[0]) == n - 4 and len(seen[1]) == n
    config = ComodoTrainer.resolve_config({"max_steps": 8, "batch_size": 2, "queue_size": 4, "queue_holdout": True})
    whole = ComodoTrainer().train(split_shards, tmp_path / "whole", config)
    real_loader = tc.make_loader

    def crashing_loader(*args, **kwargs):  # dies fetching batch 4: the last checkpoint is step 2 (of 2, 4, 6, 8)
        for i, batch in enumerate(real_loader(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(tc, "make_loader", crashing_loader)
    with pytest.raises(KeyboardInterrupt):
        ComodoTrainer().train(split_shards, tmp_path / "cut", config)
    monkeypatch.setattr(tc, "make_loader", real_loader)
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 2
    assert n - 4 > 2 * 2  # step 2 is inside epoch 0, while the queue's windows are held out
    resumed = ComodoTrainer().train(split_shards, tmp_path / "cut", config, resume=True)
    assert whole["queue_held_out"] == resumed["queue_held_out"] == 4
    a = torch.load(tmp_path / "whole" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["model"]
    assert a["_extra_state"]["queue_keys"] == b["_extra_state"]["queue_keys"] == keys
    for name in a:
        if name != "_extra_state":
            assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="takes every window"):
        ComodoTrainer().train(split_shards, None, {**config, "queue_size": n})


@pytest.fixture(scope="module")
def saved_mantis(tmp_path_factory) -> Path:
    mantis = pytest.importorskip("mantis.architecture")
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("mantis") / "mantis8m"
    mantis.Mantis8M(device="cpu").save_pretrained(folder)
    return folder


def test_mantis_end_to_end_pretrained_baseline_and_svm(split_shards, saved_mantis, tmp_path):
    """Train 2 steps with a (randomly initialised, saved) Mantis-8M as the pretrained student, then evaluate with the
    released SVM: the baseline is that Mantis before distillation, the sides are the split files'."""
    from distillkit.train.models.mantis_student import MantisStudent

    config = ComodoTrainer.resolve_config({"size": "paper", "student_checkpoint": str(saved_mantis), "max_steps": 2,
                                           "batch_size": 4, "queue_size": 8})
    metrics = ComodoTrainer().train(split_shards, tmp_path / "run", config)
    info = tc.shard_info(split_shards)
    assert (metrics["split"], metrics["split_windows"], metrics["step"]) == ("train", info["splits"]["train"], 2)
    assert metrics["queue_held_out"] == 8  # paper: the queue's windows are left out of epoch 0
    state = torch.load(tmp_path / "run" / "latest.pt", map_location="cpu", weights_only=False)["model"]
    assert torch.equal(state["mean"].reshape(-1), torch.zeros(6))  # Mantis sees the raw IMU, as released
    students, mean, std = tc.eval_students(tmp_path / "run" / "latest.pt", [split_shards], config)
    pretrained = MantisStudent.from_checkpoint(saved_mantis).eval()
    x = torch.randn(3, 6, 400)
    with torch.no_grad():
        torch.testing.assert_close(students["random_init"].eval().features(x), pretrained.features(x))
        assert not torch.allclose(students["distilled"].eval().features(x), pretrained.features(x))
    trainer = ComodoTrainer()
    result = trainer.evaluate(tmp_path / "run" / "latest.pt", [split_shards], config)  # paper: svm by default
    assert result["protocol"] == "svm" and "pretrained Mantis-8M" in result["baseline"]
    assert result["split_source"].startswith("split files")
    assert 0 < result["distilled"]["test_windows"] <= info["splits"]["test"]  # every labelled test window
    for name in ("random_init", "distilled"):
        assert {"top1", "top3", "top5", "C", "top1_predict"} <= set(result[name])
    head = trainer.headline(result)
    assert head["metric"].startswith("top-1") and head["random"] == result["random_init"]["top1"]
    assert "baseline: pretrained Mantis-8M" in trainer.format_eval(result)
    # a transformer checkpoint does not load half-way into a Mantis student
    small = ComodoTrainer.resolve_config({"max_steps": 1, "batch_size": 4, "queue_size": 8})
    ComodoTrainer().train(split_shards, tmp_path / "small", small)
    with pytest.raises(ValueError, match="do not fit the mantis student"):
        tc.eval_students(tmp_path / "small" / "latest.pt", [split_shards], config)


def test_linear_protocol_keeps_the_probe_on_the_split_files(split_shards, tmp_path):
    config = ComodoTrainer.resolve_config({"max_steps": 1, "batch_size": 4, "queue_size": 8})
    ComodoTrainer().train(split_shards, tmp_path / "run", config)
    result = ComodoTrainer().evaluate(tmp_path / "run" / "latest.pt", [split_shards], config)
    assert result["protocol"] == "linear" and "balanced_accuracy" in result["distilled"]
    assert result["split_source"].startswith("split files")
    assert "transformer" in result["baseline"] and "random init" in result["baseline"]
    # without split files the recordings are held out whole, as before: tests/test_comodo.py's evaluations
