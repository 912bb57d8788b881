"""The README's main job: `distillkit demo` end to end on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from distillkit.pipelines.cli import main
from distillkit.pipelines.shards import load_index


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--steps", "4"])
    assert result.exit_code == 0, result.output
    index = load_index(out / "shards" / "slidr")
    assert index["counts"]["written"] == index["counts"]["planned"] > 0
    assert "0 faults" in result.output
    picture = np.asarray(Image.open(out / "slidr-sample.png").convert("RGB"))
    assert picture.shape[0] > 300 and picture.shape[1] > 600 and picture.std() > 20
    assert (out / "runs" / "slidr" / "latest.pt").is_file()
    curves = np.asarray(Image.open(out / "runs" / "slidr" / "curves.png").convert("RGB"))
    assert curves.shape[1] > 600 and curves.std() > 5  # the loss/lr/throughput picture of the run
    assert "linear probe mIoU distilled" in result.output and "linear probe mIoU    random" in result.output
    # every registered pipeline with a demo ran too: shards, a picture, a trained checkpoint and its evaluation
    from distillkit.pipelines.registry import PIPELINES

    names = [n for n in PIPELINES.names() if PIPELINES.get(n).demo is not None]
    assert {"slidr", "comodo", "audio", "uniseg"} <= set(names)
    for name in names:
        assert f"== {name}" in result.output
        assert load_index(out / "shards" / name)["counts"]["written"] > 0, name
        assert np.asarray(Image.open(out / f"{name}-sample.png").convert("L")).std() > 5, name
        assert (out / "runs" / name / "latest.pt").is_file(), name
    assert "balanced accuracy" in result.output  # the clip-level probes' tables (comodo, audio)


def test_stats_and_show_cli(slidr_shards, tmp_path):
    stats = CliRunner().invoke(main, ["stats", str(slidr_shards)])
    assert stats.exit_code == 0 and "rejected: 0" in stats.output and "superpixels_per_image" in stats.output
    key = load_index(slidr_shards)["shards"][0]["last_key"]
    png = tmp_path / "s.png"
    shown = CliRunner().invoke(main, ["show", str(slidr_shards), "--key", key, "--out", str(png)])
    assert shown.exit_code == 0 and key in shown.output
    assert Image.open(png).size[0] > 600
    missing = CliRunner().invoke(main, ["show", str(slidr_shards), "--key", "nope", "--out", str(png)])
    assert missing.exit_code == 2 and "no sample 'nope'" in missing.output
