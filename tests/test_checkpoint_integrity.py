"""Checkpoints are checked before they are used (issue 22, item 2): every checkpoint distillkit writes carries
a digest of its contents, loading verifies it, and a file that is no checkpoint is refused in one line naming it;
other projects' weights (MoCo, DINO) and distillkit checkpoints written before digests still load."""

from __future__ import annotations

import argparse
import logging
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distillkit.checkpoint_file import (
    DIGEST_KEY,
    CheckpointError,
    load_weights,
    state_digest,
    torch_file_format,
)
from distillkit.pipelines.cli import main
from distillkit.train.checkpoint import checkpoint_info, load_checkpoint, save_checkpoint, training_as


def _state(n: int = 50_000) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"net.weight": torch.randn(n, generator=g), "net.bias": torch.zeros(3, dtype=torch.bfloat16)},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": 7, "rng": {"python": [1, 2, None, 0.5]}, "config": {"size": "small", "seed": 0}}


def flip_inside_weights(path: Path, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of the largest tensor's data record of a torch zip file: the pickled
    structure and the zip directory stay intact, so ``torch.load`` reads the file (torch checks no CRC)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_saved_checkpoints_carry_a_digest_that_loading_verifies(tmp_path, caplog):
    path = save_checkpoint(tmp_path / "latest.pt", _state())
    raw = torch.load(path, weights_only=True)
    assert raw[DIGEST_KEY]["sha256"] == state_digest(_state())
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(path)
        assert load_checkpoint(path, mmap=True)["step"] == 7
    assert DIGEST_KEY not in state and torch.equal(state["model"]["net.weight"], _state()["model"]["net.weight"])
    assert caplog.text == ""  # a verified checkpoint loads silently


def test_flipped_bytes_inside_the_weights_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "latest.pt", _state())
    flip_inside_weights(path)
    # torch itself loads it, the weights silently different: what eval and --resume used to train on
    loaded = torch.load(path, weights_only=True)
    assert not torch.equal(loaded["model"]["net.weight"], _state()["model"]["net.weight"])
    for load in (load_checkpoint, lambda p: load_checkpoint(p, mmap=True), checkpoint_info, load_weights):
        with pytest.raises(CheckpointError, match="corrupted: its contents do not match the sha256 digest") as err:
            load(path)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value) and err.value.corrupted


def test_a_changed_number_is_refused_too(tmp_path):
    """Not only tensor bytes: the step, the configuration and the optimiser's numbers are covered."""
    path = save_checkpoint(tmp_path / "latest.pt", _state())
    stored = torch.load(path, weights_only=True)
    stored["step"] = 8  # as an edit of the pickled structure would: the digest entry kept as it was
    torch.save(stored, path)
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = save_checkpoint(tmp_path / "good.pt", _state())
    files = {}
    empty = tmp_path / "empty.pt"
    empty.touch()
    files["empty"] = (empty, "empty file (0 bytes)")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (cut, "truncated or damaged")
    text = tmp_path / "notes.pt"
    text.write_text("step=100 loss=0.3\n")
    files["text"] = (text, "a text file (18 bytes, starting 'step=100 loss=0.3')")
    foreign = tmp_path / "foreign.pt"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("weights/readme.txt", "not torch")
    files["foreign zip"] = (foreign, "a zip archive, but not a torch checkpoint (no data.pkl")
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    files["folder"] = (folder, "a folder, not a checkpoint file")
    binary = tmp_path / "noise.pt"
    binary.write_bytes(bytes(range(7, 107)))
    files["binary"] = (binary, "neither torch.save's zip format nor its legacy pickle format")
    return files


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "foreign zip", "folder", "binary"])
def test_files_that_are_no_checkpoint_are_refused_in_one_line(tmp_path, kind):
    path, reason = _bad_files(tmp_path)[kind]
    for load in (load_checkpoint, lambda p: load_checkpoint(p, mmap=True), load_weights, torch_file_format):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = str(err.value)
        assert message.startswith(f"{path}: not a readable checkpoint: ") and reason in message, message
        assert "\n" not in message and "mmap" not in message and not err.value.corrupted


def test_old_checkpoints_without_a_digest_load_with_one_warning(tmp_path, caplog):
    old = tmp_path / "latest.pt"
    torch.save(_state(), old)  # what save_checkpoint wrote before digests
    with caplog.at_level(logging.WARNING, logger="distillkit.train.checkpoint"):
        assert checkpoint_info(old) == (None, {"size": "small", "seed": 0})
        assert load_checkpoint(old)["step"] == 7  # the CLI reads it, then the trainer: still one warning
    assert caplog.messages == [f"{old}: carries no digest ({DIGEST_KEY}; written before distillkit checkpoints had "
                               "one): its contents cannot be checked"]


