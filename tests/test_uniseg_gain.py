"""The uniseg trainer learns: on a fixed seed, the distilled teacher's patch features beat the same ViT at
random init in the semantic-segmentation linear probe (docs/uniseg.md, "the measured gain").

Medium synthetic images (200, so the probe's test half holds 100 images: on the 32 small ones the
split alone moves the probe by about 0.02 mIoU). Measured with these settings: 0.633 against 0.601
(+0.031); the margin asked here is half of that. After 1000 steps the gain was +0.008 (seed 0)
and +0.011 (seed 1): it grows with training.
"""

from __future__ import annotations

import pytest

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.runner import build
from distillkit.sensors.synth.images import make_images
from distillkit.train.uniseg import UnisegTrainer


@pytest.mark.slow
def test_distilled_features_beat_random_init(tmp_path):
    data = make_images(tmp_path / "data", seed=0, size="medium")
    shards = tmp_path / "shards"
    build(load_manifest("demo-uniseg", [f"source.root={data}", f"output.dir={shards}", "cluster.scheduler=serial",
                                        "output.samples_per_shard=32"]), progress=False)
    trainer = UnisegTrainer()
    config = trainer.resolve_config({"max_steps": 2000, "log_every": 500, "seed": 0})
    metrics = trainer.train(shards, tmp_path / "run", config, device="cpu")
    result = trainer.evaluate(tmp_path / "run" / "latest.pt", [shards], config,
                              options=trainer.resolve_eval_options({}))
    assert metrics["step"] == 2000 and metrics["bad_samples"] == 0
    assert result["miou_distilled"] > result["miou_random"] + 0.015, trainer.format_eval(result)
