"""SLidR's DINO ViT /8 teacher (the release's vit_small_p8 / vit_base_p8 option): DINO's checkpoint key
layout loads strictly and gives stride-8 features that SLidR's decoder brings to the crop size."""

from __future__ import annotations

import pytest
import torch

from distillkit.train.models.vit_teacher import build_vit_teacher
from distillkit.train.slidr import SIZES, build_method


def dino_state_dict(dim: int = 96, depth: int = 2, patch: int = 8, grid: int = 28, hidden: int = 384,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """Random tensors under the names facebookresearch/dino vision_transformer.py gives a ViT with
    num_classes=0 (no head), as in dino_deitsmall8_pretrain.pth; ``grid`` x ``grid`` position table + CLS."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, grid * grid + 1, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
                   b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
                   b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim)})
    return {prefix + k: v for k, v in sd.items()}


def test_dino_checkpoint_loads_strictly_and_gives_stride_8_features(tmp_path):
    sd = dino_state_dict()
    path = tmp_path / "dino_tiny8.pth"
    torch.save(sd, path)
    teacher = build_vit_teacher("dino_vits8", "small", path)
    loaded = teacher.net.state_dict()
    assert set(loaded) == set(sd)  # every key of DINO's layout, nothing more
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    h, w = SIZES["small"].crop
    feats = teacher(torch.rand(2, 3, h, w))
    assert feats.shape == (2, 96, h // 8, w // 8)
    assert not any(p.requires_grad for p in teacher.parameters())

    # a DINO training checkpoint ({"teacher": {"backbone.*", "head.*"}}) gives the same network
    torch.save({"teacher": {**dino_state_dict(prefix="backbone."), "head.last_layer.weight": torch.zeros(2, 96)}},
               tmp_path / "train.pth")
    again = build_vit_teacher("dino_vits8", "small", tmp_path / "train.pth")
    assert torch.equal(again(torch.ones(1, 3, 16, 16)), teacher(torch.ones(1, 3, 16, 16)))


def test_slidr_upsamples_vit_features_to_the_crop(tmp_path):
    torch.save(dino_state_dict(), tmp_path / "dino.pth")
    method = build_method("small", 0, tmp_path / "dino.pth", teacher="dino_vitb8")
    h, w = SIZES["small"].crop
    f = method.image_features(torch.rand(1, 3, h, w))
    assert f.shape == (1, 64, h, w)
    assert torch.allclose(f.norm(dim=1), torch.ones(1, h, w), atol=1e-5)


def test_wrong_vit_checkpoints_are_refused(tmp_path):
    torch.save(dino_state_dict(patch=16, grid=14), tmp_path / "p16.pth")
    with pytest.raises(ValueError, match="patch"):
        build_vit_teacher("dino_vits8", "small", tmp_path / "p16.pth")
    torch.save(dino_state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="384 wide|wide"):
        build_vit_teacher("dino_vits8", "paper", tmp_path / "tiny.pth")
    bad = dino_state_dict()
    bad["blocks.0.attn.extra"] = torch.zeros(1)  # strict loading: an unknown key is an error
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="Unexpected"):
        build_vit_teacher("dino_vits8", "small", tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="teacher"):
        build_method("small", 0, None, teacher="dino_vits16")
    with pytest.raises(ValueError, match="multiple"):
        build_vit_teacher("dino_vits8", "small")(torch.rand(1, 3, 20, 16))


def test_train_main_runs_with_a_dino_teacher(tmp_path):
    from distillkit.train.slidr import train_main
    from tests.test_train_streaming import fake_slidr_sample, write_shards

    torch.save(dino_state_dict(), tmp_path / "dino.pth")
    shards = write_shards(tmp_path / "shards", [2], make=fake_slidr_sample)
    m = train_main(shards, tmp_path / "out", max_steps=2, log_every=1, teacher="dino_vits8",
                   teacher_checkpoint=tmp_path / "dino.pth")
    assert m["step"] == 2 and torch.isfinite(torch.tensor(m["loss"]))


def test_a_moco_file_for_a_dino_teacher_is_refused_in_one_line_before_training(tmp_path):
    from click.testing import CliRunner

    from distillkit.pipelines.cli import main

    moco = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(64, 3, 7, 7)}}, moco)
    result = CliRunner().invoke(main, ["train", "slidr", "--teacher", "dino_vits8", "--teacher-checkpoint", str(moco),
                                       "--show-config"])
    assert result.exit_code == 2 and "# note: a run with this configuration is refused" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error: train slidr: teacher_checkpoint: ")
    assert "patch_embed.proj.weight missing" in result.output