def test_other_projects_weights_load_as_before(tmp_path):
    """MoCo's released file is torch's legacy (pre-1.6) format; DINO's a zip with an argparse Namespace."""
    from distillkit.preprocess.vit import read_vit_state_dict
    from distillkit.train.models.resnet import ResNet, load_moco_v2
    from tests.test_slidr_vit_teacher import dino_state_dict

    src = ResNet((1, 1, 1, 1), 8)
    moco = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in src.state_dict().items()}, "epoch": 800},
               moco, _use_new_zipfile_serialization=False)
    assert torch_file_format(moco) == "legacy"
    dst = ResNet((1, 1, 1, 1), 8)
    assert load_moco_v2(dst, moco)
    torch.testing.assert_close(dst.layer4[0].conv3.weight, src.layer4[0].conv3.weight)

    dino = tmp_path / "dino.pth"
    sd = dino_state_dict()
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}, "args": argparse.Namespace(arch="vit_tiny")},
               dino)
    assert set(read_vit_state_dict(dino)) == set(sd)
    legacy = tmp_path / "dino_legacy.pth"  # read memory-mapped, which the legacy format cannot be: read instead
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    assert set(read_vit_state_dict(legacy)) == set(sd)
    with pytest.raises(CheckpointError, match="not a distillkit training checkpoint \\(no 'model' entry; its entries "
                                              "are state_dict, epoch\\)"):
        load_checkpoint(moco)  # foreign weights are no run to evaluate or resume


def test_distillkit_files_used_as_weights_are_verified(tmp_path):
    """A uniseg checkpoint as another run's init_checkpoint (read_vit_state_dict), or any file distillkit
    wrote given as a teacher: verified like a checkpoint, the digest entry hidden from the loader."""
    from distillkit.preprocess.vit import read_vit_state_dict
    from tests.test_slidr_vit_teacher import dino_state_dict

    sd = dino_state_dict()
    path = save_checkpoint(tmp_path / "uniseg" / "latest.pt", {"model": {"teacher.backbone." + k: v
                                                                         for k, v in sd.items()}})
    assert set(read_vit_state_dict(path)) == set(sd)
    assert DIGEST_KEY not in load_weights(path)
    flip_inside_weights(path)
    with pytest.raises(CheckpointError, match="corrupted"):
        read_vit_state_dict(path)


def test_digest_depends_on_contents_only():
    state = _state()
    base = state_digest(state)
    assert state_digest(state, workers=1) == state_digest(state, workers=4) == base
    wide = torch.randn(64, 32)
    a = {"model": {"w": wide.t()}}  # a non-contiguous view: hashed as its elements, as a loader gets them
    assert state_digest(a) == state_digest({"model": {"w": wide.t().contiguous()}})
    assert state_digest({**state, DIGEST_KEY: {"scheme": 1, "sha256": "0"}}) == base  # the entry itself is left out
    for changed in ({**state, "step": 8}, {**state, "config": {"size": "small", "seed": 1}},
                    {**state, "model": {**state["model"], "net.bias": torch.zeros(3)}},  # same zeros, other dtype
                    {**state, "model": {**state["model"], "net.bias": torch.zeros(1, 3, dtype=torch.bfloat16)}},
                    {**state, "rng": {"python": [1, 2, None, 0.25]}}, {**state, "rng": {"python": (1, 2, None, 0.5)}}):
        assert state_digest(changed) != base


# --------------------------------------------------------------------------- through the CLI


def _slidr_checkpoint(tmp_path: Path) -> Path:
    """A slidr run folder's latest.pt: ``eval`` and ``--resume`` read its method and configuration first, so
    the weights need not fit the network for the refusals below."""
    from distillkit.train.slidr import SlidrTrainer

    with training_as("slidr"):
        return save_checkpoint(tmp_path / "run" / "latest.pt", {**_state(), "config": SlidrTrainer.resolve_config({})})


