"""COMODO pipeline: the released uid subset (``source.uids_file``), the released train/val/test split files
(``source.splits_dir``), the scenario labels they carry, and ``output.max_rejected`` counting a recording rejected
whole as the windows it would have given (issue 21 items 3 and 7)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.comodo import ComodoPipeline
from distillkit.pipelines.manifest import ManifestError
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import iter_samples, load_index
from distillkit.sensors.synth.ego import make_ego, split_of
from distillkit.train.streaming import shard_files


@pytest.fixture(scope="module")
def ego(tmp_path_factory) -> Path:
    return make_ego(tmp_path_factory.mktemp("ego") / "v2", seed=3, size="small")


def _manifest(root: Path, out: Path, *extra: str):
    return load_manifest("demo-comodo", [f"source.root={root}", f"output.dir={out}", "cluster.scheduler=serial",
                                         "stages.teacher.enabled=false", "stages.frames.size=32", *extra])


def _split_files(root: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for name in ("train", "val", "test"):
        for line in (root / "splits" / f"{name}.txt").read_text().splitlines():
            uid, scenario = line.split("\t")
            out[uid] = (name, scenario)
    return out


def test_synth_writes_the_released_formats(ego):
    uids = (ego / "ego4d_subset_ids.txt").read_text().splitlines()
    truth = json.loads((ego / "synth_truth.json").read_text())
    assert sorted(uids) == sorted(truth) and len(set(uids)) == len(uids)
    splits = _split_files(ego)
    assert sorted(splits) == sorted(uids), "every recording in exactly one split file"
    assert Counter(s for s, _ in splits.values()) == Counter({"train": 1, "val": 1, "test": 1})
    labels = (ego / "labels.csv").read_text()
    assert all(f",{scenario}" in labels for _, scenario in splits.values())
    assert Counter(split_of(12, 0)) == Counter({"train": 9, "test": 2, "val": 1})  # the demo: ~70/10/20%


@pytest.fixture(scope="module")
def subset_build(ego, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A copy of ``ego`` with one recording left off the list, two listed uids without files (one has its IMU
    only), and a recording under the root in no split file; built with the list, the splits and scenario labels."""
    root = tmp_path_factory.mktemp("subset") / "v2"
    shutil.copytree(ego, root)
    uids = sorted(json.loads((ego / "synth_truth.json").read_text()))
    splits = _split_files(ego)
    unlisted = uids[0]
    imu_only = "imu-only-uid"
    shutil.copy(root / "imu" / f"{uids[1]}.csv", root / "imu" / f"{imu_only}.csv")
    # a listed recording in no split file: its video and IMU are copies under a new uid
    nosplit = "no-split-uid"
    shutil.copy(root / "imu" / f"{uids[1]}.csv", root / "imu" / f"{nosplit}.csv")
    shutil.copy(root / "full_scale" / f"{uids[1]}.mp4", root / "full_scale" / f"{nosplit}.mp4")
    (root / "subset.txt").write_text("\n".join([*uids[1:], "ghost-uid", imu_only, nosplit]))  # no final newline
    out = root.parent / "shards"
    result = build(_manifest(root, out, "source.uids_file=subset.txt", "source.splits_dir=splits",
                             "source.label_from=scenario", "output.max_rejected=1.0"), progress=False)
    return out, root, {"result": result, "splits": splits, "unlisted": unlisted, "uids": uids}


def test_uids_file_keeps_the_listed_and_counts_the_missing(subset_build):
    out, _, info = subset_build
    index = load_index(out)
    stats = index["stats"]
    assert stats["uids_listed"] == len(info["uids"]) - 1 + 3
    assert stats["uids_listed_without_video"] == 2  # ghost-uid and imu-only-uid
    assert stats["uids_listed_without_imu"] == 1  # ghost-uid
    assert stats["recordings_not_listed"] == 1
    # neither the unlisted recording nor the listed uids without files are rejections (or windows)
    assert not any(w in r["source"] for r in index["rejected"]
                   for w in (info["unlisted"], "ghost-uid", "imu-only-uid", "no-split-uid"))
    seen = {json.loads(s["times.json"])["uid"] for p in shard_files(out) for _, s in iter_samples(p)}
    assert seen == set(info["uids"][1:])


def test_each_window_carries_its_split_and_scenario_label(subset_build):
    out, _, info = subset_build
    stats = load_index(out)["stats"]
    assert stats["recordings_in_no_split"] == 1  # no-split-uid: left out, counted
    assert stats["split_uids_without_recording"] == 0  # the unlisted uid is not "without recording"
    per_split: Counter = Counter()
    for path in shard_files(out):
        for _, s in iter_samples(path):
            times = json.loads(s["times.json"])
            split, scenario = info["splits"][times["uid"]]
            assert (times["split"], times["scenario"]) == (split, scenario)
            assert bytes(s["label.txt"]).decode() == scenario
            per_split[split] += 1
    assert {k: stats[f"windows_split_{k}"] for k in ("train", "val", "test")} == {
        k: float(per_split[k]) for k in ("train", "val", "test")}
    assert sum(per_split.values()) == stats["samples"] and per_split[info["splits"][info["unlisted"]][0]] == 0


