"""`distillkit train/eval slidr` as a user runs them, and bad shards met by the SLidR trainer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.pipelines.codecs import npy_bytes
from distillkit.pipelines.shards import iter_samples, load_index
from distillkit.train.slidr import make_stream
from distillkit.train.streaming import BadSample
from tests.index_helpers import rewrite_shard


def test_train_resume_eval_cli(slidr_shards, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "step=2" in r.output and (out / "latest.pt").is_file()
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "3",
                                  "--out", str(out), "--resume"])
    assert r.exit_code == 0 and "step=3" in r.output
    r = CliRunner().invoke(main, ["eval", "slidr", "--checkpoint", str(out / "latest.pt"), "--shards",
                                  str(slidr_shards)])
    assert r.exit_code == 0, r.output
    assert "linear probe mIoU distilled" in r.output and "driveable_surface" in r.output


def test_cli_refuses_unknown_method_and_missing_cuda(slidr_shards):
    r = CliRunner().invoke(main, ["train", "nope", "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and "unknown method 'nope'" in r.output
    import torch

    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.output


@pytest.fixture
def bad_shards(slidr_shards, tmp_path):
    """Shard 0: first sample has zero pairs, second lacks cam2.sp.png. Shard 1: truncated."""
    out = tmp_path / "bad"
    shutil.copytree(slidr_shards, out)
    first, second = load_index(out)["shards"][:2]
    samples = list(iter_samples(out / first["file"]))
    samples[0][1]["pairs.npy"] = npy_bytes(np.zeros((0, 4), np.int32))
    samples[0][1]["pairs_uvd.npy"] = npy_bytes(np.zeros((0, 3), np.float32))
    del samples[1][1]["cam2.sp.png"]
    rewrite_shard(out, first["file"], samples)
    path = out / second["file"]  # truncated, its record kept true: the tar reader meets it, not the hash check
    rewrite_shard(out, second["file"], data=path.read_bytes()[: path.stat().st_size // 2])
    return out, first["file"], [k for k, _ in samples], second["file"]


def test_bad_samples_named_counted_skipped(bad_shards, caplog):
    out, shard0, keys, shard1 = bad_shards
    stream = make_stream(out, "small", seed=0, strict=False, epochs=1)
    with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
        good = [ex["key"] for ex in stream]
    text = caplog.text
    assert f"{shard0}: sample {keys[0]}" in text and "zero point-pixel pairs" in text
    assert f"{shard0}: sample {keys[1]}" in text and "cam2.sp.png" in text
    assert shard1 in text
    assert keys[0] not in good and keys[1] not in good and keys[2] in good
    assert stream.bad_samples >= 3


def test_strict_stops_at_first_bad_sample(bad_shards):
    out, shard0, keys, _ = bad_shards
    stream = make_stream(out, "small", seed=0, strict=True, epochs=1)
    stream.shuffle_shards = False
    with pytest.raises(BadSample, match=shard0):
        list(stream)


# ----------------------------------------------------------------- run folders (issue 19, item 4)

def _config_lines(run):
    import json

    return [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "config" in e]


def _train(slidr_shards, *args):
    return CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "1", *args])


def _run_folder(output):
    from pathlib import Path

    lines = [line for line in output.splitlines() if line.startswith("run folder: ")]
    assert len(lines) == 1, output
    return Path(lines[0].removeprefix("run folder: "))


def test_runs_get_their_own_folders_and_are_never_overwritten(slidr_shards, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    first, second = _train(slidr_shards), _train(slidr_shards)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = _run_folder(first.output), _run_folder(second.output)
    assert a != b and a.parent == b.parent == Path("runs/slidr"), (a, b)  # same second or not: two folders
    for run in (a, b):
        assert len(_config_lines(run)) == 1 and (run / "curves.png").is_file()
    assert torch.load(a / "latest.pt", weights_only=True)["method"] == "slidr"  # new checkpoints name the method

    # --out naming a folder that holds a run: refused in one line, nothing touched
    before = (a / "log.jsonl").read_text()
    again = _train(slidr_shards, "--out", str(a))
    assert again.exit_code == 2 and again.output.strip().splitlines() == [
        f"error: {a} already holds a run (latest.pt, log.jsonl): --resume continues it, --overwrite replaces it, "
        "and without --out the run gets a new folder under runs/slidr"]
    assert (a / "log.jsonl").read_text() == before
    both = _train(slidr_shards, "--out", str(a), "--resume", "--overwrite")
    assert both.exit_code == 2 and "give one of them" in both.output

    # --overwrite: the old run's lines are gone, the new run's alone remain
    (a / ".latest.pt.tmp123").write_bytes(b"torn")  # left by a killed save
    (a / "notes.txt").write_text("mine")
    replaced = _train(slidr_shards, "--out", str(a), "--overwrite", "--seed", "7")
    assert replaced.exit_code == 0, replaced.output
    assert "removed the previous run's .latest.pt.tmp123, curves.png, latest.pt, log.jsonl" in replaced.output
    configs = _config_lines(a)
    assert len(configs) == 1 and configs[0]["config"]["seed"] == 7
    assert (a / "notes.txt").read_text() == "mine" and not (a / ".latest.pt.tmp123").exists()

    # --resume without --out continues the newest run of the method
    resumed = _train(slidr_shards, "--resume", "--max-steps", "2")
    assert resumed.exit_code == 0, resumed.output
    assert f"continuing the newest run of slidr, {b}" in resumed.output and "step=2" in resumed.output
    assert torch.load(b / "latest.pt", weights_only=True)["step"] == 2 and len(_config_lines(b)) == 1


def test_resume_without_a_run_and_overwrite_without_out_are_one_line_errors(slidr_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nothing = _train(slidr_shards, "--resume")
    assert nothing.exit_code == 2 and nothing.output.strip().splitlines() == [
        "error: --resume without --out continues the newest run under runs/slidr, and there is none: name the run "
        "folder with --out"]
    bare = _train(slidr_shards, "--overwrite")
    assert bare.exit_code == 2 and "--overwrite needs --out" in bare.output
    assert not Path("runs").exists()  # a refused command creates no folder
    # --resume where a run stopped before its first checkpoint: it starts again, its old lines do not stay
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "log.jsonl").write_text('{"config": {"seed": 5}, "step": 0}\n{"loss": 1.0, "step": 10}\n')
    again = _train(slidr_shards, "--out", str(stopped), "--resume")
    assert again.exit_code == 0, again.output
    assert "has no latest.pt yet, so its run starts again from step 0" in again.output
    assert [c["config"]["seed"] for c in _config_lines(stopped)] == [0]


def test_run_folder_names_are_unique_and_ordered(tmp_path):
    from distillkit.train.run_dir import clear_run, new_run_dir, newest_run

    t = 1_800_000_000.0
    made = [new_run_dir("m", tmp_path, now=t) for _ in range(11)]  # eleven starts in one second
    assert len(set(made)) == 11 and made[1].name == made[0].name + "-2" and made[10].name.endswith("-11")
    assert newest_run("m", tmp_path) is None  # empty folders hold no run
    for d in (made[1], made[10], made[9]):
        (d / "log.jsonl").write_text("{}\n")
    assert newest_run("m", tmp_path) == made[10]  # -11 after -2 and -10: by number, not by text
    later = new_run_dir("m", tmp_path, now=t + 1)
    (later / "latest.pt").write_bytes(b"")
    assert newest_run("m", tmp_path) == later and newest_run("other", tmp_path) is None
    assert clear_run(later) == ["latest.pt"] and not any(later.iterdir())


# ----------------------------------------------------------------- one-line refusals (issue 19, item 5)

def test_a_trainer_refuses_another_pipelines_shards(slidr_shards, tmp_path):
    r = CliRunner().invoke(main, ["train", "comodo", "--shards", str(slidr_shards), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {slidr_shards} were built by the slidr pipeline; train comodo reads comodo shards "
        "(train slidr reads these)"]
    assert not (tmp_path / "c").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(empty)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {empty}: no index.json: not a shard folder, or its build has not finished (distillkit build "
        "writes index.json last)"]


@pytest.fixture
def other_checkpoints(tmp_path):
    """A COMODO checkpoint as written now (naming its method), one written before (configuration only), one of
    an unknown configuration and a file that is no checkpoint."""
    from distillkit.train.checkpoint import save_checkpoint, training_as
    from distillkit.train.comodo import ComodoTrainer

    config = ComodoTrainer.resolve_config({})
    with training_as("comodo"):
        new = save_checkpoint(tmp_path / "new" / "latest.pt", {"model": {}, "config": config})
    old = save_checkpoint(tmp_path / "old" / "latest.pt", {"model": {}, "config": config})
    odd = save_checkpoint(tmp_path / "odd" / "latest.pt", {"model": {}, "config": {"bogus": 1}})
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    return new, old, odd, junk


def test_eval_refuses_another_methods_checkpoint(other_checkpoints, slidr_shards, tmp_path):
    import torch

    new, old, odd, junk = other_checkpoints
    assert torch.load(new, weights_only=True)["method"] == "comodo" and "method" not in torch.load(old)
    for ckpt in (new, old):  # stamped, or recognised by its configuration's keys
        r = CliRunner().invoke(main, ["eval", "audio", "--checkpoint", str(ckpt), "--shards", str(slidr_shards)])
        assert r.exit_code == 2 and r.output.strip().splitlines() == [
            f"error: {ckpt} was written by train comodo; eval audio reads audio checkpoints (distillkit eval comodo "
            "reads it)"], r.output
    r = CliRunner().invoke(main, ["eval", "audio", "--checkpoint", str(odd), "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "is not one eval audio accepts (eval audio: bogus: unknown key" in r.output
    assert r.output.rstrip().endswith("is it a checkpoint of audio?")
    r = CliRunner().invoke(main, ["eval", "audio", "--checkpoint", str(junk), "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "not a readable checkpoint" in r.output
    # the right method's checkpoint on another pipeline's shards
    r = CliRunner().invoke(main, ["eval", "comodo", "--checkpoint", str(new), "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {slidr_shards} were built by the slidr pipeline; eval comodo reads comodo shards (train slidr "
        "reads these)"]
    # --resume of a folder whose checkpoint is another method's
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--out", str(old.parent),
                                  "--resume"])
    assert r.exit_code == 2 and "was written by train comodo; train slidr --resume reads slidr" in r.output
