"""Bad inputs: each broken keyframe is rejected with its reason; the build goes on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from distillkit.pipelines.cli import main
from distillkit.pipelines.runner import build
from distillkit.pipelines.shards import load_index
from distillkit.sensors.nuscenes_reader import load_nuscenes, plan_keyframes

from .conftest import DEMO_MANIFEST, slidr_manifest


def _table(root: Path, name: str) -> list[dict]:
    return json.loads((root / "v1.0-mini" / f"{name}.json").read_text())


def _save(root: Path, name: str, rows: list[dict]) -> None:
    (root / "v1.0-mini" / f"{name}.json").write_text(json.dumps(rows))


def _missing_pcd(root, kf):
    Path(kf.lidar_path).unlink()


def _truncated_pcd(root, kf):
    p = Path(kf.lidar_path)
    p.write_bytes(p.read_bytes()[:-7])


def _bad_jpeg(root, kf):
    Path(kf.cameras[2].path).write_bytes(b"\xff\xd8 this is not a JPEG")


def _missing_calibration(root, kf):
    rows = _table(root, "sample_data")
    for r in rows:
        if r["token"] == kf.cameras[4].sample_data_token:
            r["calibrated_sensor_token"] = "0" * 32  # points at no calibrated_sensor record
    _save(root, "sample_data", rows)


def _missing_camera(root, kf):
    drop = kf.cameras[1].sample_data_token
    _save(root, "sample_data", [r for r in _table(root, "sample_data") if r["token"] != drop])


# (mutation, stage, words in the reason)
CASES = {
    "missing_pcd": (_missing_pcd, "lidar", "No such file"),
    "truncated_pcd": (_truncated_pcd, "lidar", "not a whole number"),
    "unreadable_jpeg": (_bad_jpeg, "image", "CAM_BACK"),
    "missing_calibration": (_missing_calibration, "calibration", "CAM_BACK_LEFT: missing calibrated_sensor"),
    "missing_camera": (_missing_camera, "calibration", "keyframe has no CAM_FRONT_RIGHT"),
}


@pytest.fixture(scope="module")
def broken_build(synth_nuscenes, tmp_path_factory):
    """One dataset with a different fault in each of five keyframes, built once."""
    root = tmp_path_factory.mktemp("broken") / "nuscenes"
    shutil.copytree(synth_nuscenes, root)
    refs, _ = plan_keyframes(load_nuscenes(root, "v1.0-mini"))
    assert len(refs) > len(CASES)
    victims = {}
    for kf, (case, (mutate, _, _)) in zip(refs, CASES.items(), strict=False):
        mutate(root, kf)
        victims[case] = kf.sample_token
    out = root.parent / "shards"
    result = build(slidr_manifest(root, out, "output.max_rejected=1.0"), progress=False)
    return root, out, result, victims, len(refs)


@pytest.mark.parametrize("case", list(CASES))
def test_fault_rejected_with_reason(broken_build, case):
    _, out, result, victims, _ = broken_build
    _, stage, words = CASES[case]
    hits = [r for r in result.rejected if victims[case] in r["source"]]
    assert len(hits) == 1, result.rejected
    assert hits[0]["stage"] == stage and words in hits[0]["reason"], hits[0]
    index = load_index(out)
    assert hits[0] in index["rejected"]


def test_rest_of_build_goes_on(broken_build):
    _, out, result, victims, planned = broken_build
    index = load_index(out)
    assert index["counts"] == {"planned": planned, "written": planned - len(CASES), "rejected": len(CASES)}
    written = {k for s in index["shards"] for k in (s["first_key"], s["last_key"]) if k}
    assert not written & set(victims.values())


def test_exit_code_follows_max_rejected(broken_build):
    root, out, _, _, planned = broken_build
    base = ["build", str(DEMO_MANIFEST), "--quiet", "--workers", "1", "--set", f"source.dataroot={root}",
            "--set", f"output.dir={out}"]
    rate = len(CASES) / planned  # the thresholds bracket it, whatever the synthetic dataset's size
    strict = CliRunner().invoke(main, [*base, "--set", f"output.max_rejected={rate / 2:.4f}"])
    assert strict.exit_code == 1, strict.output
    # one line, in the ratio's own unit (keyframes on both sides), with the value that would pass
    said = [line for line in strict.output.splitlines() if line.startswith("error:")]
    assert len(said) == 1, strict.output
    assert said[0].startswith(f"error: {len(CASES)} of {planned} keyframes rejected ({rate:.1%}) > "
                              f"output.max_rejected {float(f'{rate / 2:.4f}'):.1%} of keyframes"), said[0]
    suggested = re.search(r"--set output\.max_rejected=([0-9.]+)$", said[0])
    assert suggested and rate <= float(suggested[1]) < rate + 0.01, said[0]
    lenient = CliRunner().invoke(main, [*base, "--set", f"output.max_rejected={suggested[1]}"])
    assert lenient.exit_code == 0, lenient.output
    assert f"from {planned} inputs" in lenient.output and f"{len(CASES)} rejected" in lenient.output


def test_max_rejected_message_counts_windows_and_says_whole_recordings():
    from distillkit.pipelines.runner import BuildResult

    def result(written: int, rejected: int, whole: int) -> BuildResult:
        return BuildResult(Path("shards/comodo/index.json"), 3, written, [{}] * rejected, 0, 3,
                           units=("windows", "recordings"), whole_inputs=whole)

    assert result(5, 1, 0).over_limit(0.2) is None  # 1 of 6 is within 20%
    said = result(5, 1, 0).over_limit(0.05)
    assert said is not None and said.startswith("1 of 6 windows rejected (16.7%) > output.max_rejected 5.0% of "
                                                "windows;") and said.endswith("--set output.max_rejected=0.17")
    # a recording rejected whole counts as one window in the ratio: the message says so
    said = result(5, 3, 2).over_limit(0.05)
    assert said is not None and said.startswith("3 of 8 windows rejected (37.5%; 2 of them recordings rejected "
                                                "whole, each counted as one) > output.max_rejected 5.0%"), said
    assert said.endswith("--set output.max_rejected=0.38")


def test_missing_tables_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["build", str(DEMO_MANIFEST), "--set", f"source.dataroot={tmp_path}/empty",
                                       "--set", f"output.dir={tmp_path}/out"])
    assert result.exit_code == 2 and "no nuScenes tables" in result.output
