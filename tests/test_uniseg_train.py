"""The uniseg trainer: views and region masks, region pooling, the QuerySD step, resume, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillkit.sensors.synth.images import make_images
from distillkit.train.uniseg import UnisegTrainer, build_method, crop_weights, pool_regions, teacher_weights
from distillkit.train.uniseg_data import ViewConfig, collate, make_example, region_masks


def test_region_masks_dedupe_and_resample():
    levels = np.full((3, 4, 6), -1, np.int32)
    levels[0, :, :3], levels[0, :, 3:] = 0, 1
    levels[1] = levels[0]  # same regions again: kept once
    levels[2, :, :] = 0
    masks, valid = region_masks(levels, 8, 5, np.random.default_rng(0))
    assert valid.tolist() == [True, True, True, False, False]
    assert masks[0, :, :4].all() and not masks[0, :, 4:].any()  # left half of the image
    assert masks[2].all()
    masks, valid = region_masks(levels, 8, 2, np.random.default_rng(0))
    assert valid.all() and masks.shape == (2, 8, 8)


def test_crop_weights_follow_the_box():
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :, :8] = 1  # left half
    masks[0, 1, :8, :] = 1  # top half
    full = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    torch.testing.assert_close(crop_weights(masks, full, (4, 4))[:, 0], teacher_weights(masks, (4, 4)))
    flipped = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])  # x0 > x1: mirrored
    w = crop_weights(masks, flipped, (4, 4))[0, 0, 0].reshape(4, 4)
    assert w[:, 2:].min() > 0.99 and w[:, :2].max() < 0.01
    top_left = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    w = crop_weights(masks, top_left, (2, 2))[0, 0]
    assert torch.allclose(w, torch.ones_like(w))  # the crop lies inside both regions


def test_pool_regions():
    tok = torch.arange(12.0).reshape(1, 4, 3)
    w = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    pooled, cover = pool_regions(tok, w)
    torch.testing.assert_close(pooled[0, 0], tok[0, :2].mean(0))
    assert cover.tolist() == [[2.0, 0.0]]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    import cv2

    root = make_images(tmp_path_factory.mktemp("imgs"), seed=2)
    from distillkit.preprocess.patch_features import StatsBackbone, grid_for, resize_to_grid
    from distillkit.preprocess.uniap import uniap

    bb, cfg, items = StatsBackbone(8), ViewConfig(), []
    for i, p in enumerate(sorted(root.glob("images/scene_000[0-3].jpg"))):
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        feats = bb([resize_to_grid(rgb, grid_for(*rgb.shape[:2], 8, 128), 8)])[0]
        items.append(make_example(rgb, uniap(feats), cfg, np.random.default_rng(i)))
    return collate(items)


def test_example_shapes(batch):
    B = batch["global"].shape[0]
    assert batch["global"].shape == (B, 3, 64, 64) and batch["local"].shape == (B, 2, 3, 32, 32)
    assert batch["masks"].shape == (B, 32, 32, 32) and batch["valid"].any(1).all()
    b = batch["boxes"]
    assert ((b >= 0) & (b <= 1)).all() and (b[..., 2] > b[..., 0]).all()


def test_querysd_step_trains_student_only_and_teacher_follows(batch):
    config = UnisegTrainer.resolve_config({"token_weight": 0.5})
    torch.manual_seed(0)
    m = build_method(config, total_steps=10).train()
    t0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    loss = m.loss(batch)
    assert torch.isfinite(loss) and m.last_pairs > 0
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert float(m.loss_fn.center.abs().sum()) > 0  # the centre moved
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.01)
    with torch.no_grad():
        m.after_step(1, 10)  # what train.loop calls after the optimiser step: momentum 0.99 at step 0
    moved = m.teacher.backbone.cls_token - t0["backbone.cls_token"]
    torch.testing.assert_close(moved, torch.full_like(moved, 0.01 * (1 - 0.99)), rtol=1e-3, atol=1e-7)
    m.loss(batch)
    assert int(m.step) == 2


def test_bad_config_is_refused():
    from distillkit.train.base import ConfigError

    with pytest.raises(ConfigError, match="local_scale"):
        UnisegTrainer.resolve_config({"local_scale": [0.5, 0.1]})


def test_trainer_checkpoint_is_a_pipeline_backbone(tmp_path):
    """The EMA teacher of a uniseg checkpoint loads as the pipeline's ViT backbone (the third backbone)."""
    from distillkit.preprocess.patch_features import ViTBackbone

    config = UnisegTrainer.resolve_config({})
    m = build_method(config, total_steps=10)
    with torch.no_grad():
        m.teacher.backbone.cls_token.fill_(0.5)
    torch.save({"model": m.state_dict(), "step": 0, "config": config}, tmp_path / "latest.pt")
    bb = ViTBackbone(tmp_path / "latest.pt", feature="feat")
    assert bb.patch == 8 and bb.model.num_heads == 3
    torch.testing.assert_close(bb.model.cls_token, m.teacher.backbone.cls_token)
    rgb = np.zeros((24, 40, 3), np.uint8)
    assert bb([rgb])[0].shape == (3, 5, 96)


