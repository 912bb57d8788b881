"""ATST-Clip-style audio teacher-student on log-mel shards (reference/comodo_audio.md part B).

Per clip, two random ``crop_s`` crops (loader, ``train.audio_aug.two_crops``); on the device,
normalisation with ``index.json``'s log-mel mean/std, log-mixup-exp with another clip of the batch
and BYOL-A random-resized-crop. The student is a ViT over 64 x 4 patches (``preprocess.vit``, one
token per 40 ms, ``in_chans=1``) whose CLS token goes through a projector and a predictor; the
teacher is an EMA of the student's encoder and projector (``train.ema``) with a cosine momentum
schedule from ``ema_base`` to 1. Loss ``byol`` (the reference's): ``2 - 2 cos(predictor(student(v_i)),
teacher(v_j))`` over both view orders; or ``dino``: a DINO head and loss (``train.dino``) on the CLS
tokens of the two views. Optimisation, bf16, checkpoints, resume and the run record come from the
shared loop (``train.loop``).

Sizes: ``small`` = ViT 96-d x 2 blocks (3 heads), projector/predictor 256 -> 64, batch 16, 2 s crops,
for CPU runs; ``paper`` = ATST small's released recipe (Audio-WestlakeU/audiossl
audiossl/methods/atst/train_small.sh: ViT-S 384-d x 12, 6 heads, no qkv bias, stochastic depth 0.1;
bias-free projector 4096 -> 256 and predictor; EMA 0.99 -> 1; global batch 4 x 384; lr 5e-4; 1300 warm-up
steps of 39100; 9 s crops; fp32, no clipping); ``base`` = ATST base's (train_base.sh: ViT-B 768-d x 12,
EMA 0.9995 -> 1, global batch 6 x 256, lr 2e-4, 15860 warm-up steps of 318000, 6 s crops). Every value
with its file and line: ``AudioTrainer.config_sources`` and docs/audio.md "Released vs distillkit".
Optimisation as ATST: AdamW with DINO's parameter groups (biases and norms undecayed), weight decay on a
cosine from 0.04 to 0.4, lr ``lr * global batch / 256`` (ATST's train.py:12) with warm-up and cosine; the EMA
update follows each optimiser step (the loop's ``after_step``). Deviations from the released recipe
(docs/audio.md): mixup partners come from the batch instead of a per-worker memory bank, and log-mels are
standardised with the dataset's mean/std instead of ATST's fixed min/max scaling to [-1, 1].

Evaluation (``distillkit eval audio``): clip embeddings (CLS and mean patch token, concatenated, of
the teacher encoder by default, averaged over ``crop_s`` windows of the segment's audio) of every
labelled segment; a linear probe (``train.clip_probe``) on a split by source file, for the distilled
encoder and the same encoder at random init. ``--protocol verification`` (``train.audio_verification``) scores
speaker-verification trials instead: one embedding per file, cosine scoring, EER and minDCF, distilled against
random init on the same trials.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.messages import one_line
from distillkit.pipelines.manifest import Key
from distillkit.preprocess.vit import ViT
from distillkit.remote import location
from distillkit.train import distributed
from distillkit.train.audio_aug import (
    audio_frames,
    collate_views,
    crop_frames,
    log_mixup_exp,
    random_resized_crop,
    two_crops,
    window,
)
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.clip_probe import format_probe_comparison, group_split, linear_probe
from distillkit.train.dino import DINOHead, DINOLoss
from distillkit.train.ema import cosine_momentum, ema_update
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import ShardStream, make_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioSize:
    """Network and optimiser settings of one ``size``."""

    embed_dim: int
    depth: int
    num_heads: int
    proj_hidden: int
    proj_out: int
    dino_out: int
    batch_size: int  # global: over all processes
    ema_base: float
    lr: float  # at batch 256 (scaled by global batch / 256)
    warmup_steps: int
    crop_s: float
    max_steps: int = 100
    qkv_bias: bool = True
    drop_path: float = 0.0
    head_bias: bool = True  # biases of the projector/predictor Linear layers
    grad_clip: float = 3.0  # 0 = off
    precision: str = "bf16"
    final_lr: float = 0.0  # the cosine's end (absolute, as the release's cosine_scheduler_step)
    # both views through the networks in one forward (the heads' BatchNorm over 2B samples), as the release;
    # small keeps one forward per view: the demo's recipe, measured so (joint: +0.017 instead of +0.065)
    joint_views: bool = False


# paper and base are the two released ATST-Clip recipes (Audio-WestlakeU/audiossl at ec3a14d; docs/audio.md
# "Released vs distillkit" cites every line): ATST small (audiossl/methods/atst/train_small.sh) and ATST base
# (train_base.sh). The release's global batch is 4 GPUs x 384 (small) and 6 GPUs x 256 (base), both 1536.
_ATST = dict(proj_hidden=4096, proj_out=256, dino_out=8192, qkv_bias=False, drop_path=0.1, head_bias=False,
             grad_clip=0.0, precision="fp32", final_lr=1e-6, joint_views=True)
SIZES = {
    # small: chosen on medium synthetic data (docs/audio.md): 2 s crops at batch 16 (800 steps) beat random
    # init in CPU minutes, where 6 s crops at batch 8 (300 steps, several learning rates) did not.
    "small": AudioSize(96, 2, 3, 256, 64, 256, 16, 0.99, 8e-3, 10, 2.0),
    "paper": AudioSize(384, 12, 6, batch_size=1536, ema_base=0.99, lr=5e-4, warmup_steps=1300, crop_s=9.0,
                       max_steps=39100, **_ATST),
    "base": AudioSize(768, 12, 12, batch_size=1536, ema_base=0.9995, lr=2e-4, warmup_steps=15860, crop_s=6.0,
                      max_steps=318000, **_ATST),
}


def mlp(in_dim: int, hidden: int, out: int, bias: bool = True) -> nn.Sequential:
    """BYOL's projector/predictor: Linear -> BatchNorm -> ReLU -> Linear.

    Args:
        in_dim: input width.
        hidden: hidden width.
        out: output width.
        bias: Linear biases (ATST's ``build_mlp`` has none: audiossl/models/atst/byol.py:12).
    """
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=bias))


class Branch(nn.Module):
    """Encoder + head: spectrogram (B, 1, n_mels, T) -> CLS (B, D) -> head output."""

    def __init__(self, encoder: ViT, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder.forward_features(x).cls)


class AudioTeacherStudent(nn.Module):
    """Student branch (+ predictor for BYOL), EMA teacher branch, and the on-device augmentation.

    Args:
        size: a key of ``SIZES``.
        n_mels: mel bands (the patch height).
        crop: crop length in frames.
        loss: ``"byol"`` or ``"dino"``.
        mean: dataset log-mel mean (dB), from ``index.json``.
        std: dataset log-mel std (dB).
        total_steps: steps of the momentum schedule.
        mixup_alpha: largest log-mixup-exp weight (0 = off).
        rrc: apply random-resized-crop.
        ema_base: teacher momentum at step 0 (None: the size's).
        front_end: the training shards' front end (``read_norm``), saved in the state dict (buffer
            ``front_end``, ``encode_front_end``) so ``eval`` can refuse shards with another one.
    """

    def __init__(self, size: str, n_mels: int, crop: int, loss: str = "byol", mean: float = 0.0, std: float = 1.0,
                 total_steps: int = 100, mixup_alpha: float = 0.4, rrc: bool = True, ema_base: float | None = None,
                 front_end: dict[str, Any] | None = None):
        super().__init__()
        cfg = SIZES[size]
        self.loss_kind, self.total_steps = loss, total_steps
        self.joint_views = cfg.joint_views
        self.mixup_alpha, self.rrc = mixup_alpha, rrc
        self.ema_base = cfg.ema_base if ema_base is None else ema_base
        encoder = ViT(patch=(n_mels, 4), in_chans=1, embed_dim=cfg.embed_dim, depth=cfg.depth,
                      num_heads=cfg.num_heads, img_size=(n_mels, crop), drop_path_rate=cfg.drop_path)
        if not cfg.qkv_bias:
            # ATST's AST_small/AST_base build their blocks with qkv_bias=False
            # (audiossl/models/atst/audio_transformer.py:368, :371); preprocess.vit always has one, so drop it
            for blk in encoder.blocks:
                blk.attn.qkv.bias = None
        if loss == "byol":
            head: nn.Module = mlp(cfg.embed_dim, cfg.proj_hidden, cfg.proj_out, cfg.head_bias)
            self.predictor: nn.Module | None = mlp(cfg.proj_out, cfg.proj_hidden, cfg.proj_out, cfg.head_bias)
            self.dino_loss: DINOLoss | None = None
        elif loss == "dino":
            head = DINOHead(cfg.embed_dim, cfg.dino_out, hidden_dim=cfg.proj_hidden,
                            bottleneck_dim=min(256, cfg.proj_hidden))
            self.predictor = None
            self.dino_loss = DINOLoss(cfg.dino_out, teacher_temp=0.07, warmup_teacher_temp=0.04,
                                      warmup_steps=max(1, total_steps // 10))
        else:
            raise ValueError(f"unknown loss {loss!r} (byol | dino)")
        self.student = Branch(encoder, head)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        # a tensor, not extra state: the state dict stays tensors only (DDP broadcasts it, tools clone it)
        self.register_buffer("front_end", encode_front_end(front_end))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint written before the front end was recorded (issue 20) has no ``front_end``: it resumes and
        # evaluates as "not recorded" instead of failing the strict load.
        state_dict.setdefault(prefix + "front_end", encode_front_end(None))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def normalise(self, db: Tensor) -> Tensor:
        """(dB - dataset mean) / dataset std."""
        return (db - self.mean) / self.std

    def views(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The two augmented, normalised views, each (B, 1, n_mels, crop)."""
        x = batch["views"].float()  # (B, 2, F, T) dB
        out = []
        for v in (x[:, 0:1], x[:, 1:2]):
            v = self.normalise(v)
            if self.training:
                v = log_mixup_exp(v, self.mixup_alpha)
            if self.training and self.rrc:
                v = random_resized_crop(v)
            out.append(v)
        return out[0], out[1]

    def after_step(self, step: int, max_steps: int) -> None:
        """The shared loop calls this after each optimiser step: the EMA teacher follows the student."""
        ema_update(self.teacher, self.student, cosine_momentum(step - 1, self.total_steps, self.ema_base, 1.0))
        self.ema_step.fill_(step)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        step = int(self.ema_step)
        v1, v2 = self.views(batch)
        if self.joint_views:
            # Both views in one forward, as ATST's MultiCropWrapper concatenates equal-length crops
            # (audiossl/models/atst/byol.py:113-121): the projector's and predictor's BatchNorm then normalise
            # over the 2B samples of both views, not over each view's B apart.
            both = torch.cat([v1, v2])
            with torch.no_grad():
                t1, t2 = self.teacher(both).chunk(2)
            s1, s2 = self.student(both).chunk(2)
        else:
            with torch.no_grad():
                t1, t2 = self.teacher(v1), self.teacher(v2)
            s1, s2 = self.student(v1), self.student(v2)
        if self.loss_kind == "byol":
            assert self.predictor is not None
            if self.joint_views:
                p1, p2 = self.predictor(torch.cat([s1, s2])).chunk(2)
            else:
                p1, p2 = self.predictor(s1), self.predictor(s2)
            return 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))
        assert self.dino_loss is not None
        return self.dino_loss.multicrop([s1, s2], [t1, t2], step)

    @torch.no_grad()
    def embed(self, spec: Tensor, which: str = "teacher") -> Tensor:
        """Clip embedding of normalised windows: (W, 1, n_mels, crop) -> (2D,) mean over windows of
        [CLS, mean patch token].

        Args:
            spec: windows of one clip, normalised.
            which: ``"teacher"`` or ``"student"`` encoder.
        """
        enc = (self.teacher if which == "teacher" else self.student).encoder
        out = enc.forward_features(spec)
        feats = torch.cat([out.cls, out.patches.flatten(1, 2).mean(1)], dim=1)
        return feats.mean(0)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss, ``2 - 2 cos(p, z)`` averaged over the batch (z detached).

    Args:
        p: (B, d) student predictions.
        z: (B, d) teacher projections.
    """
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()


# --------------------------------------------------------------------------- data
FRONT_END_KEYS = ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax", "top_db", "mel_scale")


def read_norm(shards: Path) -> tuple[float, float, dict[str, Any]]:
    """(log-mel mean, std, front end) from a shard directory's index.json; the front end is every
    ``FRONT_END_KEYS`` setting of the manifest it was built with (``LogMelConfig``'s defaults where an older
    manifest lacks one: ``mel_scale`` was added later and "slaney" is what those shards hold).

    Args:
        shards: an audio shard directory.
    """
    from distillkit.pipelines.shards import load_index
    from distillkit.preprocess.logmel import LogMelConfig

    # the checked index: a library caller gets the same refusal of a malformed or edited index as the trainers
    index = load_index(location(shards))
    stats = index.get("stats", {})
    if "logmel_mean" not in stats or "logmel_std" not in stats:
        raise ValueError(f"{shards}/index.json: no logmel_mean/logmel_std statistics (not audio shards?)")
    stages = index.get("manifest", {}).get("stages", {})
    lm = {**stages.get("logmel", {}), "sample_rate": stages.get("audio", {}).get("sample_rate", 16000)}
    default = LogMelConfig()
    front = {k: lm.get(k, getattr(default, k)) for k in FRONT_END_KEYS}
    return float(stats["logmel_mean"]), max(float(stats["logmel_std"]), 1e-3), front


MEL_SCALES = ("slaney", "htk")


def encode_front_end(front: dict[str, Any] | None) -> Tensor:
    """``read_norm``'s front end as a float64 tensor in ``FRONT_END_KEYS`` order (``mel_scale`` by its index in
    ``MEL_SCALES``); all NaN for None (not recorded).

    Args:
        front: the front end, or None.
    """
    if not front:
        return torch.full((len(FRONT_END_KEYS),), float("nan"), dtype=torch.float64)
    values = [MEL_SCALES.index(front[k]) if k == "mel_scale" else float(front[k]) for k in FRONT_END_KEYS]
    return torch.tensor(values, dtype=torch.float64)


def decode_front_end(t: Tensor) -> dict[str, Any]:
    """Inverse of ``encode_front_end``; ``{}`` when not recorded.

    Args:
        t: the ``front_end`` buffer.
    """
    if t.numel() != len(FRONT_END_KEYS) or bool(torch.isnan(t).any()):
        return {}
    # numbers come back as floats: 16000.0 == 16000, so comparisons with read_norm's values hold
    return {k: MEL_SCALES[int(v)] if k == "mel_scale" else v
            for k, v in zip(FRONT_END_KEYS, t.tolist(), strict=True)}


def check_front_end(trained: dict[str, Any], shards: Path) -> None:
    """Raise ``ConfigError`` (one line, exit 2 from the CLI) when ``shards`` were not built with the ``trained``
    front end: an encoder trained on one spectrogram (mel scale, bands, hop, ...) reads another as noise, silently.

    Args:
        trained: the checkpoint's front end (``decode_front_end`` of its ``front_end`` buffer); empty: not
            recorded, no check.
        shards: an audio shard directory to evaluate.
    """
    front = read_norm(shards)[2]
    diff = {k: (trained[k], front.get(k)) for k in trained if front.get(k) != trained[k]}
    if diff:
        def show(v: Any) -> str:
            return f"{v:g}" if isinstance(v, float) else repr(v)

        said = ", ".join(f"{k} {show(b)} (checkpoint: {show(a)})" for k, (a, b) in diff.items())
        raise ConfigError(shards, "stages.logmel", f"front end differs from the checkpoint's training shards: "
                          f"{said}; rebuild them with the training manifest's stages.audio/stages.logmel")


class CropTransform:
    """The loader's per-sample transform: two random crops of the audio frames (picklable)."""

    def __init__(self, crop: int):
        self.crop = crop

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator, gen: torch.Generator) -> dict[str, Any]:
        return {"views": two_crops(audio_frames(sample["logmel.npy"], sample["meta.json"]), self.crop, rng)}


