"""The audio trainer's parts: crops, on-device augmentation, EMA teacher, both losses, resume. The evaluation
gain of distillation over random init on a fixed seed is tests/test_demo_audio.py (the demo's configuration)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distillkit.train.audio import AudioTeacherStudent, AudioTrainer, byol_loss
from distillkit.train.audio_aug import crop_frames, log_mixup_exp, random_resized_crop, two_crops, window
from distillkit.train.base import ConfigError


def test_crops_come_from_audio_frames():
    rng = np.random.default_rng(0)
    frames = np.arange(2 * 50, dtype=np.float32).reshape(2, 50)
    views = two_crops(frames, 20, rng)
    assert views.shape == (2, 2, 20)
    for v in views:  # contiguous windows of the input
        assert np.array_equal(v, frames[:, int(v[0, 0]): int(v[0, 0]) + 20])
    short = two_crops(frames[:, :7], 20, rng)  # shorter than the crop: tiled cyclically, no padding
    assert set(np.unique(short[0, 0])) <= set(frames[0, :7]) and short.shape == (2, 2, 20)
    assert window(frames[:, :3], 2, 5)[0].tolist() == [2, 0, 1, 2, 0]
    assert crop_frames(6.0, 16000, 160) == 600 and crop_frames(0.01, 16000, 160) == 4


def test_log_mixup_exp_and_rrc():
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 1, 8, 16), -0.7)
    assert torch.allclose(log_mixup_exp(x, 0.4, g), x, atol=1e-5)  # equal items mix to themselves
    y = torch.stack([torch.full((1, 8, 16), v) for v in (-3.0, 2.0)])
    mixed = log_mixup_exp(y, 0.4, g)
    lam = (torch.exp(mixed[0, 0, 0, 0]) - math.exp(-3.0)) / (math.exp(2.0) - math.exp(-3.0))
    assert 0 < float(lam) <= 0.4  # log((1 - lam) e^x + lam e^y) with lam = 0.4 U(0, 1)
    assert (mixed[1] <= 2.0).all() and (mixed[1] >= math.log(0.6 * math.exp(2.0))).all()
    assert torch.equal(log_mixup_exp(y, 0.0, g), y)
    img = torch.randn(3, 1, 64, 40, generator=g)
    same = random_resized_crop(img, virtual_scale=1.0, scale=(1.0, 1.0), generator=g)
    assert torch.allclose(same, img, atol=1e-4)  # a full-size box on a canvas of the input: identity
    out = random_resized_crop(img, generator=g)
    assert out.shape == img.shape and not torch.allclose(out, img)


@pytest.mark.parametrize("loss", ["byol", "dino"])
def test_ema_teacher_follows_student_with_cosine_momentum(loss):
    torch.manual_seed(0)
    m = AudioTeacherStudent("small", 64, 40, loss=loss, total_steps=10)
    t0 = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    assert all(torch.equal(t0[k], v) for k, v in m.student.state_dict().items())  # teacher starts as a copy
    assert not any(p.requires_grad for p in m.teacher.parameters())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    batch = {"views": torch.randn(4, 2, 64, 40) * 10 - 30}
    m.train()
    for step in range(1, 4):  # what train/loop.py does: loss, backward, step, then the after-step hook
        loss_value = m.loss(batch)
        assert torch.isfinite(loss_value)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        with torch.no_grad():
            m.after_step(step, 10)
    assert int(m.ema_step) == 3
    w = "encoder.patch_embed.proj.weight"
    s, t, init = m.student.state_dict()[w], m.teacher.state_dict()[w], t0[w]
    assert not torch.equal(t, init) and not torch.equal(t, s)  # moved towards the student, not onto it
    assert (t - init).norm() < (s - init).norm()
    # one more step checked exactly: teacher = m * teacher + (1 - m) * student, m = cosine momentum of step 3
    from distillkit.train.ema import cosine_momentum

    before = m.teacher.state_dict()[w].clone()
    m.loss(batch).backward()
    opt.step()
    with torch.no_grad():
        m.after_step(4, 10)
    mom = cosine_momentum(3, 10, 0.99)
    torch.testing.assert_close(m.teacher.state_dict()[w], mom * before + (1 - mom) * m.student.state_dict()[w])


def test_byol_loss_range():
    z = torch.randn(5, 8)
    assert float(byol_loss(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(z, -z)) == pytest.approx(4.0, abs=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        AudioTrainer.resolve_config({"mixup_alpha": 1.5})
    with pytest.raises(ConfigError, match="loss"):
        AudioTrainer.resolve_config({"loss": "mse"})


def test_headline_is_the_mean_balanced_accuracy_over_splits_and_never_nan():
    from distillkit.train.audio import format_eval, headline

    def probe(bal):
        return {"accuracy": bal, "balanced_accuracy": bal, "n_test": 4,
                "per_class": {"a": {"recall": bal, "n_train": 2, "n_test": 4}}}

    result = {"protocol": "p", "random_init": probe(0.5), "distilled": probe(0.75),
              "splits": {"random_init": [{"accuracy": 0.5, "balanced_accuracy": 0.5},
                                         {"accuracy": 0.7, "balanced_accuracy": 0.7}],
                         "distilled": [{"accuracy": 0.75, "balanced_accuracy": 0.75},
                                       {"accuracy": 0.8, "balanced_accuracy": 0.8}]},
              "gain_accuracy": 0.175, "gain_balanced_accuracy": 0.175}
    head = headline(result)
    assert head["metric"] == "balanced accuracy (mean of 2 file splits)"
    assert head["random"] == pytest.approx(0.6) and head["distilled"] == pytest.approx(0.775)
    assert head["gain"] == pytest.approx(0.175)
    assert "random 0.600, distilled 0.775" in format_eval(result)
    # one split: its own figures; random init only: no distilled number and no gain
    single = headline({"random_init": probe(0.5), "distilled": probe(0.75)})
    assert single == {"metric": "balanced accuracy", "distilled": 0.75, "random": 0.5, "gain": 0.25}
    assert headline({"random_init": probe(0.5)}) == {"metric": "balanced accuracy", "distilled": None,
                                                    "random": 0.5, "gain": None}
    # a side without any test example has a NaN balanced accuracy: no number, not "nan"
    assert headline({"random_init": probe(float("nan")), "distilled": probe(0.75)})["gain"] is None
    assert AudioTrainer.demo["max_steps"] >= 1 and AudioTrainer.resolve_eval_options(AudioTrainer.demo_eval)


@pytest.mark.parametrize("size, want", [
    # Audio-WestlakeU/audiossl ec3a14d audiossl/methods/atst/train_small.sh:1-12 and train_base.sh:1-8 (global batch
    # = batch_size_per_gpu x nproc), train.py:18-32 (no clipping, fp32, sync_batchnorm=True)
    ("paper", {"max_steps": 39100, "batch_size": 4 * 384, "lr": 5e-4, "ema_base": 0.99, "crop_s": 9.0,
               "grad_clip": 0.0, "precision": "fp32", "sync_batchnorm": True}),
    ("base", {"max_steps": 318000, "batch_size": 6 * 256, "lr": 2e-4, "ema_base": 0.9995, "crop_s": 6.0,
              "grad_clip": 0.0, "precision": "fp32", "sync_batchnorm": True}),
])
def test_paper_and_base_are_the_released_atst_recipes(size, want):
    from distillkit.train.audio import SIZES

    eff = AudioTrainer.effective_config(AudioTrainer.resolve_config({"size": size}))
    assert {k: eff[k] for k in want} == want
    assert SIZES[size].warmup_steps == {"paper": 1300, "base": 15860}[size]
    assert SIZES[size].final_lr == 1e-6  # cosine_scheduler_step(lr, 1e-6, ...): model.py:22
    sources = AudioTrainer.config_sources(eff)
    assert all("audiossl" in sources[k] for k in want if k != "sync_batchnorm") and "train.py:22" in sources[
        "sync_batchnorm"]
    # the network: no qkv bias, stochastic depth 0.1 (audio_transformer.py:82, :368, :371), bias-free
    # projector/predictor Linear layers (byol.py:12)
    torch.manual_seed(0)
    m = AudioTeacherStudent(size, 64, 8)
    blocks = m.student.encoder.blocks
    assert all(b.attn.qkv.bias is None for b in blocks) and blocks[-1].drop_path == pytest.approx(0.1)
    assert blocks[0].drop_path == 0.0 and len(blocks) == 12
    linears = [x for x in [*m.student.head, *m.predictor] if isinstance(x, torch.nn.Linear)]
    assert len(linears) == 4 and all(x.bias is None for x in linears)
    assert m.student.encoder.embed_dim == {"paper": 384, "base": 768}[size]
    # both views go through one forward (byol.py:113-121): the heads' BatchNorm normalises over both views' 2B
    # samples, which gives another loss than one forward per view (small's way)
    m = AudioTeacherStudent(size, 64, 8, mixup_alpha=0.0, rrc=False).train()
    batch = {"views": torch.randn(4, 2, 64, 8) * 10 - 30}
    with torch.no_grad():
        torch.manual_seed(1)
        joint = float(m.loss(batch))
        m.joint_views = False
        torch.manual_seed(1)
        apart = float(m.loss(batch))
    assert math.isfinite(joint) and abs(joint - apart) > 1e-4


def test_small_keeps_its_cpu_recipe():
    eff = AudioTrainer.effective_config(AudioTrainer.resolve_config({}))
    assert (eff["max_steps"], eff["batch_size"], eff["grad_clip"], eff["precision"], eff["sync_batchnorm"]) == (
        100, 16, 3.0, "bf16", False)
    assert AudioTrainer.effective_config(AudioTrainer.resolve_config({"sync_batchnorm": True}))["sync_batchnorm"]
    with pytest.raises(ConfigError, match="grad_clip"):
        AudioTrainer.resolve_config({"grad_clip": -1.0})
