"""nuScenes splits: the names and lists, ``source.split`` / ``source.scenes`` in the slidr plan, the
``meta.json`` field every sample carries, and the SLidR trainer's scene filter."""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.splits import create_splits_scenes

from distillkit.pipelines.cli import main
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.shards import iter_samples, load_index
from distillkit.pipelines.slidr import SlidrPipeline
from distillkit.sensors.nuscenes_splits import (
    DEVKIT_SPLITS,
    SLIDR_HELDOUT,
    SPLIT_NAMES,
    UnknownSplit,
    split_scenes,
)
from distillkit.sensors.synth.nuscenes import SCENE_NAMES, SIZES
from tests.index_helpers import rewrite_shard

from .conftest import DEMO_MANIFEST, ROOT, slidr_manifest

PRETRAIN = {"scene-0061", "scene-0655"}  # of the synthetic small dataset's four scenes
HELDOUT = {"scene-1094"}
VAL = {"scene-0103"}


# ---- the split lists ---------------------------------------------------------------------------
def test_split_names_are_the_devkits_plus_ours():
    devkit = create_splits_scenes()
    assert DEVKIT_SPLITS == tuple(devkit), "nuscenes-devkit's splits changed: update DEVKIT_SPLITS"
    for name in DEVKIT_SPLITS:
        assert split_scenes(name) == frozenset(devkit[name])
    assert split_scenes("all") is None
    with pytest.raises(UnknownSplit, match="unknown split 'trian'.*mini_val.*pretrain.*all"):
        split_scenes("trian")


def test_pretrain_is_train_minus_slidrs_100():
    train = set(create_splits_scenes()["train"])
    held = set(SLIDR_HELDOUT)
    assert len(SLIDR_HELDOUT) == len(held) == 100 and held <= train  # SLidR: all 100 are train scenes
    pretrain = split_scenes("pretrain")
    assert len(pretrain) == 600 and pretrain == train - held and not pretrain & held
    assert split_scenes("pretrain_val") == held


@pytest.mark.parametrize("size", list(SIZES))
def test_synthetic_scenes_exercise_the_splits(size):
    names = set(SCENE_NAMES[: SIZES[size].n_scenes])
    pretrain, held, val = split_scenes("pretrain"), split_scenes("pretrain_val"), split_scenes("val")
    assert names & pretrain & split_scenes("mini_train"), "a pretrain scene that is in mini_train"
    assert names & held & split_scenes("train"), "one of SLidR's held-out train scenes"
    assert names & val & split_scenes("mini_val"), "a val scene that is in mini_val"


# ---- the plan ----------------------------------------------------------------------------------
def _planned_scenes(dataroot: Path, tmp: Path, *extra: str) -> set[str]:
    refs, _ = SlidrPipeline().plan(slidr_manifest(dataroot, tmp / "out", *extra))
    return {r.payload["scene"] for r in refs}


@pytest.mark.parametrize("split,expected", [
    ("all", PRETRAIN | HELDOUT | VAL),
    ("pretrain", PRETRAIN),
    ("pretrain_val", HELDOUT),
    ("train", PRETRAIN | HELDOUT),
    ("val", VAL),
    ("mini_train", PRETRAIN | HELDOUT),
    ("mini_val", VAL),
])
def test_split_selects_scenes(synth_nuscenes, tmp_path, split, expected):
    assert _planned_scenes(synth_nuscenes, tmp_path, f"source.split={split!r}") == expected


def test_scenes_must_lie_in_the_split(synth_nuscenes, tmp_path):
    assert _planned_scenes(synth_nuscenes, tmp_path, "source.split='pretrain'",
                           "source.scenes=['scene-0655']") == {"scene-0655"}
    assert _planned_scenes(synth_nuscenes, tmp_path, "source.scenes=['scene-0103']") == {"scene-0103"}  # "all"
    with pytest.raises(ManifestError, match=r"source\.scenes: not in split 'pretrain': scene-0103 \(set source"):
        _planned_scenes(synth_nuscenes, tmp_path, "source.split='pretrain'",
                        "source.scenes=['scene-0061', 'scene-0103']")
    with pytest.raises(ManifestError, match="source.split: none of the dataset's 4 scenes is in split 'test'"):
        _planned_scenes(synth_nuscenes, tmp_path, "source.split='test'")


