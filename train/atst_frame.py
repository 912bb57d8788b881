"""ATST-Frame: frame-level audio teacher-student on log-mel shards (``distillkit train atst-frame``).

The released method (Audio-WestlakeU/audiossl ec3a14d, ``audiossl/methods/atstframe/``; docs/audio.md
"ATST-Frame" cites every line):

- **one crop, two views** (transform.py:70-101): one random ``crop_s`` crop per clip (10 s: ``anchor_len``,
  train_small.sh:22); view 1 is the crop as it is (``aug_tea=False``, train_small.sh:17), view 2 the same crop
  with log-mixup-exp and a *frequency-only* random-resized-crop (``aug_stu=True``: ``Mixup()`` then
  ``RandomResizeCrop((1, 1.0), time_scale=(1.0, 1.0))``, transform.py:58-63). Neither augmentation moves a frame
  in time, so the two views' tokens stay aligned frame by frame;
- **one block mask per clip, shared by both views** (transform.py:84-99): fairseq's ``compute_mask_indices``
  with ``mask_prob=0.65``, ``mask_length=5`` tokens, ``mask_type="static"``, ``min_masks=2`` (random_mask.py:5-15;
  train_small.sh:20-21, :26), overlaps allowed: the function defaults to ``no_overlap=True``, but transform.py:15
  sets ``mask_nooverlap=False`` and passes it at transform.py:89. ``block_mask`` here is that function for one clip;
- **frame tokens**: 64 mel bands x 4 frames = 40 ms per token (``train.models.frame_transformer``);
- **the loss** (byol.py:57-84, :118-138; model.py:68-72): both views go through the teacher unmasked and through
  the student masked; only the *masked* tokens' outputs are kept (audio_transformer.py:207), projected (BYOL
  MLP 4096 -> 256, the student also through a predictor) and regressed with ``2 - 2 cos`` from each view's
  student to the *other* view's teacher, averaged over the two pairs (``symmetric=True``, train_small.sh:16);
- **the EMA teacher** (model.py:61-62, :78-83, :114, :145-147): a copy of the student's encoder and projector,
  moved after every step with momentum ``ema`` on a cosine to 1; the release updates parameters only;
- **optimisation** (model.py:114-116, :131-144; train.py:14): AdamW over the student (biases and 1-d parameters
  undecayed, weight decay 0.04 -> 0.4 on a cosine), lr ``lr * global batch / 256`` with a linear warm-up from 0
  and a cosine to 1e-6; fp32, no clipping, synchronised BatchNorm (train.py:21-36).

ATST-Frame's pretraining has no clip-level term: its loss is the frame loss alone (model.py:121-122). The
release combines it with ATST-Clip afterwards, in a *supervised* stage ("ATST-C2F", README.md:159-161,
train_distill.py, module_distill.py): a clip model fine-tuned on labelled data teaches the frame model's
fine-tuning through a BCE on its logits. That stage needs labels and a fine-tuned teacher; it is not part of this
self-supervised trainer (docs/audio.md "ATST-Frame").

Deviations, as the clip trainer's (train/audio.py, docs/audio.md): log-mel standardised with the shards'
mean/std instead of ATST's fixed min/max scaling; the mixup partner is another clip of the batch instead of a
per-worker memory bank; a clip shorter than the crop is tiled cyclically instead of zero-padded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.pipelines.manifest import Key
from distillkit.remote import child, location
from distillkit.train import distributed
from distillkit.train.audio import (
    DEMO_SPLITS,
    byol_loss,
    check_sample,
    encode_front_end,
    mlp,
    read_norm,
)
from distillkit.train.audio_aug import audio_frames, crop_frames, log_mixup_exp, window
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.ema import cosine_momentum, ema_update
from distillkit.train.frame_eval import TOKEN_FRAMES  # frames per token: train_small.sh:24 (patch_w=4)
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.models.frame_transformer import FrameTransformer
from distillkit.train.streaming import ShardStream, make_loader

REL = "Audio-WestlakeU/audiossl audiossl/methods/atstframe/"


@dataclass(frozen=True)
class FrameSize:
    """Network and optimiser settings of one ``size``."""

    embed_dim: int
    depth: int
    num_heads: int
    proj_hidden: int
    proj_out: int
    batch_size: int  # global: over all processes
    ema_base: float
    lr: float  # at batch 256 (scaled by global batch / 256)
    warmup_steps: int
    crop_s: float
    max_steps: int = 100
    drop_path: float = 0.0
    grad_clip: float = 3.0  # 0 = off
    precision: str = "bf16"
    final_lr: float = 0.0


SIZES = {
    # small: distillkit's CPU size, the clip trainer's small network and optimiser (train/audio.py SIZES["small"])
    "small": FrameSize(96, 2, 3, 256, 64, 16, 0.99, 8e-3, 10, 2.0),
    # paper: ATST-Frame small as train_small.sh runs it (4 GPUs x 256 clips)
    "paper": FrameSize(384, 12, 6, 4096, 256, batch_size=4 * 256, ema_base=0.997, lr=4e-4, warmup_steps=1950,
                       crop_s=10.0, max_steps=58500, drop_path=0.1, grad_clip=0.0, precision="fp32", final_lr=1e-6),
}

RELEASED_FRONT_END = {
    # transform.py:16-18: MelSpectrogram(16000, f_min=60, f_max=7800, hop_length=160, win_length=win_length,
    # n_fft=1024, n_mels=n_mels) with torchaudio's defaults (HTK mel, no filter norm), AmplitudeToDB(top_db=80);
    # train_small.sh:25, :27: n_mels=64, win_length=640 (a 40 ms window: the clip model's is 1024)
    "sample_rate": 16000, "n_fft": 1024, "win_length": 640, "hop_length": 160, "n_mels": 64, "fmin": 60.0,
    "fmax": 7800.0, "top_db": 80.0, "mel_scale": "htk",
}


# --------------------------------------------------------------------------- masking and augmentation
def block_mask(n_tokens: int, ratio: float, span: int, rng: np.random.Generator, min_spans: int = 2) -> np.ndarray:
    """One clip's token mask, as fairseq's ``compute_mask_indices`` draws it for the release's arguments
    (``mask_type="static"``, ``min_space=0``, ``min_masks=2``, no padding: random_mask.py:5-15; ``no_overlap=False``:
    transform.py:15 ``mask_nooverlap=False``, passed at transform.py:89, where the function's default is True).

    ``int(ratio * n_tokens / span + U(0, 1))`` spans (at least ``min_spans``) of ``span`` tokens start at distinct
    positions drawn uniformly from ``[0, n_tokens - span)``; overlapping spans merge, so fewer than ``ratio`` of
    the tokens end up masked (0.503 expected for the release's 250 tokens, 0.65 and spans of 5), and the last token is
    never masked.

    Args:
        n_tokens: tokens of the crop.
        ratio: ``mask_prob``.
        span: ``mask_length`` in tokens.
        rng: the sample's generator.
        min_spans: ``min_masks``.

    Returns:
        (n_tokens,) bool, True = masked.
    """
    num = max(min_spans, int(ratio * n_tokens / span + rng.random()))
    starts_range = n_tokens - span
    if starts_range <= num:  # fairseq: min_len = sz - num_mask - 1, i.e. num + 1 possible starts
        starts_range = num + 1
    starts = rng.choice(starts_range, num, replace=False)
    idx = (starts[:, None] + np.arange(span)[None]).ravel()
    mask = np.zeros(n_tokens, dtype=bool)
    mask[idx[idx < n_tokens]] = True
    return mask


def frequency_warp(x: Tensor, scale: tuple[float, float] = (0.6, 1.5), generator: torch.Generator | None = None
                   ) -> Tensor:
    """BYOL-A's ``RandomResizeCrop((1, 1.0), time_scale=(1.0, 1.0))`` as ATST-Frame's student view uses it
    (transform.py:62): a band of ``h = clip(int(U(scale) * F), 1, F)`` mel bins at a random offset, resized back to
    ``F`` bins (bicubic, corners aligned); time is untouched, so every frame stays where it was.

    Why not ``train.audio_aug.random_resized_crop``: it draws the box in both axes; a time warp would shift the
    student's frames against the teacher's, which the frame loss compares one by one.

    Args:
        x: (B, C, F, T) normalised log-mel.
        scale: range of the band height relative to ``F`` (capped at 1).
        generator: optional generator on ``x``'s device.
    """
    B, _, Fq, _ = x.shape
    if Fq < 2:
        return x
    dev = x.device
    u = torch.rand(B, 2, device=dev, generator=generator)
    h = (scale[0] + (scale[1] - scale[0]) * u[:, 0]).mul(Fq).floor().clamp(1, Fq)
    i = (u[:, 1] * (Fq - h + 1)).floor().clamp(max=Fq - h)  # randint(0, F - h)
    # align_corners=True: input row r sits at -1 + 2 r / (F - 1); output rows 0..F-1 map onto rows i..i+h-1
    lo = -1 + 2 * i / (Fq - 1)
    hi = -1 + 2 * (i + h - 1) / (Fq - 1)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = (hi - lo) / 2
    theta[:, 1, 2] = (hi + lo) / 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=True).to(x.dtype)


# --------------------------------------------------------------------------- method
class FrameBranch(nn.Module):
    """Encoder + projector applied to the tokens selected by ``keep``: (B, 1, F, T) -> (N, proj_out)."""

    def __init__(self, encoder: FrameTransformer, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: Tensor, keep: Tensor, mask_input: bool) -> Tensor:
        """The projected frame tokens at the masked positions: (number of True in ``keep``, projector out).

        Args:
            x: (B, 1, F, T) normalised dB frames.
            keep: (B, T // TOKEN_FRAMES) bool, the masked tokens (the ones the loss compares).
            mask_input: replace those tokens by the mask embedding at the input (the student) or not (teacher).
        """
        frames = self.encoder(x, keep if mask_input else None)
        # the release keeps only the masked tokens (frame_repr[mask_index], audio_transformer.py:207): the
        # projector's BatchNorm normalises over them, not over every token
        return self.projector(frames[keep])


class FrameTeacherStudent(nn.Module):
    """ATST-Frame's student (encoder, projector, predictor) and EMA teacher (encoder, projector).

    Args:
        size: a key of ``SIZES``.
        n_mels: mel bands.
        crop: crop length in frames (a multiple of 4).
        mean: dataset log-mel mean (dB), from ``index.json``.
        std: dataset log-mel std (dB).
        total_steps: steps of the momentum schedule.
        mixup_alpha: largest log-mixup-exp weight of the student view (0 = off).
        freq_warp: apply ``frequency_warp`` to the student view.
        ema_base: teacher momentum at step 0 (None: the size's).
        front_end: the training shards' front end (``train.audio.read_norm``), saved in the state dict.
    """

    def __init__(self, size: str, n_mels: int, crop: int, mean: float = 0.0, std: float = 1.0,
                 total_steps: int = 100, mixup_alpha: float = 0.4, freq_warp: bool = True,
                 ema_base: float | None = None, front_end: dict[str, Any] | None = None):
        super().__init__()
        cfg = SIZES[size]
        self.total_steps, self.mixup_alpha, self.freq_warp = total_steps, mixup_alpha, freq_warp
        self.ema_base = cfg.ema_base if ema_base is None else ema_base
        self.crop = crop
        encoder = FrameTransformer(n_mels, crop // TOKEN_FRAMES, cfg.embed_dim, cfg.depth, cfg.num_heads, TOKEN_FRAMES,
                                   drop_path_rate=cfg.drop_path)
        # byol.py:106, :114: build_mlp(2, D, 4096, 256, last_bn=False), bias-free Linear layers
        self.student = FrameBranch(encoder, mlp(cfg.embed_dim, cfg.proj_hidden, cfg.proj_out, bias=False))
        self.predictor = mlp(cfg.proj_out, cfg.proj_hidden, cfg.proj_out, bias=False)
        self.teacher = copy.deepcopy(self.student)  # model.py:61-62: the student's weights, predictor left out
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("front_end", encode_front_end(front_end))

    def normalise(self, db: Tensor) -> Tensor:
        """(dB - dataset mean) / dataset std.

        Args:
            db: log-mel frames in dB, any shape.
        """
        return (db - self.mean) / self.std

    def views(self, crop: Tensor) -> tuple[Tensor, Tensor]:
        """View 1 (teacher-side, not augmented) and view 2 (mixup, frequency warp), each (B, 1, F, T).

        Args:
            crop: (B, F, T) dB crops.
        """
        v1 = self.normalise(crop.float()).unsqueeze(1)
        v2 = v1
        if self.training:
            v2 = log_mixup_exp(v2, self.mixup_alpha)  # Mixup() before RandomResizeCrop: transform.py:59-63
            if self.freq_warp:
                v2 = frequency_warp(v2)
        return v1, v2

    def after_step(self, step: int, max_steps: int) -> None:
        """After each optimiser step: teacher encoder and projector follow the student (parameters only, as
        ``update_teacher``, model.py:78-83).

        Args:
            step: the optimiser steps done (1 after the first).
            max_steps: the run's steps (the loop's interface; the momentum schedule uses ``total_steps``, given
                at build).
        """
        ema_update(self.teacher, self.student, cosine_momentum(step - 1, self.total_steps, self.ema_base, 1.0),
                   buffers="keep")
        self.ema_step.fill_(step)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The symmetric BYOL loss of the student's masked frame tokens against the teacher's, both views.

        Args:
            batch: ``collate_frames``' batch: ``crop`` (B, F, T) dB crops, ``mask`` (B, T // TOKEN_FRAMES) tokens.
        """
        v1, v2 = self.views(batch["crop"])
        mask = batch["mask"].bool()
        both, keep = torch.cat([v1, v2]), torch.cat([mask, mask])  # one forward of both views (byol.py:118-138)
        with torch.no_grad():
            t1, t2 = self.teacher(both, keep, mask_input=False).chunk(2)
        p1, p2 = self.predictor(self.student(both, keep, mask_input=True)).chunk(2)
        # ByolLoss(symmetric=True) (byol.py:68-80): each teacher view against the student's other view
        return 0.5 * (byol_loss(p2, t1) + byol_loss(p1, t2))

    @torch.no_grad()
    def frame_embeddings(self, spec: Tensor, which: str = "teacher") -> Tensor:
        """Frame representations of one normalised segment of any length: (1, 1, F, n) -> (max(n // 4, 1), D),
        computed over consecutive training-crop windows (the position table covers one crop); a segment of fewer
        than 4 frames is tiled cyclically to one token.

        Args:
            spec: the segment's normalised log-mel.
            which: ``"teacher"`` or ``"student"`` encoder.
        """
        enc = (self.teacher if which == "teacher" else self.student).encoder
        t = spec.shape[-1]
        if t < TOKEN_FRAMES:
            # a segment shorter than one token is tiled cyclically to one token, as clip_embeddings tiles its
            # last window (train.audio_aug.window): one representation, not an empty list to concatenate
            spec = spec[..., torch.arange(TOKEN_FRAMES, device=spec.device) % t]
        n = spec.shape[-1] // TOKEN_FRAMES * TOKEN_FRAMES
        return torch.cat([enc(spec[..., s: min(s + self.crop, n)])[0] for s in range(0, n, self.crop)])


class FrameCropTransform:
    """The loader's per-sample transform: one random crop of the audio frames and its token mask (picklable)."""

    def __init__(self, crop: int, mask_ratio: float, mask_len: int):
        self.crop, self.mask_ratio, self.mask_len = crop, mask_ratio, mask_len

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
        frames = audio_frames(sample["logmel.npy"], sample["meta.json"])
        n = frames.shape[1]
        start = int(rng.integers(0, (n - self.crop if n >= self.crop else n - 1) + 1))
        return {"crop": np.ascontiguousarray(window(frames, start, self.crop), dtype=np.float32),
                "mask": block_mask(self.crop // TOKEN_FRAMES, self.mask_ratio, self.mask_len, rng)}


def collate_frames(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """``{"crop": (B, F, T) float32 dB, "mask": (B, T // 4) bool}``.

    Args:
        items: the transform's outputs.
    """
    return {"crop": torch.from_numpy(np.stack([it["crop"] for it in items])),
            "mask": torch.from_numpy(np.stack([it["mask"] for it in items]))}


def check_release_front_end(front: dict[str, Any], shards: Path, size: str) -> None:
    """Raise ``ConfigError`` (one line) when ``shards`` were not built with the released front end.

    Args:
        front: the shards' front end (``read_norm``).
        shards: the shard directory, for the message.
        size: the configuration's size, for the message.
    """
    diff = {k: (front.get(k), v) for k, v in RELEASED_FRONT_END.items() if front.get(k) != v}
    if not diff:
        return
    held = ", ".join(f"{k} {a!r}" for k, (a, _) in diff.items())
    need = ", ".join(f"{k} {b!r}" for k, (_, b) in diff.items())
    sets = " ".join(f"--set stages.{'audio' if k == 'sample_rate' else 'logmel'}.{k}={b}" for k, (_, b) in diff.items())
    raise ConfigError(child(location(shards), "index.json"), "stages.logmel",
                      f"the shards hold {held}; ATST-Frame ({size}) needs {need} ({REL}transform.py:16-18, "
                      f"train_small.sh:25-27): rebuild with {sets}, or train on these with --set front_end=shards")


def build_method(config: dict[str, Any], shards: Path, total_steps: int) -> FrameTeacherStudent:
    """The method for ``config`` with the normalisation of ``shards``, seeded (same seed = same init).

    Args:
        config: a resolved (effective) atst-frame configuration.
        shards: the shard directory (index.json statistics and front end).
        total_steps: length of the momentum schedule.
    """
    mean, std, front = read_norm(shards)
    crop = crop_frames(config["crop_s"] or SIZES[config["size"]].crop_s, front["sample_rate"], front["hop_length"])
    torch.manual_seed(config["seed"])
    return FrameTeacherStudent(config["size"], int(front["n_mels"]), crop, mean, std, total_steps,
                               config["mixup_alpha"], config["freq_warp"], config["ema_base"], front)


# --------------------------------------------------------------------------- trainer
@torch.no_grad()
def scene_embeddings(method: FrameTeacherStudent, specs: list[np.ndarray], device: str, which: str) -> np.ndarray:
    """(N, D) clip features: each segment's frame representations, mean-pooled (the release's scene embedding).

    Args:
        method: the teacher-student.
        specs: per segment, (n_mels, n) dB frames (any float dtype: each goes to float32 on its own, so the list
            keeps the stored float16).
        device: torch device.
        which: ``"teacher"`` or ``"student"``.
    """
    method.eval().to(device)
    return np.stack([method.frame_embeddings(
        method.normalise(torch.from_numpy(np.asarray(s, dtype=np.float32)).to(device))[None, None],
        which).mean(0).float().cpu().numpy() for s in specs])


DEMO_STEPS = 600
"""``distillkit demo``'s steps: the clip-probe gain of the frame model is there by 600 (seed 0: +0.064 at 600, +0.063
at 1200, mean of 10 splits)."""


class AtstFrameTrainer(Trainer):
    name = "atst-frame"
    pipeline = "audio"
    summary = "ATST-Frame: masked frame-level teacher-student (BYOL loss on 40 ms tokens, EMA teacher) on log-mel"
    # `distillkit demo` trains it on the audio section's shards beside ATST-Clip and probes it as `eval audio` probes
    # clips (mean of the frame tokens; the demo data has no event annotations): 600 steps gave +0.064 mean balanced
    # accuracy over 10 splits on seed 0 (1200: +0.063); 46-100 s of training on one thread (docs/audio.md "The demo").
    demo = {"max_steps": DEMO_STEPS, "log_every": 100}
    demo_eval = {"splits": DEMO_SPLITS, "test_fraction": 0.5}
    schema = {
        "max_steps": Key(int, None, doc="optimiser steps (lr and EMA schedules span them; default: small 100, "
                                        "paper 58500 as ATST-Frame small)"),
        "batch_size": Key(int, None, doc="clips per step over all processes (default: small 16, paper 1024 = "
                                         "ATST-Frame small's 4 GPUs x 256)"),
        "size": Key(str, "small", choices=tuple(SIZES),
                    doc="small = tiny transformer for CPU; paper = ATST-Frame small's released recipe "
                        "(train_small.sh)"),
        "crop_s": Key(float, None, doc="seconds per crop (default: small 2, paper 10 as anchor_len)"),
        "mask_ratio": Key(float, 0.65, doc="fairseq mask_prob of the block mask (ATST-Frame: 0.65; overlapping "
                                           "spans make the masked fraction smaller)"),
        "mask_len": Key(int, 5, doc="tokens per masked span (ATST-Frame: 5 = 200 ms)"),
        "mixup_alpha": Key(float, 0.4, doc="largest log-mixup-exp weight of the student view (ATST: 0.4; 0 = off)"),
        "freq_warp": Key(bool, True, doc="frequency-only random-resized-crop of the student view"),
        "ema_base": Key(float, None, doc="teacher momentum at step 0, cosine to 1 (default: small 0.99, "
                                         "paper 0.997)"),
        "lr": Key(float, None, doc="AdamW peak lr at batch 256, scaled by global batch/256 (default: small 8e-3, "
                                   "paper 4e-4)"),
        "grad_clip": Key(float, None, doc="gradient norm clipping, 0 = off (default: small 3.0, paper off)"),
        "weight_decay": Key(float, 0.04, doc="AdamW weight decay at step 0; biases and norms: none"),
        "weight_decay_end": Key(float, 0.4, doc="weight decay at the last step, on a cosine"),
        "precision": Key(str, None, choices=("bf16", "fp32"),
                         doc="CUDA autocast (CPU always runs fp32; default: small bf16, paper fp32)"),
        "front_end": Key(str, None, choices=("release", "shards"),
                         doc="release = refuse shards not built with ATST-Frame's front end (40 ms window, HTK "
                             "mel); shards = train on the shards' front end (default: paper release, small shards)"),
        "shuffle_buffer": Key(int, 64, doc="samples each loader worker holds for shuffling"),
    }
    eval_schema = {
        "encoder": Key(str, "teacher", choices=("teacher", "student"), doc="which encoder is probed"),
        "test_fraction": Key(float, 0.3, doc="fraction of source files (per class) on the test side"),
        "epochs": Key(int, 300, doc="full-batch steps of the linear probe"),
        "lr": Key(float, 0.01, doc="AdamW lr of the linear probe"),
        "splits": Key(int, 1, doc="random splits by file; gains are the mean over them (as eval audio)"),
        "protocol": Key(str, "linear", choices=("linear", "events"),
                        doc="linear = clip probe of mean-pooled frames on the labels; events = frame-wise probe on "
                            "events.json, sed_eval event- and segment-based F1 (docs/audio.md \"Frame-level "
                            "evaluation\")"),
    }

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the size's defaults filled in (``Trainer.effective_config``).

        Args:
            config: a resolved configuration.
        """
        out = super().effective_config(config)
        s = SIZES[out["size"]]
        fill = {"max_steps": s.max_steps, "batch_size": s.batch_size, "crop_s": s.crop_s, "ema_base": s.ema_base,
                "lr": s.lr, "grad_clip": s.grad_clip, "precision": s.precision,
                "front_end": "release" if out["size"] == "paper" else "shards"}
        for key, value in fill.items():
            if out.get(key) is None:
                out[key] = value
        return out

    @classmethod
    def default_sync_batchnorm(cls, config: dict[str, Any]) -> bool:
        """ATST-Frame's Lightning Trainer has ``sync_batchnorm=True`` (train.py:23); small is the CPU size.

        Args:
            config: a resolved configuration.
        """
        return config["size"] != "small"

    @classmethod
    def config_sources(cls, config: dict[str, Any]) -> dict[str, str]:
        """Where each value of ``effective_config(config)`` comes from (``Trainer.config_sources``).

        Args:
            config: a resolved configuration.
        """
        size = config.get("size") or "small"
        sh = f"{REL}train_small.sh"
        cpu = "distillkit's choice: the small size is a CPU-minutes recipe (the audio trainer's small network)"
        src = {
            "size": "distillkit's choice: small runs on a CPU; paper is ATST-Frame small (train_small.sh)",
            "mask_ratio": f"{sh}:20 (mask_ratio=0.65), drawn by {REL}random_mask.py:5-15 (fairseq "
                          "compute_mask_indices, static spans, min_masks=2; overlaps allowed: transform.py:15, :89)",
            "mask_len": f"{sh}:26 (mask_len=5 tokens); block masking: {sh}:21 (mask_type=block)",
            "mixup_alpha": f"{REL}transform.py:61 (Mixup(): ratio=0.4, audiossl/transforms/byol_a.py:94) on the "
                           f"student view only ({sh}:17-18 aug_tea=False, aug_stu=True)",
            "freq_warp": f"{REL}transform.py:62 (RandomResizeCrop((1, 1.0), time_scale=(1.0, 1.0)): frequency only)",
            "weight_decay": f"{REL}model.py:115 (cosine_scheduler_step(0.04, 0.4, max_steps))",
            "weight_decay_end": f"{REL}model.py:115 (cosine_scheduler_step(0.04, 0.4, max_steps))",
            "sync_batchnorm": (f"{REL}train.py:23 (Trainer(sync_batchnorm=True))" if size != "small" else
                               f"{cpu}; the release synchronises ({REL}train.py:23)"),
            "front_end": (f"{REL}transform.py:16-18 and train_small.sh:25-27 (n_mels=64, win_length=640: a 40 ms "
                          "window; the README's command and embedding.py:13 use 1024: docs/audio.md \"ATST-Frame\")"
                          if size == "paper" else f"{cpu}: any shards' front end"),
            "shuffle_buffer": "distillkit's choice: streaming shards need a buffer; the release samples an LMDB",
        }
        if size != "paper":
            src.update({k: cpu for k in ("max_steps", "batch_size", "crop_s", "ema_base", "lr", "grad_clip",
                                         "precision")})
            return src
        src.update({
            "max_steps": f"{sh}:11 (max_steps=58500)",
            "batch_size": f"{sh}:3, :15 (nproc=4 x batch_size=256 per GPU; distillkit's batch_size is the global "
                          "batch)",
            "crop_s": f"{sh}:22 (anchor_len=10: one 10 s crop per clip, transform.py:77-82)",
            "ema_base": f"{sh}:13 (ema=0.997), cosine to 1: {REL}model.py:114",
            "lr": f"{sh}:14 (lr=4e-4) x nproc x batch_size_per_gpu / 256: {REL}train.py:14; warm-up {sh}:10 "
                  f"(1950 steps), cosine to 1e-6: {REL}model.py:116",
            "grad_clip": f"{REL}train.py:21-36 (the Trainer sets no gradient_clip_val: no clipping)",
            "precision": f"{REL}train.py:26 (precision=16 commented out: Lightning's fp32)",
        })
        return src

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        if not 0 < config["mask_ratio"] < 1:
            raise ConfigError(where, "mask_ratio", "must be in (0, 1)")
        if config["mask_len"] < 1:
            raise ConfigError(where, "mask_len", "must be >= 1")
        if config["crop_s"] is not None and config["crop_s"] <= 0:
            raise ConfigError(where, "crop_s", "must be > 0")
        if not 0 <= config["mixup_alpha"] < 1:
            raise ConfigError(where, "mixup_alpha", "must be in [0, 1)")
        if config["ema_base"] is not None and not 0 <= config["ema_base"] <= 1:
            raise ConfigError(where, "ema_base", "must be in [0, 1]")
        if config["grad_clip"] is not None and config["grad_clip"] < 0:
            raise ConfigError(where, "grad_clip", "must be >= 0 (0 = off)")

    @classmethod
    def check_shards(cls, shards: Path, config: dict[str, Any]) -> None:
        """Refuse (``ConfigError``, one line) shards this configuration cannot train on: with ``front_end =
        "release"``, shards not built with ATST-Frame's front end. ``train`` calls it first; the CLI can call it
        before it creates the run folder.

        Args:
            shards: the shard directory.
            config: a resolved configuration.
        """
        config = cls.effective_config(config)
        if config["front_end"] == "release":
            check_release_front_end(read_norm(location(shards))[2], location(shards), config["size"])

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        config = self.effective_config(config)
        size = SIZES[config["size"]]
        self.check_shards(location(shards), config)
        batch, steps = config["batch_size"], config["max_steps"]
        method = build_method(config, location(shards), steps)
        if method.crop // TOKEN_FRAMES < config["mask_len"] + 1:
            raise ConfigError(f"train {self.name}", "crop_s", f"{method.crop // TOKEN_FRAMES} tokens per crop: too few "
                              f"for masked spans of {config['mask_len']}")
        np.random.seed(config["seed"])
        ranks = distributed.ranks()
        stream = ShardStream(shards, seed=config["seed"], shuffle_buffer=config["shuffle_buffer"],
                             rank=ranks.rank, world_size=ranks.world_size,
                             required=["logmel.npy", "meta.json"], check=check_sample,
                             transform=FrameCropTransform(method.crop, config["mask_ratio"], config["mask_len"]),
                             strict=strict, on_corrupt=config.get("on_corrupt_shard", "stop"))
        lr = config["lr"] * batch / 256
        loop = LoopConfig(max_steps=steps, device=device, out=Path(out) if out is not None else None, resume=resume,
                          optimizer="adamw", lr=lr, weight_decay=config["weight_decay"],
                          weight_decay_end=config["weight_decay_end"], decay_norm_and_bias=False,
                          warmup_steps=min(size.warmup_steps, max(0, steps // 10)), warmup_from_zero=True,
                          grad_clip=config["grad_clip"] or None, min_lr_ratio=min(1.0, size.final_lr / lr),
                          log_every=config["log_every"], ckpt_every=max(1, steps // 4) if steps >= 8 else 0,
                          bf16=config["precision"] == "bf16", run_config=config, global_batch=batch,
                          sync_batchnorm=bool(config["sync_batchnorm"]))

        def batches() -> Any:
            return make_loader(stream, distributed.rank_batch(batch), collate_frames,
                               num_workers=config["num_workers"], device=device, timeout=600)

        metrics = train_loop(method, batches, loop, batch_size=lambda b: int(b["crop"].shape[0]))
        metrics.update(size=config["size"], batch_size=batch, bad_samples=stream.bad_samples)
        return metrics

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Clip-level linear probe of mean-pooled frame representations (the release's scene embedding,
        ``get_intermediate_layers(scene=True)``, audio_transformer.py:259-281, last block), distilled against
        random init; split by source file as ``eval audio``. ``protocol = "events"``: sound event detection with a
        frame-wise probe of the 40 ms frame tokens (``train.frame_eval``).
        """
        from distillkit.train import audio
        from distillkit.train.frame_eval import atst_frame_features

        opts = self.resolve_eval_options(options or {})
        # eval audio's protocol (checkpoint and front-end checks, split by file, random init against distilled,
        # ``splits``) with this method's network and features
        return audio.evaluate(checkpoint, shards, self.effective_config(config), device, encoder=opts["encoder"],
                              test_fraction=opts["test_fraction"], epochs=opts["epochs"], lr=opts["lr"],
                              splits=opts["splits"], protocol=opts["protocol"], build=build_method,
                              embed=scene_embeddings, features=atst_frame_features,
                              what="mean-pooled frame representations")

    def format_eval(self, result: dict[str, Any]) -> str:
        from distillkit.train import audio

        return audio.format_eval(result)  # the same result layout as eval audio's (``evaluate``)

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        from distillkit.train import audio

        return audio.headline(result)  # mean balanced accuracy over the splits, or the events headline