def test_init_checkpoint_starts_student_teacher_and_baseline(tmp_path):
    """``init_checkpoint`` (a DINO backbone, as the paper starts from): student and teacher begin with its
    weights and architecture, and the evaluation's baseline is it rather than a random initialisation."""
    from distillkit.preprocess.vit import vit
    from distillkit.train.uniseg import initial_backbone

    torch.manual_seed(5)
    dino = vit("small", patch=16)  # not the small size's tiny ViT/8: the checkpoint decides
    torch.save(dino.state_dict(), tmp_path / "dino.pth")
    config = UnisegTrainer.resolve_config({"init_checkpoint": str(tmp_path / "dino.pth")})
    m = build_method(config, total_steps=10)
    for branch in (m.student, m.teacher):
        assert branch.backbone.patch == (16, 16) and branch.backbone.embed_dim == 384
        torch.testing.assert_close(branch.backbone.pos_embed, dino.pos_embed)
    torch.testing.assert_close(initial_backbone(config).blocks[3].attn.qkv.weight, dino.blocks[3].attn.qkv.weight)
    plain = build_method(UnisegTrainer.resolve_config({}), total_steps=10)
    assert plain.student.backbone.embed_dim != 384


@pytest.mark.parametrize("weights", [{"pixel_weight": 1.0, "token_weight": 0.0}, {"pixel_weight": 0.5}])
def test_querysd_step_with_the_released_pixel_loss(batch, weights):
    torch.manual_seed(0)
    m = build_method(UnisegTrainer.resolve_config(weights), total_steps=10).train()
    m.log_every = 1
    loss = m.loss(batch)
    assert torch.isfinite(loss) and float(m._pixel_entropy) > 0
    loss.backward()
    # the pixel term reaches the student's backbone through head(query) (queries pooled from its tokens)
    assert m.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    m0 = build_method(UnisegTrainer.resolve_config({**weights, "pixel_weight": 0.0}), total_steps=10).train()
    m0.load_state_dict(m.state_dict())
    m0.loss_fn.center.zero_()
    m.loss_fn.center.zero_()
    assert float(m.loss(batch).detach()) != pytest.approx(float(m0.loss(batch).detach()))  # the option counts


def test_dense_weight_is_read_as_token_weight_and_conflicts_are_refused(caplog):
    from distillkit.train.base import ConfigError

    config = UnisegTrainer.resolve_config({"dense_weight": 0.25})
    assert config["token_weight"] == 0.25 and config["dense_weight"] is None
    assert "old name of token_weight" in caplog.text
    with pytest.raises(ConfigError, match="old name of token_weight"):
        UnisegTrainer.resolve_config({"dense_weight": 0.25, "token_weight": 0.5})


@pytest.mark.parametrize("size", ["small", "paper"])
def test_effective_config_fills_the_size_and_says_where_from(size):
    from distillkit.train.uniseg import SIZES

    config = UnisegTrainer.resolve_config({"size": size})
    eff = UnisegTrainer.effective_config(config)
    s = SIZES[size]
    assert (eff["batch_size"], eff["max_steps"], eff["lr"], eff["momentum"]) == (
        s.batch_size, s.max_steps, s.loop["lr"], s.momentum)
    assert eff["sync_batchnorm"] is False and "dense_weight" not in eff
    assert not [k for k, v in eff.items() if v is None and k != "init_checkpoint"]
    # the filled configuration is accepted again and trains the same run
    assert UnisegTrainer.effective_config(UnisegTrainer.resolve_config(eff)) == eff
    sources = UnisegTrainer.config_sources(config)
    assert set(sources) <= set(eff)
    assert "S2UniSeg.py:443" in sources["lr"] and "S2UniSeg.py:318" in sources["sync_batchnorm"]