def test_unknown_split_is_a_one_line_manifest_error(synth_nuscenes, tmp_path):
    r = CliRunner().invoke(main, ["build", str(DEMO_MANIFEST), "--set", "source.split=trian", "--set",
                                  f"source.dataroot={synth_nuscenes}", "--set", f"output.dir={tmp_path}/o"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "source.split" in lines[0] and "'trian'" in lines[0]
    assert all(f"'{name}'" in lines[0] for name in SPLIT_NAMES)


def test_packaged_manifests_choose_their_split():
    def split(name: str) -> str:
        return tomllib.loads((ROOT / "manifests" / name).read_text())["source"]["split"]

    # one build serves both: the trainer keeps the pretrain scenes, the probe needs train and val (decisions.md)
    assert split("slidr-nuscenes.toml") == "all" and split("demo-slidr.toml") == "all"


# ---- meta.json -------------------------------------------------------------------------------------
def test_every_sample_records_scene_and_lidar_timestamp(slidr_shards, synth_nuscenes):
    nusc = NuScenes(version="v1.0-mini", dataroot=str(synth_nuscenes), verbose=False)
    want = {}
    table = [s["token"] for s in nusc.scene]  # the scene table's order: SLidR's N% subset counts in it
    for sample in nusc.sample:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        scene = nusc.get("scene", sample["scene_token"])["name"]
        want[sample["token"]] = {"scene": scene, "timestamp": lidar["timestamp"],
                                 "scene_index": table.index(sample["scene_token"])}
    index = load_index(slidr_shards)
    urls = [str(slidr_shards / s["file"]) for s in index["shards"]]
    got = {s["__key__"]: s["meta.json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()}  # stock reader
    assert got == want
    assert {m["scene"] for m in got.values()} == set(SCENE_NAMES[: SIZES["small"].n_scenes])


def test_meta_json_is_optional_but_checked(slidr_shards):
    from distillkit.pipelines.codecs import SampleView

    pipeline = SlidrPipeline()
    key, fields = next(iter_samples(slidr_shards / load_index(slidr_shards)["shards"][0]["file"]))
    spec = pipeline.fields(SampleView(fields))["meta.json"]
    assert not spec.required  # shards written before meta.json existed stay valid
    spec.check({"scene": "scene-0061", "timestamp": 1}, SampleView(fields))
    spec.check({"scene": "scene-0061", "timestamp": 1, "scene_index": 0}, SampleView(fields))
    for bad in ({"scene": "", "timestamp": 1}, {"scene": "scene-0061", "timestamp": -1},
                {"scene": "scene-0061", "timestamp": 1.5}, ["scene-0061"],
                {"scene": "scene-0061", "timestamp": 1, "scene_index": -1},
                {"scene": "scene-0061", "timestamp": 1, "scene_index": "3"}):
        with pytest.raises(ValueError):
            spec.check(bad, SampleView(fields))


# ---- the trainer's scene filter -------------------------------------------------------------------
def _scene_of(slidr_shards: Path) -> dict[str, str]:
    urls = [str(slidr_shards / s["file"]) for s in load_index(slidr_shards)["shards"]]
    return {s["__key__"]: json.loads(s["meta.json"])["scene"] for s in wds.WebDataset(urls, shardshuffle=False)}


def _keys(stream) -> list[str]:
    stream.transform = None  # the filter acts before decoding; augmentations only slow the test down
    return [s["__key__"] for s in stream]


def test_trainer_stream_keeps_the_split_and_logs_what_it_skipped(slidr_shards, caplog):
    from distillkit.train.slidr import make_stream

    scene = _scene_of(slidr_shards)
    stream = make_stream(slidr_shards, "small", seed=0, strict=True, epochs=1, split="pretrain")
    with caplog.at_level(logging.INFO, logger="distillkit.train.streaming"):
        kept = _keys(stream)
    assert sorted(kept) == sorted(k for k, s in scene.items() if s in PRETRAIN) and kept
    assert stream.skipped == len(scene) - len(kept) > 0 and stream.bad_samples == 0
    said = f"kept {len(kept)}, skipped {stream.skipped} sample(s) not among the scenes of split 'pretrain'"
    assert said in caplog.text
    everything = make_stream(slidr_shards, "small", seed=0, strict=True, epochs=1)  # make_stream's default: "all"
    assert sorted(_keys(everything)) == sorted(scene) and everything.skipped == 0


def test_samples_without_meta_json_are_kept_with_one_warning(slidr_shards, tmp_path, caplog):
    from distillkit.train.slidr import make_stream

    out = tmp_path / "old"
    shutil.copytree(slidr_shards, out)
    first = out / load_index(out)["shards"][0]["file"]
    samples = list(iter_samples(first))
    for _, fields in samples:
        del fields["meta.json"]  # as written before the field existed
    rewrite_shard(out, first.name, samples)
    scene = _scene_of(slidr_shards)
    old_keys = {k for k, _ in samples}
    stream = make_stream(out, "small", seed=0, strict=True, epochs=1, split="pretrain")
    with caplog.at_level(logging.WARNING, logger="distillkit.train.streaming"):
        kept = set(_keys(stream))
    assert kept == old_keys | {k for k, s in scene.items() if s in PRETRAIN}
    warnings = [r for r in caplog.records if "meta.json" in r.getMessage()]
    assert len(warnings) == 1 and "keeping such samples" in warnings[0].getMessage()


def test_trainer_split_key():
    from distillkit.train.base import ConfigError
    from distillkit.train.slidr import SlidrTrainer

    assert SlidrTrainer.resolve_config({})["split"] == "pretrain"
    assert SlidrTrainer.resolve_config({"split": "all"})["split"] == "all"
    with pytest.raises(ConfigError, match="split.*'pretrain_val'.*got 'nope'"):
        SlidrTrainer.resolve_config({"split": "nope"})