def test_without_the_new_keys_the_windows_are_as_before(ego, tmp_path):
    """No uids_file / splits_dir: every recording, no split in times.json, labels from labels.csv."""
    m = _manifest(ego, tmp_path / "out")
    refs, rejected = ComodoPipeline().plan(m)
    assert len(refs) == 3 and not rejected and all("split" not in r.payload for r in refs)


def _write_splits(root: Path, lines: dict[str, list[str]]) -> None:
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        (root / "splits" / f"{name}.txt").write_text("".join(f"{x}\n" for x in lines.get(name, [])))


def test_split_file_errors_are_one_line(ego, tmp_path):
    root = tmp_path / "v2"
    shutil.copytree(ego, root)
    uids = sorted(json.loads((ego / "synth_truth.json").read_text()))
    _write_splits(root, {"train": [f"{uids[0]}\twalking", f"{uids[1]}\twalking"], "test": [f"{uids[1]}\tstill"]})
    with pytest.raises(ManifestError, match=r"test\.txt: line 1: uid .* is already in train\.txt line 2") as exc:
        ComodoPipeline().plan(_manifest(root, tmp_path / "o", "source.splits_dir=splits"))
    assert "\n" not in str(exc.value)
    (root / "splits" / "val.txt").unlink()
    with pytest.raises(ManifestError, match=r"val\.txt does not exist"):
        ComodoPipeline().plan(_manifest(root, tmp_path / "o", "source.splits_dir=splits"))
    _write_splits(root, {"train": [uids[0]], "test": [f"{uids[1]}\tstill"]})
    with pytest.raises(ManifestError, match=r"source\.label_from: 'scenario' needs"):
        ComodoPipeline().plan(_manifest(root, tmp_path / "o", "source.splits_dir=splits",
                                        "source.label_from=scenario"))
    with pytest.raises(ManifestError, match=r"source\.label_from: 'scenario' takes the label from the split files"):
        ComodoPipeline().check_manifest(_manifest(root, tmp_path / "o", "source.label_from=scenario"))
    with pytest.raises(ManifestError, match=r"source\.uids_file: .*nothere\.txt does not exist"):
        ComodoPipeline().plan(_manifest(root, tmp_path / "o", "source.uids_file=nothere.txt"))
    # a uid in no split file is left out of the plan (and counted), the others keep their split
    pipeline = ComodoPipeline()
    refs, _ = pipeline.plan(_manifest(root, tmp_path / "o", "source.splits_dir=splits"))
    assert [r.payload["split"] for r in refs] == ["train", "test"] and pipeline._plan_counts[
        "recordings_in_no_split"] == 1


def test_a_recording_rejected_whole_counts_as_its_windows(ego, tmp_path):
    """The planted case: one of three recordings rejected (a third of the windows) fails a 5% guard; counted as
    one entry it read 1/22 = 4.5% and passed."""
    root = tmp_path / "v2"
    shutil.copytree(ego, root)
    truth = json.loads((ego / "synth_truth.json").read_text())
    broken = next(u for u, t in truth.items() if t["kind"] == "cfr")
    (root / "imu" / f"{broken}.csv").write_text("canonical_timestamp_ms,accl_x\n1,2\n")
    m = _manifest(root, tmp_path / "out", "output.max_rejected=0.05")
    result = build(m, progress=False)
    whole = [r for r in result.rejected if r["source"].endswith("@whole")]
    assert len(whole) == 1 and "missing IMU column" in whole[0]["reason"], result.rejected
    for_broken = [r for r in result.rejected if broken in r["source"]]
    # as many as the intact recording gives (written or rejected) in the same build of the untouched data
    intact = build(_manifest(ego, tmp_path / "intact", "output.max_rejected=1.0"), progress=False)
    given = [k for p in shard_files(tmp_path / "intact") for k, _ in iter_samples(p) if k.startswith(broken)]
    given += [r for r in intact.rejected if broken in r["source"]]
    assert len(for_broken) == len(given) >= 10, (len(for_broken), len(given))  # ~12 s, 2 s windows every 1 s
    expected = len(given)
    assert {r["source"] for r in for_broken} - {whole[0]["source"]} == {
        f"{broken}_{k:06d}" for k in range(1, expected)}
    assert result.whole_inputs == 0, "counted in windows, not as one input each"
    assert result.rejected_fraction > 0.3  # a third of the windows, plus the vfr recording's gap windows
    said = result.over_limit(0.05)
    assert said is not None and said.startswith(f"{len(result.rejected)} of {result.written + len(result.rejected)}"
                                                " windows rejected")
