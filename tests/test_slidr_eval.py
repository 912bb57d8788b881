"""SLidR's downstream protocols and the paper recipe's guards, on the synthetic nuScenes shards
(scenes named after real nuScenes scenes, so the official train / val splits apply)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.train.slidr import PAPER_TEACHER_MESSAGE, SlidrTrainer, count_split_samples, resolve_schedule
from distillkit.train.slidr_eval import every_nth_scene, load_labelled, split_by_scene


def test_probe_trains_on_official_train_scenes_and_reports_on_val(slidr_shards):
    clouds = load_labelled(slidr_shards)
    train, val, how = split_by_scene(clouds)
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    assert {c.scene for c in val} <= set(splits["val"]) and {c.scene for c in train} <= set(splits["train"])
    assert val and train and "official" in how
    # voxel labels are the label of each voxel's first point, point labels cover every point
    c = clouds[0]
    assert len(c.voxel_labels) == len(c.coords) and len(c.point_labels) == len(c.inverse) == len(c.xyz)
    with pytest.raises(ValueError, match="val"):
        split_by_scene(train)  # no val scene: the probe refuses rather than report on seen scenes


def test_one_percent_keeps_every_hundredth_scene_or_the_first():
    from distillkit.train.slidr_eval import LabelledCloud

    def cloud(scene: str) -> LabelledCloud:
        return LabelledCloud(scene, scene, *([None] * 7))  # type: ignore[arg-type]

    many = [cloud(f"scene-{i:04d}") for i in range(1, 251)]
    kept, note = every_nth_scene(many, 1)
    assert [c.scene for c in kept] == ["scene-0100", "scene-0200"] and "every 100th" in note
    kept, note = every_nth_scene(many[:3], 1)
    assert [c.scene for c in kept] == ["scene-0001"] and "first" in note


def test_eval_cli_probe_and_finetune(slidr_shards, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "2",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    probe = CliRunner().invoke(main, ["eval", "slidr", "--checkpoint", str(out / "latest.pt"), "--shards",
                                      str(slidr_shards), "--epochs", "3"])
    assert probe.exit_code == 0, probe.output
    assert "linear probing" in probe.output and "official nuScenes train / val" in probe.output
    assert "linear probe mIoU distilled" in probe.output and "vegetation" in probe.output
    assert "over the classes present" in probe.output
    ft = CliRunner().invoke(main, ["eval", "slidr", "--checkpoint", str(out / "latest.pt"), "--shards",
                                   str(slidr_shards), "--finetune", "1", "--epochs", "1"])
    assert ft.exit_code == 0, ft.output
    assert "fine-tuning on 1%" in ft.output and "1% fine-tune mIoU    random" in ft.output


def test_paper_size_needs_the_papers_teacher_or_an_explicit_random_one(slidr_shards, tmp_path):
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--size", "paper",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--random-teacher" in r.output and "MoCo v2" in r.output
    config = SlidrTrainer.resolve_config({"size": "paper", "random_teacher": True})
    assert config["random_teacher"] and "MoCo v2" in PAPER_TEACHER_MESSAGE
    both = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--max-steps", "2",
                                     "--epochs", "1", "--out", str(tmp_path)])
    assert both.exit_code == 2 and "max_steps or epochs" in both.output


def test_epochs_follow_the_training_split(slidr_shards, tmp_path):
    n_pretrain = count_split_samples(slidr_shards, "pretrain")
    n_all = count_split_samples(slidr_shards, "all")
    index = json.loads((slidr_shards / "index.json").read_text())
    assert n_all == index["counts"]["written"] and 0 < n_pretrain < n_all
    steps, per_epoch, batch = resolve_schedule("paper", None, None, None, slidr_shards, "pretrain")
    assert batch == 4 and per_epoch == n_pretrain // 4 and steps == 50 * per_epoch  # the paper: 50 epochs
    steps, per_epoch, batch = resolve_schedule("small", None, 2, None, slidr_shards, "pretrain")
    assert (steps, per_epoch, batch) == (2 * (n_pretrain // 2), n_pretrain // 2, 2)
    r = CliRunner().invoke(main, ["train", "slidr", "--shards", str(slidr_shards), "--epochs", "2",
                                  "--out", str(tmp_path / "e"), "--log-every", "1"])
    assert r.exit_code == 0, r.output
    assert f"step={steps} " in r.output
    lrs = [e["lr"] for e in map(json.loads, (tmp_path / "e" / "log.jsonl").read_text().splitlines()) if "lr" in e]
    assert len(lrs) == steps
