"""ATST-Frame (``distillkit train atst-frame``, train/atst_frame.py) against its release, Audio-WestlakeU/audiossl
ec3a14d ``audiossl/methods/atstframe/``: the block mask, the frequency-only student augmentation, the loss on masked
tokens across views, the EMA teacher, the released recipe as ``paper``, the front-end refusal, a few CPU steps,
checkpoints and ``--show-config``."""

from __future__ import annotations

import json
import tomllib
from math import comb

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillkit.pipelines.catalog import load_manifest
from distillkit.pipelines.runner import build
from distillkit.sensors.synth.audio import make_audio
from distillkit.train import atst_frame
from distillkit.train.atst_frame import AtstFrameTrainer, FrameTeacherStudent, block_mask, frequency_warp
from distillkit.train.audio import byol_loss, decode_front_end, read_norm
from distillkit.train.base import ConfigError
from distillkit.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from distillkit.train.ema import cosine_momentum
from tests.conftest import keep_audio_files


@pytest.fixture
def registered(monkeypatch):
    """``atst-frame`` in the trainer registry even before pyproject.toml's entry point is installed."""
    from distillkit.train.registry import TRAINERS

    real = TRAINERS.targets

    def targets():
        return {**real(), "atst-frame": "distillkit.train.atst_frame:AtstFrameTrainer"}

    monkeypatch.setattr(TRAINERS, "targets", targets)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 small synthetic files built twice: the demo's front end, and ATST-Frame's (40 ms window, HTK mel)."""
    root = make_audio(tmp_path_factory.mktemp("audio") / "src", seed=1, size="small")
    keep_audio_files(root, 6)
    out = {}
    for name, sets in [("plain", []), ("release", ["stages.logmel.win_length=640", "stages.logmel.mel_scale=htk"])]:
        out[name] = tmp_path_factory.mktemp(name)
        build(load_manifest("demo-audio", [f"source.root={root}", f"output.dir={out[name]}",
                                           "cluster.scheduler=serial", *sets]), progress=False)
    return out


def expected_masked_fraction(n: int, ratio: float, span: int, min_spans: int = 2) -> float:
    """E[masked fraction] of fairseq's compute_mask_indices (fairseq/data/data_utils.py, no_overlap=False branch)
    for one clip, written out from its definition: k = int(ratio * n / span + U) spans (k >= min_masks), k distinct
    starts uniform on [0, n - span), each masking ``span`` tokens. Token t stays unmasked iff none of the c_t starts
    that cover it is drawn: probability C(R - c_t, k) / C(R, k), R = n - span."""
    R, base = n - span, ratio * n / span
    total = 0.0
    for k, pk in ((int(base), 1 - (base - int(base))), (int(base) + 1, base - int(base))):
        k = max(min_spans, k)
        for t in range(n):
            c = len(range(max(0, t - span + 1), min(t, R - 1) + 1))
            total += pk * (1 - comb(R - c, k) / comb(R, k))
    return total / n


def runs(mask: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


@pytest.mark.parametrize("n", [250, 50])  # 250: the release's 10 s crop (1001 frames // 4); 50: small's 2 s
def test_block_mask_matches_the_released_masking(n):
    # random_mask.py:5-15 with transform.py:89 and train_small.sh:20-21, :26: mask_prob 0.65, static spans of 5,
    # min_masks 2, overlaps allowed. Overlapping spans merge, so about half the tokens are masked, not 65%.
    rng = np.random.default_rng(0)
    masks = np.stack([block_mask(n, 0.65, 5, rng) for _ in range(2000)])
    assert masks.shape == (2000, n) and masks.dtype == bool
    assert masks.mean() == pytest.approx(expected_masked_fraction(n, 0.65, 5), abs=0.006)
    assert masks.mean() < 0.55
    assert not masks[:, -1].any()  # starts < n - 5: a span ends at n - 2 at the latest
    assert all(r >= 5 for m in masks[:50] for r in runs(m))  # spans of 5 tokens, merged when they overlap
    spans = int(0.65 * n / 5)
    assert masks.sum(1).max() <= 5 * (spans + 1)
    # min_masks=2: a crop so short that the ratio asks for no span still gets two distinct starts (>= 6 tokens)
    assert all(block_mask(8, 0.1, 5, rng).sum() >= 6 for _ in range(50))


def test_one_crop_two_aligned_views_and_one_mask():
    rng = np.random.default_rng(0)
    spec = np.arange(64 * 300, dtype=np.float32).reshape(64, 300)
    meta = {"duration_s": 3.0, "sample_rate": 16000, "n_fft": 1024, "win_length": 640, "hop_length": 160, "n_mels": 64,
            "fmin": 60.0, "fmax": 7800.0}
    sample = {"logmel.npy": spec, "meta.json": meta}
    item = atst_frame.FrameCropTransform(200, 0.65, 5)(sample, rng, torch.Generator())
    assert item["crop"].shape == (64, 200) and item["mask"].shape == (50,)
    start = int(item["crop"][0, 0])
    assert np.array_equal(item["crop"], spec[:, start:start + 200])  # one contiguous crop
    # the student's frequency warp moves no frame in time: a spectrogram constant over frequency is unchanged
    g = torch.Generator().manual_seed(0)
    over_time = torch.linspace(-2, 2, 40).expand(8, 1, 64, 40).contiguous()
    torch.testing.assert_close(frequency_warp(over_time, generator=g), over_time, atol=1e-4, rtol=0)
    x = torch.randn(8, 1, 64, 40, generator=g)
    torch.testing.assert_close(frequency_warp(x, scale=(1.0, 1.0), generator=g), x, atol=1e-4, rtol=0)
    warped = frequency_warp(x, generator=g)
    assert warped.shape == x.shape and not torch.allclose(warped, x)


def _method(**kw):
    torch.manual_seed(0)
    return FrameTeacherStudent("small", 64, 40, total_steps=10, **kw)


@pytest.mark.parametrize("frames", [1, 3, 4, 7, 45])
def test_frame_embeddings_of_any_length(frames):
    m = _method().eval()
    spec = torch.randn(1, 1, 64, frames)
    emb = m.frame_embeddings(spec)
    assert emb.shape == (max(frames // 4, 1), 96) and torch.isfinite(emb).all()
    if frames < 4:  # tiled cyclically to one token: the same as the tiled input given whole
        tiled = spec[..., [i % frames for i in range(4)]]
        assert torch.equal(emb, m.frame_embeddings(tiled))


def test_loss_only_at_masked_tokens_across_views(monkeypatch):
    m = _method(mixup_alpha=0.0, freq_warp=False).train()
    crop = torch.randn(3, 64, 40) * 10 - 30
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:7] = mask[1, 0:5] = mask[2, 4:9] = True
    calls = []

    def spy(branch):
        real = branch.encoder.forward

        def forward(x, mask=None):
            calls.append(None if mask is None else mask.clone())
            return real(x, mask)
        monkeypatch.setattr(branch.encoder, "forward", forward)
        rows = []
        branch.projector.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
        return rows

    t_rows, s_rows = spy(m.teacher), spy(m.student)
    loss = m.loss({"crop": crop, "mask": mask})
    # teacher: unmasked input; student: the clip's mask on both views (audio_transformer.py:166-168, model.py:70-71)
    assert calls[0] is None and torch.equal(calls[1], torch.cat([mask, mask]))
    # only the masked tokens reach the projectors (frame_repr[mask_index], audio_transformer.py:207)
    assert t_rows == s_rows == [2 * int(mask.sum())]
    # each student view regresses the *other* view's teacher tokens (byol.py:68-80)
    a, b = m.normalise(crop).unsqueeze(1), m.normalise(crop.flip(1)).unsqueeze(1)
    monkeypatch.setattr(m, "views", lambda c: (a, b))
    calls.clear()
    with torch.no_grad():
        loss = float(m.loss({"crop": crop, "mask": mask}))
        keep = torch.cat([mask, mask])
        t1, t2 = m.teacher(torch.cat([a, b]), keep, mask_input=False).chunk(2)
        p1, p2 = m.predictor(m.student(torch.cat([a, b]), keep, mask_input=True)).chunk(2)
    cross = float(0.5 * (byol_loss(p2, t1) + byol_loss(p1, t2)))
    same = float(0.5 * (byol_loss(p1, t1) + byol_loss(p2, t2)))
    assert loss == pytest.approx(cross, abs=1e-5) and abs(cross - same) > 1e-3


def test_ema_teacher_is_encoder_and_projector_moved_by_cosine_momentum():
    m = _method().train()
    assert not any("predictor" in k for k in m.teacher.state_dict())  # model.py:46-48: no predictor
    assert all(torch.equal(v, m.student.state_dict()[k]) for k, v in m.teacher.state_dict().items())
    assert not any(p.requires_grad for p in m.teacher.parameters())
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    batch = {"crop": torch.randn(4, 64, 40) * 10 - 30,
             "mask": torch.from_numpy(np.stack([block_mask(10, 0.65, 5, np.random.default_rng(i)) for i in range(4)]))}
    w = "encoder.patch_embed.patch_embed.weight"
    bn = "projector.1.running_mean"
    for step in (1, 2):
        before = m.teacher.state_dict()[w].clone()
        opt.zero_grad()
        m.loss(batch).backward()
        opt.step()
        bn_before = m.teacher.state_dict()[bn].clone()  # the teacher's own train-mode forward updated it
        with torch.no_grad():
            m.after_step(step, 10)
        mom = cosine_momentum(step - 1, 10, 0.99)
        torch.testing.assert_close(m.teacher.state_dict()[w], mom * before + (1 - mom) * m.student.state_dict()[w])
        # parameters only (update_teacher, model.py:78-83): the teacher's BatchNorm statistics stay its own
        assert torch.equal(m.teacher.state_dict()[bn], bn_before)
        assert not torch.equal(bn_before, m.student.state_dict()[bn])
    assert int(m.ema_step) == 2


def test_paper_is_the_released_atst_frame_small_recipe():
    eff = AtstFrameTrainer.effective_config(AtstFrameTrainer.resolve_config({"size": "paper"}))
    # train_small.sh:3, :10-15, :20, :22, :26; train.py:14, :21-36 (no clipping, fp32, sync_batchnorm)
    want = {"max_steps": 58500, "batch_size": 4 * 256, "lr": 4e-4, "ema_base": 0.997, "crop_s": 10.0,
            "mask_ratio": 0.65, "mask_len": 5, "grad_clip": 0.0, "precision": "fp32", "sync_batchnorm": True,
            "front_end": "release"}
    assert {k: eff[k] for k in want} == want
    assert atst_frame.SIZES["paper"].warmup_steps == 1950 and atst_frame.SIZES["paper"].final_lr == 1e-6
    sources = AtstFrameTrainer.config_sources(eff)
    assert all("audiossl" in sources[k] for k in want)
    m = FrameTeacherStudent("paper", 64, 1000)  # 10 s at 160-sample hops: 250 tokens of 40 ms
    enc = m.student.encoder
    assert enc.pos_embed.shape == (1, 251, 384) and len(enc.blocks) == 12
    assert all(b.attn.qkv.bias is None for b in enc.blocks) and enc.blocks[-1].drop_path == pytest.approx(0.1)
    assert enc.patch_embed.patch_embed.in_features == 64 * 4  # one token = every mel band x 4 frames
    # the patch is flattened in the release's (p1 p2 c) order (PatchEmbed_v2's Rearrange, audio_transformer.py:82),
    # so released weights read the same values: token w, input (mel f, frame 4w + j) -> index f * 4 + j
    x = (torch.arange(64)[:, None] * 1000 + torch.arange(12)[None]).float()[None, None]
    seen = []
    enc.patch_embed.patch_embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    enc.patch_embed(x)
    assert seen[0].shape == (1, 3, 256) and seen[0][0, 1, :6].tolist() == [4, 5, 6, 7, 1004, 1005]
    linears = [x for x in [*m.student.projector, *m.predictor] if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(384, 4096), (4096, 256), (256, 4096),
                                                                    (4096, 256)]
    assert all(x.bias is None for x in linears)


def test_paper_refuses_shards_without_the_released_front_end(shards, tmp_path):
    with pytest.raises(ConfigError) as err:
        AtstFrameTrainer().train(shards["plain"], None, AtstFrameTrainer.resolve_config({"size": "paper"}))
    msg = str(err.value)
    assert "\n" not in msg and "index.json" in msg
    assert "win_length 1024" in msg and "win_length 640" in msg and "mel_scale 'htk'" in msg
    assert "--set stages.logmel.win_length=640" in msg and "front_end=shards" in msg
    atst_frame.check_release_front_end(read_norm(shards["release"])[2], shards["release"], "paper")  # accepted


def test_cli_refuses_before_training(shards, registered, tmp_path):
    from distillkit.pipelines.cli import main

    result = CliRunner().invoke(main, ["train", "atst-frame", "--shards", str(shards["plain"]), "--size", "paper",
                                       "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1 and "win_length 640" in errors[0], result.output
    assert not (tmp_path / "run").exists()


def test_few_cpu_steps_lower_the_loss_and_the_checkpoint_loads(shards, tmp_path):
    out = tmp_path / "run"
    config = AtstFrameTrainer.resolve_config({"max_steps": 30, "batch_size": 4, "log_every": 5})
    metrics = AtstFrameTrainer().train(shards["plain"], out, config)
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    state = load_checkpoint(out / CHECKPOINT_NAME, map_location="cpu")
    assert state["step"] == 30 and state["method"] == "atst-frame"
    method = atst_frame.build_method(AtstFrameTrainer.effective_config(config), shards["plain"], 30)
    method.load_state_dict(state["model"])  # strict: every parameter and buffer of the method
    assert decode_front_end(method.front_end) == read_norm(shards["plain"])[2]
    assert int(method.ema_step) == 30 and metrics["step"] == 30
    result = AtstFrameTrainer().evaluate(out / CHECKPOINT_NAME, [shards["plain"]], config,
                                         options={"epochs": 5, "splits": 2})
    head = AtstFrameTrainer().headline(result)
    assert head["distilled"] is not None and head["random"] is not None
    # eval audio's protocol: several splits by file, the gain their mean
    assert [len(result["splits"][k]) for k in ("random_init", "distilled")] == [2, 2]
    gains = [d["balanced_accuracy"] - r["balanced_accuracy"]
             for d, r in zip(result["splits"]["distilled"], result["splits"]["random_init"], strict=True)]
    assert result["gain_balanced_accuracy"] == pytest.approx(np.mean(gains)) == pytest.approx(head["gain"])
    assert "teacher mean-pooled frame representations" in result["protocol"]
    assert "mean over 2 splits" in AtstFrameTrainer().format_eval(result)


def test_show_config_lists_every_key_with_its_source(registered):
    from distillkit.pipelines.cli import main

    for size in ("small", "paper"):
        result = CliRunner().invoke(main, ["train", "atst-frame", "--size", size, "--show-config"])
        assert result.exit_code == 0, result.output
        data = tomllib.loads(result.output)
        lines = result.output.splitlines()
        for i, line in enumerate(lines):
            if line and not line.startswith(("#", "[")):
                assert lines[i - 1].startswith("# source:"), line
        eff = AtstFrameTrainer.effective_config(AtstFrameTrainer.resolve_config({"size": size}))
        assert AtstFrameTrainer.effective_config(AtstFrameTrainer.resolve_config(data)) == eff
        if size == "paper":
            block = result.output.split("mask_ratio = 0.65")[0].rsplit("\n# source:", 1)[1]
            assert "train_small.sh:20" in block


def test_config_errors():
    for key, value in [("mask_ratio", 1.0), ("mask_len", 0), ("mixup_alpha", 1.0), ("front_end", "mine")]:
        with pytest.raises(ConfigError, match=key):
            AtstFrameTrainer.resolve_config({key: value})