def _one_error_line(result, path: Path, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {path}: {expected}"], result.stderr
    assert "Traceback" not in result.output


def test_eval_and_resume_refuse_a_corrupted_checkpoint(slidr_shards, tmp_path):
    ckpt = _slidr_checkpoint(tmp_path)
    flip_inside_weights(ckpt)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.parent.iterdir()}
    runner = CliRunner()
    resume = ["train", "slidr", "--out", str(ckpt.parent), "--resume"]
    for args in (["eval", "slidr", "--checkpoint", str(ckpt)], resume):
        r = runner.invoke(main, [*args, "--shards", str(slidr_shards)])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert r.stderr.startswith(f"error: {ckpt}: corrupted: its contents do not match the sha256 digest stored "
                                   "when it was saved (stored ") and "Traceback" not in r.output
    # nothing cleared or written (but the run lock --resume takes, which stays as an empty file)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.parent.iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "foreign zip"])
def test_eval_refuses_files_that_are_no_checkpoint(slidr_shards, tmp_path, kind):
    path, reason = _bad_files(tmp_path)[kind]
    r = CliRunner().invoke(main, ["eval", "slidr", "--checkpoint", str(path), "--shards", str(slidr_shards)])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith(f"error: {path}: not a readable checkpoint: ") and reason in r.stderr


def test_resume_of_an_empty_latest_pt_is_refused(slidr_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.pt").touch()  # a copy that failed, a full disk
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--out", str(run), "--resume"])
    _one_error_line(r, run / "latest.pt", "not a readable checkpoint: empty file (0 bytes)")


def test_a_broken_teacher_file_is_refused_before_the_run_folder_is_made(slidr_shards, tmp_path):
    teacher = tmp_path / "moco.pth.tar"
    teacher.write_bytes(b"")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--out", str(out),
                                  "--teacher-checkpoint", str(teacher)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        f"error: train slidr: teacher_checkpoint: {teacher}: not a readable checkpoint: empty file (0 bytes)"]
    assert not out.exists()


def test_a_corrupted_teacher_file_stops_training_in_one_line(slidr_shards, tmp_path):
    """A file distillkit wrote, given as the MoCo teacher and corrupted since: found when the trainer loads it."""
    from distillkit.train.models.resnet import ResNet

    teacher = save_checkpoint(tmp_path / "teacher.pt", {"state_dict": ResNet((1, 1, 1, 1), 8).state_dict()})
    flip_inside_weights(teacher)
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--out", str(tmp_path / "run"),
                                  "--max-steps", "1", "--teacher-checkpoint", str(teacher)])
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {teacher}: corrupted: ")
    assert "Traceback" not in r.output and not (tmp_path / "run" / "latest.pt").exists()


# --------------------------------------------------------------------------- what the digest covers

_SET_ROUND_TRIP = """
import sys
import torch
from distillkit.train.checkpoint import load_checkpoint, save_checkpoint
path, names = sys.argv[1], [f"class-{i}" for i in range(40)]
if sys.argv[2] == "save":
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "classes": set(names)})
    print(" ".join(torch.load(path, weights_only=True)["classes"]))
else:
    state = load_checkpoint(path)
    assert state["classes"] == set(names)
    print(" ".join(state["classes"]))
"""


def test_a_set_of_strings_verifies_under_another_hash_seed(tmp_path):
    """A set loads in its iteration order, which for strings PYTHONHASHSEED decides: saved in one process and
    verified in another, its digest must not depend on that order (a repr of the set would)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "latest.pt"
    orders = []
    for seed, action in (("1", "save"), ("2", "load")):
        done = subprocess.run([sys.executable, "-c", _SET_ROUND_TRIP, str(path), action], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        orders.append(done.stdout.split())
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # the orders did differ


def test_a_value_the_digest_does_not_cover_is_refused_when_saving(tmp_path):
    import numpy as np

    path = tmp_path / "latest.pt"
    state = {"model": {"w": torch.ones(2)}, "config": {"sizes": [1, np.int64(2)]}}
    with pytest.raises(TypeError, match=r"checkpoint entry \['config'\]\['sizes'\]\[1\]: cannot digest a "
                                        r"numpy\.int64"):
        save_checkpoint(path, state)
    assert not list(tmp_path.iterdir())  # nothing written, not even the temporary file
    covered = {"dtype": torch.bfloat16, "device": torch.device("cpu"), "z": 1 + 2j, "raw": bytearray(b"x"),
               "shape": torch.Size([2, 3]), "tags": {"a", "b"}}
    base = state_digest(covered)
    for changed in ({**covered, "dtype": torch.float16}, {**covered, "z": 1 - 2j}, {**covered, "raw": b"x"},
                    {**covered, "tags": {"a", "c"}}, {**covered, "tags": ["a", "b"]}):
        assert state_digest(changed) != base
