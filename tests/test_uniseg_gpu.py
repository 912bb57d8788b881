"""CUDA checks of the uniseg pipeline and trainer (skipped without a GPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distillkit.preprocess.uniap import UniAPConfig, uniap, uniap_batch


@pytest.mark.gpu
def test_uniap_cuda_partitions_equal_scipy():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(int(rng.integers(4, 40)), int(rng.integers(4, 40)), 64)) + rng.normal(size=64)
             for _ in range(16)]
    for cfg in (UniAPConfig(), UniAPConfig(semantic=True, update="softmax", spatial_weight=0.4)):
        for f, got in zip(feats, uniap_batch(feats, cfg, device="cuda"), strict=True):
            np.testing.assert_array_equal(got, uniap(f, cfg.thresholds, cfg.min_size, cfg.spatial_weight,
                                                     cfg.update, cfg.semantic))


@pytest.mark.gpu
def test_train_uniseg_on_cuda_bf16(tmp_path):
    from distillkit.pipelines.demo import demo_manifest, make_demo_data
    from distillkit.pipelines.registry import PIPELINES
    from distillkit.pipelines.runner import build
    from distillkit.train.uniseg import UnisegTrainer

    p = PIPELINES.get("uniseg")
    data = make_demo_data(p, tmp_path / "data")
    build(demo_manifest(p, data, tmp_path / "shards", "cluster.scheduler=serial",
                        'stages.uniap.backend="torch"', 'stages.features.device="cuda"'), progress=False)
    t = UnisegTrainer()
    config = t.resolve_config({"max_steps": 3, "log_every": 1, "token_weight": 0.5})
    m = t.train(tmp_path / "shards", tmp_path / "run", config, device="cuda")
    assert m["step"] == 3 and math.isfinite(m["loss"])
