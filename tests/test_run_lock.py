"""One process per run folder: ``distillkit train`` holds ``OUT/.lock`` for the whole run (shared code with the
build lock, ``distillkit.folder_lock``), and a run folder that cannot be made is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.folder_lock import FolderBusy, folder_lock
from distillkit.pipelines.cli import main
from distillkit.pipelines.train_cli import RUN_LOCK


def _train(shards: Path, *args: str):
    return CliRunner().invoke(main, ["train", "slidr", "--shards", str(shards), "--max-steps", "1", *args])


def _busy_line(out: Path) -> str:
    return (f"error: {out}: another run is writing this folder (lock {out / RUN_LOCK}); wait for it to end, or give "
            "another --out")


def test_a_second_process_on_a_live_run_folder_is_refused(slidr_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    # a run stopped before its first checkpoint: --resume would clear its log, which must not happen while it runs
    (live / "log.jsonl").write_text('{"config": {"seed": 5}, "step": 0}\n')
    # What a running `train --out live` holds; flock locks belong to an open file, so this process's own
    # lock stops the CLI run in this process as another process's would.
    with folder_lock(live, RUN_LOCK):
        for args in (["--out", str(live)], ["--out", str(live), "--resume"], ["--out", str(live), "--overwrite"]):
            r = _train(slidr_shards, *args)
            assert r.exit_code == 2 and r.output.strip().splitlines() == [_busy_line(live)], (args, r.output)
        assert (live / "log.jsonl").read_text() == '{"config": {"seed": 5}, "step": 0}\n'

        # --resume without --out picks the newest run of the method: a live one is refused alike
        newest = tmp_path / "runs" / "slidr" / "20261204-090000"
        newest.mkdir(parents=True)
        (newest / "log.jsonl").write_text('{"config": {}, "step": 0}\n')
        with folder_lock(newest, RUN_LOCK):
            r = _train(slidr_shards, "--resume")
            last = r.output.strip().splitlines()[-1]
            assert r.exit_code == 2 and last == _busy_line(Path("runs/slidr/20261204-090000")), r.output
    # the lock goes with the run: the same commands now work
    r = _train(slidr_shards, "--out", str(live), "--resume")
    assert r.exit_code == 0, r.output


def test_the_lock_is_held_while_training_and_released_after(slidr_shards, tmp_path, monkeypatch):
    from distillkit.train.registry import get_trainer

    seen = {}

    def train(self, shards, out, config, device="cpu", resume=False, strict=False):
        try:
            with folder_lock(out, RUN_LOCK):
                seen["busy"] = False
        except FolderBusy:
            seen["busy"] = True
        return {"step": 0}

    monkeypatch.setattr(type(get_trainer("slidr")), "train", train)
    out = tmp_path / "run"
    r = _train(slidr_shards, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert seen == {"busy": True}, "the lock must be held by the CLI while the trainer runs"
    with folder_lock(out, RUN_LOCK) as locked:  # released at the end
        assert locked


def test_a_refused_command_with_a_new_out_leaves_no_folder(slidr_shards, tmp_path):
    out = tmp_path / "new"
    r = _train(slidr_shards, "--out", str(out), "--set", "no_such_key=1")
    assert r.exit_code == 2 and "no_such_key" in r.output
    assert not out.exists()


def test_a_run_folder_that_cannot_be_created_is_one_line(slidr_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs").write_text("not a folder")
    r = _train(slidr_shards)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot create a run folder under runs/slidr") and \
        "give --out" in lines[0], r.output
    blocked = tmp_path / "file"
    blocked.write_text("x")
    r = _train(slidr_shards, "--out", str(blocked / "run"))
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {blocked / 'run'}: cannot use as run folder: Not a directory"], r.output


def test_a_filesystem_without_locks_still_trains(slidr_shards, tmp_path, monkeypatch, caplog):
    import errno
    import fcntl
    import logging

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS without lockd

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="distillkit"):
        r = _train(slidr_shards, "--out", str(tmp_path / "run"))
    assert r.exit_code == 0, r.output
    assert any("has no file locks" in rec.getMessage() and "second run" in rec.getMessage() for rec in caplog.records)


def test_a_lock_file_removed_after_it_was_opened_guards_nothing(tmp_path, monkeypatch):
    """A refused train removes the folder it made, lock file included; a process that opened that file
    before the removal must not believe it holds the folder once its flock succeeds."""
    import os

    import distillkit.folder_lock as fl

    real_open = os.open

    def open_then_removed(path, *args):
        fd = real_open(path, *args)
        os.unlink(path)  # the other process's clean-up, between our open and our flock
        return fd

    monkeypatch.setattr(fl.os, "open", open_then_removed)
    with pytest.raises(fl.FolderBusy), fl.folder_lock(tmp_path, ".lock"):
        pass
    monkeypatch.setattr(fl.os, "open", real_open)
    with fl.folder_lock(tmp_path, ".lock") as held:  # an ordinary lock still works
        assert held