def check_sample(sample: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a sample the trainer cannot use."""
    spec = sample["logmel.npy"]
    if not isinstance(spec, np.ndarray) or spec.ndim != 2:
        raise ValueError("logmel.npy is not a 2-d array")
    if not isinstance(sample["meta.json"], dict) or "duration_s" not in sample["meta.json"]:
        raise ValueError("meta.json lacks duration_s")


def build_method(config: dict[str, Any], shards: Path, total_steps: int) -> AudioTeacherStudent:
    """The method for ``config`` with the normalisation of ``shards``, seeded (same seed = same init).

    Args:
        config: a resolved audio trainer configuration.
        shards: the shard directory (index.json statistics and front end).
        total_steps: length of the momentum schedule.
    """
    mean, std, front = read_norm(shards)
    crop = crop_frames(config["crop_s"] or SIZES[config["size"]].crop_s, front["sample_rate"], front["hop_length"])
    torch.manual_seed(config["seed"])
    return AudioTeacherStudent(config["size"], front["n_mels"], crop, config["loss"], mean, std, total_steps,
                               config["mixup_alpha"], config["rrc"], config["ema_base"], front)


# --------------------------------------------------------------------------- trainer
DEMO_STEPS = 1800
DEMO_SPLITS = 10


class AudioTrainer(Trainer):
    name = "audio"
    pipeline = "audio"
    summary = "ATST-Clip-style teacher-student (BYOL or DINO loss, EMA teacher) on log-mel shards"
    schema = {
        "max_steps": Key(int, None, doc="optimiser steps (the lr and EMA momentum schedules span them; default: "
                                        "small 100, paper 39100 and base 318000 as ATST small/base)"),
        "batch_size": Key(int, None, doc="clips per step over all processes, 2 views each (default: small 16, "
                                         "paper/base 1536 = ATST's 4 x 384 and 6 x 256 GPUs x clips)"),
        "size": Key(str, "small", choices=tuple(SIZES),
                    doc="small = tiny ViT for CPU; paper = ATST small's released recipe (ViT-S, train_small.sh); "
                        "base = ATST base's (ViT-B, train_base.sh)"),
        "loss": Key(str, "byol", choices=("byol", "dino"), doc="BYOL (ATST's) or DINO loss on the CLS token"),
        "crop_s": Key(float, None, doc="seconds per view (default: small 2, paper 9 and base 6 as ATST small/base)"),
        "mixup_alpha": Key(float, 0.4, doc="largest log-mixup-exp weight (ATST: 0.4; 0 = off)"),
        "rrc": Key(bool, True, doc="BYOL-A random-resized-crop on the device"),
        "ema_base": Key(float, None, doc="teacher momentum at step 0, cosine to 1 (default: small/paper 0.99, "
                                         "base 0.9995)"),
        "lr": Key(float, None, doc="AdamW peak lr at batch 256, scaled by global batch/256 (default: small 8e-3, "
                                   "paper 5e-4, base 2e-4)"),
        "grad_clip": Key(float, None, doc="gradient norm clipping, 0 = off (default: small 3.0; paper/base off as "
                                          "ATST)"),
        "weight_decay": Key(float, 0.04, doc="AdamW weight decay at step 0 (ATST: 0.04); biases and norms: none"),
        "weight_decay_end": Key(float, 0.4, doc="weight decay at the last step, on a cosine (ATST: 0.4)"),
        "precision": Key(str, None, choices=("bf16", "fp32"),
                         doc="CUDA autocast (CPU always runs fp32; default: small bf16, paper/base fp32 as ATST)"),
        "shuffle_buffer": Key(int, 64, doc="samples each loader worker holds for shuffling"),
    }
    eval_schema = {
        "encoder": Key(str, "teacher", choices=("teacher", "student"), doc="which encoder is probed"),
        "test_fraction": Key(float, 0.3, doc="fraction of source files (per class) on the test side"),
        "epochs": Key(int, 300, doc="full-batch steps of the linear probe"),
        "lr": Key(float, 0.01, doc="AdamW lr of the linear probe"),
        "splits": Key(int, 1, doc="random train/test file splits (seeds seed..seed+splits-1); the gains are their "
                                  "mean, the table shows the first"),
        "protocol": Key(str, "linear", choices=("linear", "verification", "events"),
                        doc="linear = probe on the labels; verification = speaker verification trials, cosine "
                            "scoring, EER and minDCF (docs/audio.md \"Speaker verification\"); events = frame-wise "
                            "probe of patch tokens on events.json, sed_eval F1 (docs/audio.md \"Frame-level "
                            "evaluation\")"),
        "trials": Key("existing_path", None, doc="verification: a trials file, 'label enrol test' per line (1/0, "
                                                 "paths relative to source.root); default: drawn from the labels"),
        "n_trials": Key(int, 2000, doc="verification: trials drawn from the labels, half same-speaker"),
        "p_target": Key(float, 0.05, doc="verification: minDCF's target prior, C_miss = C_fa = 1 (VoxSRC's)"),
        "trials_seed": Key(int, 0, doc="verification: seeds the trials drawn from the labels (not the training seed, "
                                       "so checkpoints of different seeds meet the same trials)"),
    }

    # `distillkit demo` (docs/audio.md "The demo"): DEMO_STEPS steps of the small size on the synth size "demo"
    # (150 files of one 10 s segment each); the probe holds out half the files (75 test segments, where 30%
    # left 45 and one segment was 0.022) and its figure is the mean over DEMO_SPLITS random splits by file.
    # Figures over three seeds: docs/training.md "The demo".
    demo = {"max_steps": DEMO_STEPS, "log_every": 100}
    demo_eval = {"splits": DEMO_SPLITS, "test_fraction": 0.5}

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the size's defaults filled in (``Trainer.effective_config``).

        Args:
            config: a resolved configuration.
        """
        out = super().effective_config(config)
        s = SIZES[out["size"]]
        fill = {"max_steps": s.max_steps, "batch_size": s.batch_size, "crop_s": s.crop_s, "ema_base": s.ema_base,
                "lr": s.lr, "grad_clip": s.grad_clip, "precision": s.precision}
        for key, value in fill.items():
            if out.get(key) is None:
                out[key] = value
        return out

    @classmethod
    def default_sync_batchnorm(cls, config: dict[str, Any]) -> bool:
        """ATST's Lightning Trainer has ``sync_batchnorm=True`` (audiossl/methods/atst/train.py:22) at both of its
        sizes (paper, base); small is distillkit's CPU size, where per-process BatchNorm is the plain case.

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
        rel = "Audio-WestlakeU/audiossl audiossl/methods/atst/"
        sh = {"paper": f"{rel}train_small.sh", "base": f"{rel}train_base.sh"}.get(size)
        cpu = "distillkit's choice: the small size is a CPU-minutes recipe (docs/audio.md)"
        src = {
            "size": "distillkit's choice: small runs on a CPU; paper/base are ATST small/base",
            "loss": "Audio-WestlakeU/audiossl audiossl/models/atst/byol.py:61-78 (BYOL loss over both view orders); "
                    "dino is distillkit's option",
            "mixup_alpha": f"{rel}transform.py:37, :43 (Mixup(): ratio=0.4 default, audiossl/transforms/byol_a.py:94)",
            "rrc": f"{rel}transform.py:38, :44 (RandomResizeCrop((1, 1.5)))",
            "weight_decay": f"{rel}model.py:21 (cosine_scheduler_step(0.04, 0.4, max_steps))",
            "weight_decay_end": f"{rel}model.py:21 (cosine_scheduler_step(0.04, 0.4, max_steps))",
            "sync_batchnorm": (f"{rel}train.py:22 (Trainer(sync_batchnorm=True))" if size != "small" else
                               f"{cpu}; the release synchronises at every size ({rel}train.py:22)"),
            "shuffle_buffer": "distillkit's choice: streaming shards need a buffer; the release samples an LMDB",
        }
        if sh is None:
            src.update({k: cpu for k in ("max_steps", "batch_size", "crop_s", "ema_base", "lr", "grad_clip",
                                         "precision")})
            return src
        small = size == "paper"
        src.update({
            "max_steps": f"{sh}:{2 if small else 3} (max_steps={39100 if small else 318000})",
            "batch_size": (f"{sh}:{'3, :7' if small else '4, :8'} (batch_size={384 if small else 256} per GPU x "
                           f"nproc={4 if small else 6}; "
                           "distillkit's batch_size is the global batch)"),
            "crop_s": (f"{sh}:12 (train_len=9.0)" if small else
                       f"{rel}data.py:12 (train_len=6.0 default; train_base.sh sets none)"),
            "ema_base": f"{sh}:{5 if small else 6} (ema={0.99 if small else 0.9995}), cosine to 1: {rel}model.py:20",
            "lr": (f"{sh}:{6 if small else 7} (lr={5e-4 if small else 2e-4}) x nproc x batch_size_per_gpu / 256: "
                   f"{rel}train.py:12"),
            "grad_clip": f"{rel}train.py:18-32 (the Trainer sets no gradient_clip_val: no clipping)",
            "precision": f"{rel}train.py:18-32 (the Trainer sets no precision: Lightning's fp32)",
        })
        return src

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        if config["grad_clip"] is not None and config["grad_clip"] < 0:
            raise ConfigError(where, "grad_clip", "must be >= 0 (0 = off)")
        if config["crop_s"] is not None and config["crop_s"] <= 0:
            raise ConfigError(where, "crop_s", "must be > 0")
        if config["mixup_alpha"] < 0 or config["mixup_alpha"] >= 1:
            raise ConfigError(where, "mixup_alpha", "must be in [0, 1)")
        if config["ema_base"] is not None and not 0 <= config["ema_base"] <= 1:
            raise ConfigError(where, "ema_base", "must be in [0, 1]")

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        config = self.effective_config(config)  # every size default explicit, in the checkpoint and log too
        size = SIZES[config["size"]]
        batch = config["batch_size"] or size.batch_size
        steps = config["max_steps"]
        method = build_method(config, location(shards), steps)
        np.random.seed(config["seed"])
        ranks = distributed.ranks()  # under torchrun each rank reads its own shards
        stream = ShardStream(shards, seed=config["seed"], shuffle_buffer=config["shuffle_buffer"],
                             rank=ranks.rank, world_size=ranks.world_size,
                             required=["logmel.npy", "meta.json"], check=check_sample,
                             transform=CropTransform(method.student.encoder.base_grid[1] * 4), strict=strict,
                             on_corrupt=config.get("on_corrupt_shard", "stop"))
        lr = (config["lr"] or size.lr) * batch / 256
        loop = LoopConfig(max_steps=steps, device=device, out=Path(out) if out is not None else None, resume=resume,
                          optimizer="adamw", lr=lr, weight_decay=config["weight_decay"],
                          weight_decay_end=config["weight_decay_end"], decay_norm_and_bias=False,
                          warmup_steps=min(size.warmup_steps, max(0, steps // 10)),
                          grad_clip=config["grad_clip"] or None, min_lr_ratio=min(1.0, size.final_lr / lr),
                          log_every=config["log_every"], ckpt_every=max(1, steps // 4) if steps >= 8 else 0,
                          bf16=config["precision"] == "bf16", run_config=config, global_batch=batch,
                          sync_batchnorm=bool(config["sync_batchnorm"]))

        def batches() -> Any:
            return make_loader(stream, distributed.rank_batch(batch), collate_views,
                               num_workers=config["num_workers"], device=device,
                               timeout=600)

        metrics = train_loop(method, batches, loop, batch_size=lambda b: int(b["views"].shape[0]))
        metrics.update(size=config["size"], loss_kind=config["loss"], batch_size=batch, bad_samples=stream.bad_samples)
        return metrics

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        options = self.resolve_eval_options(options or {})
        return evaluate(checkpoint, shards, config, device, **options)

    def format_eval(self, result: dict[str, Any]) -> str:
        return format_eval(result)

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        """The probe's balanced accuracy (mean recall over the classes on the test side), averaged over the
        evaluation's splits by file: one split's test side is a few dozen segments, so its figure moves by
        1/n per segment, and the mean over several splits is the number worth one line.

        Args:
            result: ``evaluate``'s result (``random_init``; ``distilled`` when a checkpoint was evaluated).

        Returns:
            ``{"metric", "distilled", "random", "gain"}``; ``distilled`` and ``gain`` are None without a
            checkpoint.
        """
        return headline(result)


# --------------------------------------------------------------------------- evaluation
def load_labelled(shards: list[Path]) -> tuple[list[np.ndarray], list[str], list[str], list[str]]:
    """Audio frames (stored dtype: float16 for the pipeline's shards), labels, source files and keys of every
    labelled segment, in index order; unlabelled segments are skipped undecoded (``train.audio_segments``, the
    reader ``eval audio --protocol verification`` shares).

    Args:
        shards: audio shard directories.
    """
    from distillkit.train.audio_segments import has_label, read_segments

    specs, labels, groups, keys = [], [], [], []
    for d in shards:
        for seg in read_segments(location(d), f"audio eval: reading {Path(d).name}", select=has_label):
            specs.append(seg.frames)  # the stored dtype (float16): the embeddings convert one segment at a time
            labels.append(seg.label)
            # files cut from one recording share a group (labels.csv's group column): never split them
            groups.append(f"{d}:{seg.meta.get('group') or seg.meta['source']}")
            keys.append(seg.key)
    if not specs:
        raise ValueError(f"{', '.join(map(str, shards))}: no segment has label.txt; cannot evaluate "
                         "(put a labels.csv with path,label under the source root and rebuild)")
    return specs, labels, groups, keys


@torch.no_grad()
def clip_embeddings(method: AudioTeacherStudent, specs: list[np.ndarray], crop: int, device: str,
                    which: str = "teacher") -> np.ndarray:
    """(N, 2D) clip embeddings: each segment's audio cut into ``crop``-frame windows (the last one
    wrapped cyclically), normalised, embedded and averaged.

    Args:
        method: the teacher-student (eval mode is set here).
        specs: per segment, (n_mels, n) dB frames that hold audio (any float dtype; float32 here).
        crop: window length in frames (the training crop).
        device: torch device.
        which: ``"teacher"`` or ``"student"`` encoder.
    """
    from distillkit.train.progress import progress

    method.eval().to(device)
    out = []
    for spec in progress(specs, desc=f"audio eval: {which} embeddings", unit="segment"):
        # one segment at a time to float32 (the network normalises in float32): the list keeps the stored
        # float16, half the memory of converting every segment first
        spec = np.asarray(spec, dtype=np.float32)
        n = spec.shape[1]
        starts = list(range(0, max(n - crop, 0) + 1, crop))
        if starts[-1] + crop < n:
            starts.append(n - crop)
        wins = np.stack([window(spec, s, crop) for s in starts])[:, None]
        x = method.normalise(torch.from_numpy(wins).to(device))
        out.append(method.embed(x, which).float().cpu().numpy())
    return np.stack(out)


def eval_method(config: dict[str, Any], shards: list[Path], state: dict[str, Any] | None,
                weights: dict[str, Any] | None, checkpoint: Path | None,
                build: Callable[[dict[str, Any], Path, int], nn.Module] = build_method) -> Any:
    """The network an evaluation embeds with: the checkpoint's ``weights`` (distilled), or the seeded random init
    (``weights`` None) read with the checkpoint's normalisation when there is one (``state``).

    Args:
        config: the training configuration.
        shards: the evaluated shard directories (normalisation when there is no checkpoint).
        state: the checkpoint's model state dict, or None.
        weights: the state dict to load (``state`` for the distilled run), or None for random init.
        checkpoint: the checkpoint's path (for messages).
        build: ``build_method`` of the trainer (config, shards, total steps): this module's, or another audio
            method's with ``mean``/``std`` buffers (``train.atst_frame``).
    """
    method = build(config, location(shards[0]), max(1, config["max_steps"] or 1))
    if weights is not None:
        try:
            method.load_state_dict(weights)
        except RuntimeError as exc:  # e.g. a paper/base checkpoint of the recipe before issue 20 (qkv bias)
            raise ConfigError(checkpoint, "size", f"the checkpoint's weights do not fit the {config['size']!r} "
                              f"network of this version ({one_line(exc)}); it was written by another recipe: "
                              "docs/audio.md \"Released vs distillkit\"") from None
    elif state is not None:
        # the random-init baseline reads its input exactly as the distilled encoder does: with the training
        # shards' mean/std from the checkpoint, not the evaluated shards' own (a gain must come from the
        # weights, not from a different normalisation)
        method.mean.copy_(state["mean"])
        method.std.copy_(state["std"])
    return method


def eval_runs(state: dict[str, Any] | None) -> list[tuple[str, dict[str, Any] | None]]:
    """The networks every audio protocol compares, in order: ``("random_init", None)``, then
    ``("distilled", state)`` when there is a checkpoint (``eval_method``'s ``weights``).

    Args:
        state: the checkpoint's model state dict, or None (random init only).
    """
    return [("random_init", None)] + ([("distilled", state)] if state is not None else [])


def add_gains(result: dict[str, Any], metrics: tuple[str, ...], higher_is_better: bool = True,
              per_split: dict[str, list[dict[str, float]]] | None = None) -> None:
    """Set ``result["gain_<metric>"]`` for each metric when ``result`` has a distilled row: distilled minus random
    init, or random minus distilled for a lower-is-better metric (EER), so a positive gain always means that
    distillation helps.

    Args:
        result: the protocol's result, with ``random_init`` and (with a checkpoint) ``distilled`` rows.
        metrics: the metrics of those rows to compare.
        higher_is_better: the metrics' direction.
        per_split: per network, the rows of several splits: the gain is the mean of the per-split gains (None: the
            result's own rows).
    """
    if "distilled" not in result:
        return
    rows = per_split or {name: [result[name]] for name in ("random_init", "distilled")}
    sign = 1.0 if higher_is_better else -1.0
    for metric in metrics:
        pairs = zip(rows["distilled"], rows["random_init"], strict=True)
        result[f"gain_{metric}"] = float(np.mean([sign * (d[metric] - r[metric]) for d, r in pairs]))


def evaluate(checkpoint: Path | None, shards: list[Path], config: dict[str, Any], device: str = "cpu",
             encoder: str = "teacher", test_fraction: float = 0.3, epochs: int = 300, lr: float = 0.01,
             splits: int = 1, protocol: str = "linear", trials: str | None = None, n_trials: int = 2000,
             p_target: float = 0.05, trials_seed: int = 0,
             build: Callable[[dict[str, Any], Path, int], nn.Module] = build_method,
             embed: Callable[[Any, list[np.ndarray], str, str], np.ndarray] | None = None,
             features: Callable[[Any, np.ndarray, str, str], np.ndarray] | None = None,
             what: str = "clip embeddings") -> dict[str, Any]:
    """Linear probe of clip embeddings (or, with ``protocol = "verification"``, speaker verification:
    ``train.audio_verification``): the distilled encoder against the same encoder at random init.

    Args:
        checkpoint: a checkpoint of ``AudioTrainer.train`` (None: random init only).
        shards: audio shard directories with ``label.txt`` fields.
        config: the training configuration (size, seed, crop, loss).
        device: torch device for the embeddings (the probe runs on CPU).
        encoder: ``"teacher"`` or ``"student"``.
        test_fraction: fraction of source files per class on the test side.
        epochs: full-batch steps of the probe.
        lr: learning rate of the probe.
        splits: random splits by file; with more than one, ``gain_*`` are the means over them (a test side of a
            few dozen segments moves by 1/n per segment) and ``splits`` lists each split's accuracies.
        protocol: ``"linear"`` (the probe), ``"verification"`` or ``"events"`` (``train.frame_eval``).
        trials: verification: a trials file (None: trials drawn from the labels).
        n_trials: verification: trials drawn from the labels.
        p_target: verification: minDCF's target prior.
        trials_seed: verification: seeds the trials drawn from the labels.
        build: the trainer's ``build_method`` (``eval_method``): this module's, or another audio method's
            (``train.atst_frame``).
        embed: linear: (method, specs, device, encoder) -> (N, D) clip features (None: ``clip_embeddings`` with
            the training crop).
        features: events: ``train.frame_eval``'s frame features (None: ``clip_patch_features``).
        what: linear: the features, in words, for the protocol line.
    """
    if splits < 1:
        raise ValueError("splits must be >= 1")
    if protocol not in ("linear", "verification", "events"):
        raise ConfigError("eval audio", "protocol", f"unknown protocol {protocol!r} (linear | verification | events)")
    if trials is not None and protocol != "verification":
        raise ConfigError("eval audio", "trials", "a trials file is read by --protocol verification only")
    state = None
    if checkpoint is not None:
        state = load_checkpoint(Path(checkpoint), map_location="cpu")["model"]
        trained = decode_front_end(state["front_end"]) if "front_end" in state else {}
        if not trained:  # a checkpoint written before the front end was recorded: nothing to compare
            log.warning("%s: no recorded front end; not checking the shards against it", checkpoint)
        for d in shards:
            check_front_end(trained, location(d))
    if protocol == "verification":
        from distillkit.train.audio_verification import evaluate_verification

        return evaluate_verification(checkpoint, state, shards, config, device, encoder=encoder, trials=trials,
                                     n_trials=n_trials, p_target=p_target, trials_seed=trials_seed)
    if protocol == "events":
        from distillkit.train.frame_eval import clip_patch_features, evaluate_events

        return evaluate_events(checkpoint, state, [location(s) for s in shards], config, device, build,
                               features or clip_patch_features, encoder=encoder, test_fraction=test_fraction,
                               epochs=epochs, lr=lr, splits=splits,
                               what="frame tokens" if features else "patch tokens (mean over frequency)")
    specs, labels, groups, _ = load_labelled([location(s) for s in shards])
    names = sorted(set(labels))
    y = np.array([names.index(label) for label in labels])
    cuts = [group_split(groups, test_fraction, seed=config["seed"] + k, labels=labels) for k in range(splits)]
    train_idx, test_idx = cuts[0]
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"{len(set(groups))} labelled source file(s): too few for a train/test split by file")
    result: dict[str, Any] = {
        "protocol": (f"linear probe of {encoder} {what}; {len(set(groups))} source files, "
                     f"{len(labels)} segments, split by file ({len(train_idx)} train / {len(test_idx)} test "
                     f"segments), {len(names)} classes, {epochs} full-batch AdamW steps"),
    }
    per_split: dict[str, list[dict[str, float]]] = {}
    for name, weights in eval_runs(state):
        method = eval_method(config, shards, state, weights, checkpoint, build=build)
        if embed is None:
            emb = clip_embeddings(method, specs, method.student.encoder.base_grid[1] * 4, device, encoder)
        else:
            emb = embed(method, specs, device, encoder)
        probes = [linear_probe(emb[tr], y[tr], emb[te], y[te], names, epochs=epochs, lr=lr, seed=config["seed"])
                  for tr, te in cuts]
        result[name] = probes[0]
        per_split[name] = [{k: p[k] for k in ("accuracy", "balanced_accuracy")} for p in probes]
        log.info("linear probe %s: accuracy %.3f", name, result[name]["accuracy"])
    add_gains(result, ("accuracy", "balanced_accuracy"), per_split=per_split)
    if splits > 1:
        result["splits"] = per_split
        result["protocol"] += f"; gains are the mean over {splits} splits (table: the first)"
    return result


def mean_over_splits(result: dict[str, Any], name: str, metric: str) -> float | None:
    """``metric`` of network ``name`` (``"distilled"`` or ``"random_init"``) averaged over a result's splits (its
    ``splits`` rows, or its one row); None without that network, or when a split gave NaN (no test example at all:
    the summary must show no number rather than NaN).

    Args:
        result: an evaluation result of the linear or events protocol.
        name: the network's row.
        metric: the row's key.
    """
    if name not in result:
        return None
    values = [float(row[metric]) for row in result.get("splits", {}).get(name) or [result[name]]]
    return float(np.mean(values)) if values and all(np.isfinite(values)) else None


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """``AudioTrainer.headline``: mean balanced accuracy over the splits of ``evaluate``'s ``result``.

    Args:
        result: ``evaluate``'s result.
    """
    if result.get("eval_protocol") == "verification":
        from distillkit.train.audio_verification import verification_headline

        return verification_headline(result)
    if result.get("eval_protocol") == "events":
        from distillkit.train.frame_eval import events_headline

        return events_headline(result)

    distilled = mean_over_splits(result, "distilled", "balanced_accuracy")
    random = mean_over_splits(result, "random_init", "balanced_accuracy")
    n = len(result.get("splits", {}).get("random_init") or [None])
    metric = "balanced accuracy" + (f" (mean of {n} file splits)" if n > 1 else "")
    gain = distilled - random if distilled is not None and random is not None else None
    return {"metric": metric, "distilled": distilled, "random": random, "gain": gain}


def format_eval(result: dict[str, Any]) -> str:
    """The protocol line and the per-class table (random init only when no checkpoint was given)."""
    if result.get("eval_protocol") == "verification":
        from distillkit.train.audio_verification import format_verification

        return format_verification(result)
    if result.get("eval_protocol") == "events":
        from distillkit.train.frame_eval import format_events

        return format_events(result)
    lines = [result["protocol"]]
    if "distilled" in result:
        lines.append(format_probe_comparison(result["distilled"], result["random_init"]))
        if "splits" in result:
            n = len(result["splits"]["distilled"])
            head = headline(result)
            mean = ("-" if head["distilled"] is None or head["random"] is None else
                    f"random {head['random']:.3f}, distilled {head['distilled']:.3f}")
            lines.append(f"mean over {n} splits: balanced accuracy {mean}; gain: accuracy "
                         f"{result['gain_accuracy']:+.3f}, balanced accuracy {result['gain_balanced_accuracy']:+.3f}")
    else:
        r = result["random_init"]
        lines.append(f"random init: accuracy {r['accuracy']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}")
    return "\n".join(lines)
