"""The audio trainer's parts: crops, on-device augmentation, EMA teacher, both losses, resume,
and (slow) the evaluation gain of distillation over random init on a fixed seed."""

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


@pytest.mark.slow
def test_distillation_beats_random_init_on_fixed_seed(tmp_path):
    """The measured gain of docs/audio.md, on a fixed seed: medium synthetic audio (80 files, 5 classes),
    800 steps of the small configuration on CPU, linear probe split by file (mean gain over 5 splits). Several
    minutes on 2 cores."""
    from distillkit.pipelines.catalog import load_manifest
    from distillkit.pipelines.runner import build
    from distillkit.sensors.synth.audio import make_audio
    from distillkit.train.audio import format_eval

    data = make_audio(tmp_path / "data", seed=0, size="medium")
    shards = tmp_path / "shards"
    build(load_manifest("demo-audio", [f"source.root={data}", f"output.dir={shards}", "cluster.scheduler=serial",
                                       "stages.audio.store_waveform=false", "output.files_per_shard=10"]),
          progress=False)
    trainer = AudioTrainer()
    config = trainer.resolve_config({"max_steps": 800, "log_every": 200})
    metrics = trainer.train(shards, tmp_path / "run", config, device="cpu")
    assert metrics["step"] == 800
    # 5 splits by file: one split's test side is ~38 segments, so one segment moves its accuracy by 0.026
    result = trainer.evaluate(tmp_path / "run" / "latest.pt", [shards], config, device="cpu",
                              options=trainer.resolve_eval_options({"splits": 5}))
    print(format_eval(result))
    assert result["distilled"]["n_test"] == result["random_init"]["n_test"] >= 30
    assert len(result["splits"]["distilled"]) == 5
    assert result["gain_balanced_accuracy"] > 0.03, format_eval(result)
    assert result["gain_accuracy"] > 0.03, format_eval(result)
