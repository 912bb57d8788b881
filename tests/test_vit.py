"""The shared ViT (DINO layout), EMA and DINO head/loss modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.preprocess.vit import ViT, load_vit, vit, vit_from_state_dict
from distillkit.train.dino import DINOHead, DINOLoss, teacher_temperature
from distillkit.train.ema import cosine_momentum, ema_update


def dino_vit_keys(embed: int, depth: int, mlp: int, patch: int, in_chans: int = 3, img: int = 224) -> dict:
    """Key -> shape of a public DINO backbone checkpoint, written out from the architecture."""
    n = (img // patch) ** 2 + 1
    keys = {
        "cls_token": (1, 1, embed),
        "pos_embed": (1, n, embed),
        "patch_embed.proj.weight": (embed, in_chans, patch, patch),
        "patch_embed.proj.bias": (embed,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "norm1.weight": (embed,), b + "norm1.bias": (embed,),
            b + "attn.qkv.weight": (3 * embed, embed), b + "attn.qkv.bias": (3 * embed,),
            b + "attn.proj.weight": (embed, embed), b + "attn.proj.bias": (embed,),
            b + "norm2.weight": (embed,), b + "norm2.bias": (embed,),
            b + "mlp.fc1.weight": (mlp, embed), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (embed, mlp), b + "mlp.fc2.bias": (embed,),
        })
    keys.update({"norm.weight": (embed,), "norm.bias": (embed,)})
    return keys


def test_vits16_checkpoint_layout_loads_strict(tmp_path):
    expected = dino_vit_keys(384, 12, 1536, 16)
    model = vit("small", patch=16)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in expected.items()}
    model.load_state_dict(sd, strict=True)
    # DINO training checkpoint wrapping: teacher/student with module./backbone. prefixes and a head
    # DINO's main_dino.py also saves its argparse Namespace: weights_only loading must accept it
    import argparse

    wrapped = {"teacher": {"backbone." + k: v for k, v in sd.items()}, "student": {},
               "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005)}
    wrapped["teacher"]["head.last_layer.weight_g"] = torch.ones(10, 1)
    torch.save(wrapped, tmp_path / "ckpt.pth")
    loaded = load_vit(tmp_path / "ckpt.pth")
    assert loaded.patch == (16, 16) and loaded.num_heads == 6 and len(loaded.blocks) == 12
    x = torch.randn(1, 3, 48, 64, generator=g)
    with torch.no_grad():
        a, ca = model.eval()(x)
        b, cb = loaded(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ca, cb)


def test_vits8_layout_from_state_dict():
    expected = dino_vit_keys(384, 12, 1536, 8)
    sd = {k: torch.zeros(s) for k, s in expected.items()}
    model = vit_from_state_dict(sd)
    assert model.patch == (8, 8) and model.base_grid == (28, 28) and model.embed_dim == 384


def test_bad_checkpoint_named(tmp_path):
    p = tmp_path / "bad.pth"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_vit(p)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vit(tmp_path / "missing.pth")


def reference_forward(model: ViT, x: torch.Tensor):
    """The same network written out with explicit softmax attention and per-token position lookup."""
    B = x.shape[0]
    ph, pw = model.patch
    h, w = x.shape[2] // ph, x.shape[3] // pw
    proj = model.patch_embed.proj
    t = F.conv2d(x[:, :, : h * ph, : w * pw], proj.weight, proj.bias, stride=(ph, pw))
    t = t.flatten(2).transpose(1, 2)
    gh, gw = model.base_grid
    pos = model.pos_embed[0, 1:].reshape(gh, gw, -1).permute(2, 0, 1)[None]
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(h * w, -1)
    t = torch.cat([model.cls_token.expand(B, -1, -1) + model.pos_embed[:, :1], t + pos], 1)
    H = model.num_heads
    keys = None
    for blk in model.blocks:
        y = F.layer_norm(t, (t.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)
        keys = k
        split = lambda z: z.reshape(B, -1, H, z.shape[-1] // H).transpose(1, 2)  # noqa: E731
        att = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // H)).softmax(-1)
        o = (att @ split(v)).transpose(1, 2).reshape(B, -1, t.shape[-1])
        t = t + blk.attn.proj(o)
        y = F.layer_norm(t, (t.shape[-1],), blk.norm2.weight, blk.norm2.bias, 1e-6)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
    t = F.layer_norm(t, (t.shape[-1],), model.norm.weight, model.norm.bias, 1e-6)
    return t[:, 1:].reshape(B, h, w, -1), t[:, 0], keys[:, 1:].reshape(B, h, w, -1)


@pytest.mark.parametrize("patch,in_chans,img_size,shape", [
    (8, 3, 64, (2, 3, 40, 72)),          # non-square grid 5 x 9 from a square table
    ((64, 4), 1, (64, 64), (2, 1, 64, 50)),  # spectrogram: 1 x 12 tokens from a 1 x 16 table
])
def test_forward_matches_reference_any_grid(patch, in_chans, img_size, shape):
    torch.manual_seed(0)
    model = vit("tiny", patch=patch, in_chans=in_chans, img_size=img_size).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        out = model.forward_features(x, keys=True)
        ref_p, ref_c, ref_k = reference_forward(model, x)
    ph, pw = model.patch
    assert out.patches.shape == (shape[0], shape[2] // ph, shape[3] // pw, 96)
    torch.testing.assert_close(out.patches, ref_p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls, ref_c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.keys, ref_k, atol=1e-5, rtol=1e-4)


def test_pos_embed_identity_at_base_grid_and_too_small_input():
    model = vit("tiny", patch=8, img_size=32)
    assert model.interpolate_pos_embed(4, 4) is model.pos_embed
    assert model.interpolate_pos_embed(3, 7).shape == (1, 22, 96)
    with pytest.raises(ValueError, match="smaller than one patch"):
        model(torch.zeros(1, 3, 7, 20))
    with pytest.raises(ValueError, match="unknown ViT size"):
        vit("huge")


def test_ema_update_and_schedule():
    torch.manual_seed(0)
    s = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    t = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    s[1].running_mean.fill_(2.0)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ema_update(t, s, 0.9)
    for k, p in t.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[k] + 0.1 * dict(s.named_parameters())[k])
    assert torch.equal(t[1].running_mean, s[1].running_mean)
    ema_update(t, s, 0.0, buffers="keep")
    torch.testing.assert_close(t[0].weight, s[0].weight)
    with pytest.raises(ValueError):
        ema_update(t, s, 1.5)
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.9, 0.99) == pytest.approx(0.945)
    assert cosine_momentum(10, 100, 0.9) < cosine_momentum(20, 100, 0.9)


def test_dino_head_layout_and_norm():
    head = DINOHead(96, out_dim=512)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 96), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_v": (512, 256), "last_layer.weight_g": (512, 1),
    }
    assert not head.last_layer.weight_g.requires_grad
    out = head(torch.randn(5, 7, 96))
    assert out.shape == (5, 7, 512)
    # unit bottleneck x unit rows (g = 1): every logit is a cosine
    assert out.abs().max() <= 1.0 + 1e-5


def test_dino_loss_matches_formula_and_centre():
    torch.manual_seed(0)
    loss_fn = DINOLoss(8, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_steps=10, student_temp=0.1)
    s = torch.randn(6, 8, requires_grad=True)
    t = torch.randn(6, 8)
    loss = loss_fn(s, t, step=5)
    temp = 0.04 + 0.03 * 0.5
    q = torch.softmax(t / temp, -1)
    expect = -(q * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(loss_fn.center, 0.1 * t.mean(0, keepdim=True))
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert teacher_temperature(0, 0.04, 0.07, 10) == pytest.approx(0.04)
    assert teacher_temperature(20, 0.04, 0.07, 10) == pytest.approx(0.07)
    # multi-crop: same-view pairs are skipped
    loss_fn = DINOLoss(8)
    sv = [torch.randn(3, 8) for _ in range(4)]
    tv = [torch.randn(3, 8) for _ in range(2)]
    got = loss_fn.multicrop(sv, tv, step=0)
    terms = [-(torch.softmax(tv[i] / 0.04, -1) * torch.log_softmax(sv[j] / 0.1, -1)).sum(-1).mean()
             for i in range(2) for j in range(4) if i != j]
    torch.testing.assert_close(got, torch.stack(terms).mean())
    torch.testing.assert_close(loss_fn.center, 0.1 * torch.cat(tv).mean(0, keepdim=True))
