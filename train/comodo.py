"""COMODO video-to-IMU distillation (reference/comodo_audio.md part A): method, trainer and evaluation.

An IMU student learns to place each window among a FIFO queue of frozen video-teacher embeddings the way the
teacher places it: ``loss = -sum softmax(z_t Q^T / tau_t) * log_softmax(z_s Q^T / tau_s)`` (tau_t 0.1,
tau_s 0.05: the student is sharper), with ``Q = [queue; z_t of the batch]`` and the queue then ``Q[B:]``.

- **Teacher side.** ``teacher.npy`` from the shards (the build's teacher stage, computed once), or, when the
  shards have none, the same frozen video teacher run on the stored frames (said in the log). As in the
  released code, the teacher embedding then passes through a frozen, randomly initialised MLP (Linear -> BN ->
  GELU -> Linear, 2048 hidden, 128 out; never trained) and is L2-normalised.
- **Student.** ``student = "mantis"`` (default at size paper): the released Mantis-8M student
  (``train/models/mantis_student.py``), pretrained weights from a local ``student_checkpoint``, or a random init
  only under ``random_student``; it sees the raw IMU, as released. ``student = "transformer"`` (default at small),
  distillkit's own: one encoder shared by the six channels (each channel on its own, as Mantis/MOMENT encode
  channels), the six features concatenated, then the same kind of MLP head (trained) and L2 normalisation;
  at evaluation the head is dropped. The per-channel encoder is a small transformer over patches of the
  channel linearly interpolated to 512 samples (Mantis' input length): ``small`` (64-d, 2 layers; CPU tests
  and the demo) or ``paper`` (256-d, 6 layers, ~8 M parameters with the head, Mantis-8M's budget).
- **Data.** When the shards carry the released splits (``times.json`` ``split``), the run distils on ``split``
  (default ``train``); otherwise on every window, as before split files existed.
- **Queue.** ``queue_size`` (default 16384) embeddings, first filled with the teacher embeddings of windows
  drawn with a fixed seed from the distilled split and clipped to the split's size when that is smaller. With
  ``queue_holdout`` (default at paper) those windows are left out of the first epoch, as released
  (Breezelled/COMODO comodo/train.py:292-311, back at epoch 1, :402-410; their keys are kept in the checkpoint,
  so a resumed run holds out the same ones). It is a buffer of the method, so it is
  checkpointed and a resumed run continues with the same queue. The windows are chosen by key, uniformly over
  the whole dataset (keys listed from the tar headers, without reading the samples), then one pass reads only
  those: one window is held at a time, never a shuffle buffer of thousands of windows with all their JPEGs.
- **Optimiser.** AdamW 3e-4; ``lr_schedule = "clean"``: linear warm-up over 10% of the steps, then linear decay
  to 0; ``"released"``: what the release's scheduler effectively runs (``schedule``). Run length ``max_steps`` or
  ``epochs`` (``E x ceil(windows of the split / batch)`` steps of the continuous stream).
- **Several processes.** The release trains on one GPU (Breezelled/COMODO comodo/train.py:136). Under torchrun
  ``batch_size`` is the global batch; every rank's bank and queue push take the gathered teacher embeddings of
  the whole global batch and BatchNorm is synchronised by default, so one step equals the release's step on one
  GPU with that batch (tests/test_comodo_multigpu.py).
- **Teacher statistics.** With ``teacher_standardise`` (default at small; off at paper, as released) raw teacher
  embeddings are standardised per dimension (mean/std of the queue's initial
  windows, kept in the checkpoint) before the frozen head: a randomly initialised teacher's mean-pooled ReLU
  features point almost the same way for every clip (cosine ~0.997 on the synthetic data), which makes the
  teacher's targets uniform and leaves nothing to distil; standardising restores their spread (mean cosine ~0).
- **Normalisation.** For the transformer student, IMU channels are standardised with the per-channel mean/std
  the build wrote into ``index.json`` (the released code uses raw values; standardising keeps gravity from
  dominating). They are buffers of the method, so the checkpoint keeps them, and evaluating a checkpoint
  standardises with *its* statistics, whatever shards it is evaluated on (the student was trained on those
  inputs).
"""

from __future__ import annotations

import logging
import math
import random
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.pipelines.manifest import Key
from distillkit.pipelines.shards import open_shard
from distillkit.remote import location
from distillkit.sensors.imu import CHANNELS
from distillkit.train import distributed
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import JsonFieldFilter, ShardStream, make_loader, shard_files

log = logging.getLogger(__name__)

MANTIS_LENGTH = 512


# The released code every "train.py:N" of ComodoTrainer.config_sources and docs/comodo.md refers to (commit 2666a02).
_RELEASE = "Breezelled/COMODO comodo/"


@dataclass(frozen=True)
class StudentSize:
    """Per-channel encoder and head sizes."""

    dim: int
    depth: int
    heads: int
    patch: int
    head_hidden: int
    out_dim: int = 128


SIZES = {
    "small": StudentSize(dim=64, depth=2, heads=4, patch=32, head_hidden=512),
    "paper": StudentSize(dim=256, depth=6, heads=8, patch=32, head_hidden=2048),
}


def projection_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """COMODO's head: Linear -> BatchNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ChannelEncoder(nn.Module):
    """(N, L) single-channel series -> (N, dim): interpolate to 512, patchify, transformer, mean of tokens."""

    def __init__(self, size: StudentSize):
        super().__init__()
        self.patch = size.patch
        n_tokens = MANTIS_LENGTH // size.patch
        self.embed = nn.Linear(size.patch, size.dim)
        self.pos = nn.Parameter(torch.randn(1, n_tokens, size.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(size.dim, size.heads, 4 * size.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, size.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(size.dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x[:, None], size=MANTIS_LENGTH, mode="linear", align_corners=False)[:, 0]
        tok = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos
        return self.norm(self.blocks(tok)).mean(1)


class ImuStudent(nn.Module):
    """(B, 6, T) standardised IMU -> features (B, 6 * dim) and unit embeddings (B, out_dim)."""

    def __init__(self, size: StudentSize, channels: int = 6):
        super().__init__()
        self.channels = channels
        self.encoder = ChannelEncoder(size)
        self.head = projection_mlp(channels * size.dim, size.head_hidden, size.out_dim)

    def features(self, x: Tensor) -> Tensor:
        b, c, t = x.shape
        return self.encoder(x.reshape(b * c, t)).reshape(b, -1)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


def comodo_loss(z_s: Tensor, z_t: Tensor, queue: Tensor, tau_s: float = 0.05, tau_t: float = 0.1,
                batch_bank: Tensor | None = None) -> Tensor:
    """COMODO's distillation loss (Breezelled/COMODO comodo/loss.py:33-51), averaged over the batch.

    Args:
        z_s: (B, D) unit student embeddings.
        z_t: (B, D) unit teacher embeddings (no gradient).
        queue: (K, D) unit teacher embeddings of earlier windows.
        tau_s, tau_t: student and teacher temperatures.
        batch_bank: (G, D) teacher embeddings of the whole global batch that join the queue in the bank (under
            torchrun, every rank's ``z_t`` gathered); default ``z_t`` itself, as the single-GPU release does.
    """
    bank = torch.cat([queue, z_t if batch_bank is None else batch_bank], 0).detach()
    target = F.softmax(z_t.detach() @ bank.T / tau_t, dim=1)
    return -(target * F.log_softmax(z_s @ bank.T / tau_s, dim=1)).sum(1).mean()


class Comodo(nn.Module):
    """Student + frozen teacher projection + queue; ``loss(batch)`` for the shared loop."""

    def __init__(self, size: StudentSize, teacher_dim: int, queue: Tensor, mean: Tensor, std: Tensor,
                 tau_s: float, tau_t: float, seed: int, teacher: nn.Module | None = None,
                 student: nn.Module | None = None, teacher_standardise: bool = True):
        super().__init__()
        torch.manual_seed(seed)  # eval_main rebuilds this init as the random-init baseline
        # ``student``: a prebuilt one (the Mantis student, ``build_student``); None: distillkit's transformer
        self.student = student if student is not None else ImuStudent(size)
        self.teacher_standardise = teacher_standardise
        torch.manual_seed(seed + 1)
        self.teacher_head = projection_mlp(teacher_dim, 2048, size.out_dim).eval()
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.video_teacher = teacher  # frames -> embedding when the shards hold no teacher.npy
        self.register_buffer("queue", queue.clone())
        # The keys of the windows first drawn into the queue (``fill_queue``): the stream holds them out of epoch 0,
        # as released (comodo/train.py:292-311). Kept in the checkpoint (extra state) so a resumed run holds out
        # the same windows.
        self.queue_keys: list[str] = []
        # Per-dimension statistics of raw teacher embeddings, set from the queue's initial windows.
        self.register_buffer("t_mean", torch.zeros(teacher_dim))
        self.register_buffer("t_std", torch.ones(teacher_dim))
        self.register_buffer("mean", mean.view(1, -1, 1).clone())
        self.register_buffer("std", std.view(1, -1, 1).clone())
        self.tau_s, self.tau_t = tau_s, tau_t

    def train(self, mode: bool = True) -> Comodo:
        super().train(mode)
        self.teacher_head.eval()  # frozen, as released: its BatchNorm keeps its initial statistics
        if self.video_teacher is not None:
            self.video_teacher.eval()
        return self

    def normalise(self, imu: Tensor) -> Tensor:
        return (imu - self.mean) / self.std

    @torch.no_grad()
    def teacher_embedding(self, batch: dict[str, Any]) -> Tensor:
        """(B, D) unit embeddings of the batch's teacher side (stored, or computed from the frames)."""
        emb = batch.get("teacher")
        if emb is None:
            from distillkit.preprocess.video_encoder import embed_clips

            emb = embed_clips(self.video_teacher, batch["frames"], batch["imu"].device)
        return self.project_teacher(emb)

    @torch.no_grad()
    def project_teacher(self, emb: Tensor) -> Tensor:
        """Raw (B, D) teacher embeddings -> standardised -> frozen head -> unit (B, out_dim)."""
        return F.normalize(self.teacher_head((emb.float() - self.t_mean) / self.t_std), dim=1)

    def get_extra_state(self) -> dict[str, Any]:
        return {"queue_keys": list(self.queue_keys)}

    def set_extra_state(self, state: Any) -> None:
        self.queue_keys = list(state.get("queue_keys", [])) if isinstance(state, dict) else []

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the queue's keys were kept: load them as holding none
        state_dict.setdefault(prefix + "_extra_state", {"queue_keys": []})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fill_queue(self, raw: Tensor, keys: Sequence[str] = ()) -> None:
        """Set the teacher statistics from ``raw`` (K, D) teacher embeddings and the queue to their projections;
        ``keys``: those windows' keys (``queue_keys``).

        Without ``teacher_standardise`` the statistics stay 0 / 1, so the frozen head sees the raw embeddings as
        the release feeds them (pooled features straight into its MLP, comodo/utils/model_util.py:188-196)."""
        self.queue_keys = list(keys)
        if self.teacher_standardise:
            self.t_mean.copy_(raw.mean(0))
            self.t_std.copy_(raw.std(0, unbiased=False).clamp_min(1e-6) if len(raw) > 1
                             else torch.ones_like(raw[0]))
        self.queue.copy_(self.project_teacher(raw))

    def loss(self, batch: dict[str, Any]) -> Tensor:
        z_t = self.teacher_embedding(batch)
        z_s = self.student(self.normalise(batch["imu"]))
        # The release is single-GPU (comodo/train.py:136, no DDP/Accelerate): its bank is [queue; the whole
        # batch's z_t] (loss.py:39) and the queue then pushes the whole batch (loss.py:54). Under torchrun every
        # rank gathers the global batch's z_t (rank order) for both, so a global batch B on N ranks computes the
        # loss of one GPU with batch B (the mean over ranks of per-rank means = the mean over B; with
        # sync_batchnorm the student's BatchNorm sees B too) and every rank's queue stays the same (DDP's buffer
        # broadcast from rank 0 then changes nothing).
        z_all = distributed.gather_rows(z_t.detach()).to(self.queue.dtype)
        loss = comodo_loss(z_s, z_t, self.queue, self.tau_s, self.tau_t, batch_bank=z_all)
        with torch.no_grad():  # FIFO: the global batch's teacher embeddings push out the oldest
            self.queue.copy_(torch.cat([self.queue, z_all], 0)[len(z_all):])
        return loss


# --------------------------------------------------------------------------- data


def _sample(s: dict[str, Any], rng: Any, gen: Any) -> dict[str, Any]:
    out = {"imu": torch.from_numpy(np.ascontiguousarray(s["imu.npy"], np.float32))}
    if "teacher.npy" in s:
        out["teacher"] = torch.from_numpy(s["teacher.npy"].astype(np.float32))
    else:  # frames stay JPEG bytes in the stream and are decoded only here, when the teacher needs them
        from distillkit.sensors.images import decode_rgb

        out["frames"] = torch.from_numpy(np.stack([decode_rgb(s[k]) for k in sorted(s) if k.startswith("frame")]))
    return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the windows of a batch (all with teacher.npy, or all without)."""
    keys = set(items[0])
    if any(set(i) != keys for i in items):
        raise ValueError("a batch mixes windows with and without teacher.npy")
    return {k: torch.stack([i[k] for i in items]) for k in keys}


def _check(s: dict[str, Any]) -> None:
    imu = s["imu.npy"]
    if imu.ndim != 2 or imu.shape[0] != 6 or not np.isfinite(imu).all():
        raise ValueError(f"imu.npy of shape {imu.shape} is not a finite (6, T) window")


def split_select(split: str) -> JsonFieldFilter | None:
    """The ``select`` keeping the windows whose ``times.json`` ``split`` is ``split`` (None for ``"all"``)."""
    if split == "all":
        return None
    return JsonFieldFilter("times.json", "split", {split}, f"windows of split {split!r}")


# Batches that mix recordings like the release's global shuffle (issue 21): a build writes each recording's windows
# one after another (one recording per shard by default), so one shard at a time through a 512-window buffer gave
# batches of a few recordings. 64 shards read in turn into a 2048-window buffer (~60 MB of 5 s Ego4D windows per
# loader worker) mix 0.88 of a global shuffle's recordings per batch, 0.39 before (tests/test_batch_mixing.py; the
# bound is the recordings one loader worker has open, as each batch comes from one worker: docs/comodo.md).
SHUFFLE_BUFFER = 2048
INTERLEAVE = 64


def make_stream(shards: Path, seed: int, strict: bool, epochs: int | None = None, shuffle: bool = True,
                shuffle_buffer: int = SHUFFLE_BUFFER, rank: int = 0, world_size: int = 1, split: str = "all",
                interleave: int = INTERLEAVE, on_corrupt: str = "stop") -> ShardStream:
    """The training stream: imu.npy + teacher.npy (or the frames when the shards hold no teacher.npy);
    ``rank`` of ``world_size`` reads its share of the shards, ``interleave`` of them at once, through a
    ``shuffle_buffer``; ``split`` keeps the windows of that split (``times.json`` ``split``, written by a build
    with ``source.splits_dir``), ``"all"`` every window."""
    return ShardStream(shards, seed=seed, epochs=epochs, shuffle_shards=shuffle, rank=rank, world_size=world_size,
                       shuffle_buffer=shuffle_buffer if shuffle else 0, required=("imu.npy", "times.json"),
                       check=_check, transform=_sample, strict=strict, images="raw", select=split_select(split),
                       interleave=interleave if shuffle else 1, on_corrupt=on_corrupt)


def shard_info(shards: Path) -> dict[str, Any]:
    """What the trainer needs from ``index.json``: normalisation, sample count, the build's teacher settings."""
    from distillkit.pipelines.shards import load_index

    index = load_index(shards)
    if index.get("pipeline") != "comodo":
        raise ValueError(f"{shards}: not comodo shards (pipeline {index.get('pipeline')!r})")
    stats = index.get("stats", {})
    try:
        mean = [float(stats[f"imu_mean_{c}"]) for c in CHANNELS]
        std = [max(float(stats[f"imu_std_{c}"]), 1e-6) for c in CHANNELS]
    except KeyError:
        raise ValueError(f"{shards}: index.json has no per-channel IMU mean/std (stats)") from None
    teacher = index.get("manifest", {}).get("stages", {}).get("teacher", {})
    # windows per split when the build read split files (pipelines/comodo.py stats windows_split_*); {} otherwise
    splits = {name: int(stats[f"windows_split_{name}"]) for name in ("train", "val", "test")
              if f"windows_split_{name}" in stats}
    if splits and not any(splits.values()):
        splits = {}
    return {"mean": mean, "std": std, "samples": int(index["counts"]["written"]), "teacher": teacher,
            "splits": splits}


def resolve_split(config: dict[str, Any], info: dict[str, Any], shards: Path | str = "") -> tuple[str, int]:
    """(split distilled on, its window count): ``config["split"]``, or when None ``"train"`` if the shards carry
    splits and ``"all"`` (every window, the behaviour of shards built without split files) otherwise.

    Raises:
        ValueError: a split asked of shards built without split files, or a split with no window.
    """
    split = config.get("split") or ("train" if info["splits"] else "all")
    if split == "all":
        return split, info["samples"]
    if not info["splits"]:
        raise ValueError(f"{shards}: split {split!r} asked, but the shards carry no splits (build with "
                         "source.splits_dir, or set split = 'all')")
    if info["splits"].get(split, 0) < 1:
        raise ValueError(f"{shards}: split {split!r} holds no window ({info['splits']})")
    return split, info["splits"][split]


# WebDataset's rule for a tar member's sample key: its path up to the first dot of the file name.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def shard_keys(shards: Path) -> list[str]:
    """Every sample key of the shards listed in ``index.json``, in shard order, read from the tar headers only
    (``tarfile`` seeks over the members' data). An unreadable shard is logged and left out.

    Args:
        shards: the shard directory.
    """
    keys: list[str] = []
    for path in shard_files(shards):
        try:
            with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:  # a URL: range requests
                for member in tar:
                    match = _KEY.match(member.name)
                    if match and (not keys or keys[-1] != match.group(1)):  # a sample's members are contiguous
                        keys.append(match.group(1))
        except (tarfile.TarError, OSError) as exc:
            log.warning("%s: cannot list its samples for the queue (%s): left out", path, exc)
    return keys


class KeySelect:
    """A ``ShardStream`` ``select`` keeping the samples whose key is in ``keys`` (module-level, so it pickles)."""

    def __init__(self, keys: set[str], split: str = "all"):
        self.keys = keys
        self.split = split_select(split)

    def __call__(self, raw: dict[str, Any]) -> bool:
        return raw.get("__key__") in self.keys and (self.split is None or self.split(raw))

    def __repr__(self) -> str:
        return f"{len(self.keys)} windows chosen for the queue"


def _queue_item(s: dict[str, Any], rng: Any, gen: Any) -> tuple[str, dict[str, Any]]:
    """(key, teacher embedding or frames) of one queue window: the frames are decoded only without teacher.npy."""
    if "teacher.npy" in s:
        return s["__key__"], {"teacher": torch.from_numpy(s["teacher.npy"].astype(np.float32))}
    from distillkit.sensors.images import decode_rgb

    return s["__key__"], {"frames": np.stack([decode_rgb(s[k]) for k in sorted(s) if k.startswith("frame")])}


def _embed_keys(shards: Path, keys: list[str], video_teacher: nn.Module | None, device: str,
                batch: int = 64, split: str = "all") -> dict[str, Tensor]:
    """Raw teacher embeddings of the windows ``keys``, by key, in one pass over the shards that holds one window
    (plus up to ``batch`` decoded clips waiting for the video teacher) at a time.

    Args:
        shards: the shard directory.
        keys: the windows wanted.
        video_teacher: the frozen teacher, for shards without teacher.npy.
        device: where the video teacher runs.
        batch: clips per teacher forward.
        split: only windows of this split (``"all"``: any).
    """
    from distillkit.preprocess.video_encoder import embed_clips

    stream = ShardStream(shards, epochs=1, shuffle_shards=False, required=("imu.npy", "times.json"), check=_check,
                         transform=_queue_item, images="raw", select=KeySelect(set(keys), split))
    found: dict[str, Tensor] = {}
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if pending:
            emb = embed_clips(video_teacher, np.stack([f for _, f in pending]), device).cpu()
            found.update({k: e.float() for (k, _), e in zip(pending, emb, strict=True)})
            pending.clear()

    with torch.no_grad():
        for key, item in stream:
            if "teacher" in item:
                found[key] = item["teacher"]
            else:
                pending.append((key, item["frames"]))
                if len(pending) == batch:
                    flush()
            if len(found) + len(pending) == len(keys):  # the rest of the dataset holds none of them
                break
        flush()
    return found


def initial_teacher_embeddings(shards: Path, size: int, seed: int, video_teacher: nn.Module | None,
                               device: str = "cpu", split: str = "all", share: float = 1.0) -> Tensor:
    """Raw teacher embeddings (size, D) of ``size`` windows drawn uniformly with ``seed`` (:func:`queue_draw`
    without the keys)."""
    return queue_draw(shards, size, seed, video_teacher, device, split, share)[1]


def queue_draw(shards: Path, size: int, seed: int, video_teacher: nn.Module | None, device: str = "cpu",
               split: str = "all", share: float = 1.0) -> tuple[list[str], Tensor]:
    """The keys of ``size`` windows drawn uniformly with ``seed`` from the whole dataset and their raw teacher
    embeddings (size, D), in the drawn order.

    The draw is over keys (:func:`shard_keys`), so memory holds keys and embeddings, not samples; windows that turn
    out unusable are replaced by the next ones of the same seeded permutation.

    Args:
        shards: the shard directory.
        size: windows wanted (fewer when the shards hold fewer usable ones).
        seed: the draw's seed.
        video_teacher: the frozen teacher, for shards without teacher.npy.
        device: where the video teacher runs.
        split: draw only windows of this split (the release draws its queue from the training set,
            comodo/train.py:292-297); windows of other splits are skipped like unusable ones.
        share: the split's share of the windows (draws enough keys per pass).

    Raises:
        ValueError: no usable window.
    """
    order = shard_keys(shards)
    random.Random(f"comodo-queue/{seed}").shuffle(order)
    found: dict[str, Tensor] = {}
    used = 0
    while len(found) < size and used < len(order):
        # a split keeps ~share of the drawn keys: draw enough for one pass to find them all (each pass reads
        # every shard), then keep the first ``size`` found in the drawn order
        missing = size - len(found)
        draw = missing if share >= 1.0 else int(math.ceil(missing / max(share, 1e-3) * 1.2)) + 8
        wanted = order[used:used + draw]
        used += len(wanted)
        found.update(_embed_keys(shards, wanted, video_teacher, device, split=split))
    if not found:
        raise ValueError(f"{shards}: no usable window for the queue")
    keys = [k for k in order[:used] if k in found][:size]
    return keys, torch.stack([found[k] for k in keys])


def _teacher_for(info: dict[str, Any], config: dict[str, Any], needs_frames: bool) -> tuple[nn.Module | None, int]:
    """The frozen video teacher (only when the shards lack teacher.npy) and its embedding size."""
    from distillkit.preprocess.video_encoder import build_video_teacher, load_video_teacher

    arch = config["teacher_arch"] or info["teacher"].get("arch", "conv3d")
    ckpt = config["teacher_checkpoint"] or info["teacher"].get("checkpoint", "") or ""
    seed = info["teacher"].get("seed", 0)
    if not needs_frames:
        return None, int(build_video_teacher(arch).dim)
    log.warning("the shards hold no teacher.npy: running the frozen %s video teacher on the stored frames "
                "(build with stages.teacher.enabled = true to compute it once, offline)", arch)
    model, tinfo = load_video_teacher(arch, ckpt, seed)
    return model, tinfo.dim


def _has_teacher(shards: Path) -> bool:
    stream = make_stream(shards, seed=0, strict=False, epochs=1, shuffle=False)
    for s in stream:
        return "teacher" in s
    raise ValueError(f"{shards}: no usable window")


def build_student(config: dict[str, Any]) -> tuple[nn.Module | None, str]:
    """The student before distillation and what it is: (None, ...) for distillkit's transformer (``Comodo``
    builds it from ``seed``), a ``MantisStudent`` with the weights of ``student_checkpoint`` (read locally,
    strictly), or one at random init seeded with ``seed`` under ``random_student``.

    Args:
        config: a trainer configuration (``student`` None is resolved by ``effective_config``).
    """
    eff = ComodoTrainer.effective_config(config)
    if eff["student"] != "mantis":
        return None, f"distillkit transformer ({eff['size']}) at random init (seed {eff['seed']})"
    from distillkit.train.models.mantis_student import MantisStudent

    if eff["student_checkpoint"]:
        torch.manual_seed(eff["seed"])  # the head is new (train.py:235-242 builds it after loading Mantis)
        return (MantisStudent.from_checkpoint(eff["student_checkpoint"]),
                f"pretrained Mantis-8M ({eff['student_checkpoint']})")
    torch.manual_seed(eff["seed"])
    return MantisStudent(), f"Mantis-8M at random init (seed {eff['seed']}; random_student)"


def build_method(shards: Path, config: dict[str, Any], device: str, with_queue: bool = True) -> Comodo:
    """The COMODO method for ``shards`` (queue filled when ``with_queue``; else a placeholder of the same size)."""
    eff = ComodoTrainer.effective_config(config)
    info = shard_info(shards)
    split, n_split = resolve_split(eff, info, shards)
    needs_frames = not _has_teacher(shards)
    teacher, dim = _teacher_for(info, eff, needs_frames)
    size = SIZES[eff["size"]]
    student, about = build_student(eff)
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    if student is not None:  # Mantis scales each series itself (version1.py:64-65); the release feeds raw IMU
        mean, std = torch.zeros(6), torch.ones(6)
    k = min(eff["queue_size"], n_split)
    method = Comodo(size, dim, torch.zeros(k, size.out_dim), mean, std, eff["tau_s"], eff["tau_t"], eff["seed"],
                    teacher, student=student, teacher_standardise=bool(eff["teacher_standardise"]))
    log.info("student: %s; distilling on %s (%d windows)", about,
             "every window (the shards carry no split)" if split == "all" else f"split {split!r}", n_split)
    if with_queue:
        if k < eff["queue_size"]:
            log.info("queue clipped to the split: %d windows (queue_size %d)", k, eff["queue_size"])
        keys, raw = queue_draw(shards, k, eff["seed"], teacher, split=split, share=n_split / max(1, info["samples"]))
        if len(raw) < k:
            raise ValueError(f"{shards}: only {len(raw)} usable windows for a queue of {k} (index.json counts "
                             f"{n_split}): rebuild the shards or lower queue_size")
        method.fill_queue(raw, keys)
    return method


def schedule(config: dict[str, Any], n_windows: int, queue: int) -> dict[str, Any]:
    """Optimiser steps, warm-up steps and the lr's final ratio for ``n_windows`` windows of the distilled split.

    ``epochs`` E: E * ceil(n / batch) steps (the release's loader keeps the last partial batch, shuffle=True and no
    drop_last, comodo/train.py:324-330), or with ``queue_holdout`` ceil((n - Q) / batch) + (E - 1) * ceil(n / batch):
    the queue's windows are held out of epoch 0 (train.py:292-311, added back at epoch 1, train.py:402-410).
    ``lr_schedule``: ``"clean"`` warms up over 10% of the steps run and decays
    linearly to 0 at the last one; ``"released"`` reproduces what the release's scheduler does
    (comodo/train.py:379-391): its total counts the queue's *samples* as if they were batches,
    ``T = S0 + (S0 + Q) * (E - 1)`` with S0 the batches of epoch 0, warm-up ``int(0.1 T)``, and the run stops after
    far fewer steps, so the lr never decays to 0 and, once ``int(0.1 T)`` exceeds the steps run, never reaches its
    peak. Here the same straight lines: warm-up from 0 over ``int(0.1 T)`` steps (``step / W``, transformers'
    get_linear_schedule_with_warmup), then decay to ``(T - S) / (T - W)`` at the S steps run (the release's value
    there).

    Args:
        config: an effective configuration (``max_steps`` or ``epochs`` set).
        n_windows: windows of the distilled split.
        queue: queue size Q (clipped to the split).
    """
    batch = config["batch_size"]
    per_epoch = max(1, math.ceil(n_windows / batch))
    epochs = config.get("epochs")
    s0 = max(1, math.ceil(max(0, n_windows - queue) / batch))  # epoch 0 without the queue's windows
    first = s0 if config.get("queue_holdout") else per_epoch
    steps = int(config["max_steps"]) if epochs is None else first + (epochs - 1) * per_epoch
    if config.get("lr_schedule", "clean") == "clean":
        return {"steps": steps, "warmup": int(round(0.1 * steps)), "min_lr_ratio": 0.0, "per_epoch": per_epoch}
    e = epochs if epochs is not None else max(1, math.ceil(steps / per_epoch))
    total = s0 + (s0 + queue) * (e - 1)
    warmup = int(0.1 * total)
    ratio = (total - steps) / (total - warmup) if total > max(warmup, steps) else 0.0
    return {"steps": steps, "warmup": warmup, "min_lr_ratio": max(0.0, min(1.0, ratio)), "per_epoch": per_epoch,
            "released_total": total}


def train_main(shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu", resume: bool = False,
               strict: bool = False) -> dict[str, Any]:
    """Train COMODO on ``shards`` (see the module docstring); returns the loop's final metrics."""
    config = ComodoTrainer.effective_config(config)  # student, batch, run length, normalisation at the size's
    seed = config["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    ranks = distributed.ranks()
    # rank 0 decides (a node-local or lagging view of OUT must not make ranks disagree) and alone fills the queue:
    # DDP copies its buffers, the queue and the teacher statistics, to every rank
    resuming = distributed.from_rank0(resume and out is not None and (Path(out) / "latest.pt").is_file())
    method = build_method(location(shards), config, device, with_queue=not resuming and ranks.main)
    split, n_split = resolve_split(config, shard_info(location(shards)), shards)
    if config["queue_holdout"] and len(method.queue) >= n_split:
        raise ValueError(f"{shards}: the queue ({len(method.queue)}) takes every window of {split!r} ({n_split}), "
                         "so holding it out of epoch 0 leaves nothing to train on: lower queue_size or set "
                         "queue_holdout = false")
    # The windows held out of epoch 0: rank 0 drew them (every rank must hold out the same ones); a resumed run
    # reads them from its checkpoint (the method's extra state), restored before the loop first builds the loader.
    method.queue_keys = distributed.from_rank0(method.queue_keys)
    stream = make_stream(location(shards), seed, strict, rank=ranks.rank, world_size=ranks.world_size, split=split,
                         on_corrupt=config.get("on_corrupt_shard", "stop"))
    plan = schedule(config, n_split, len(method.queue))
    steps = plan["steps"]
    log.info("%d steps (%s), warm-up %d, lr schedule %s", steps,
             f"{config['epochs']} epochs of {plan['per_epoch']}" if config.get("epochs") else "max_steps",
             plan["warmup"], config["lr_schedule"])
    cfg = LoopConfig(max_steps=steps, device=device, out=Path(out) if out is not None else None, resume=resume,
                     log_every=config["log_every"], ckpt_every=max(1, steps // 4) if steps >= 8 else 0,
                     run_config=config, optimizer="adamw", lr=config["lr"], weight_decay=config["weight_decay"],
                     warmup_steps=plan["warmup"], min_lr_ratio=plan["min_lr_ratio"], schedule="linear",
                     warmup_from_zero=config["lr_schedule"] == "released", grad_clip=None,
                     bf16=config["precision"] == "bf16", global_batch=config["batch_size"],
                     sync_batchnorm=bool(config["sync_batchnorm"]))

    def loader() -> Any:
        # called by the loop after it restored a checkpoint, so a resumed run holds out the queue it saved
        stream.hold_out = frozenset(method.queue_keys if config["queue_holdout"] else ())
        return make_loader(stream, distributed.rank_batch(config["batch_size"]), collate,
                           num_workers=config["num_workers"], device=device)

    metrics = train_loop(method, loader, cfg, batch_size=lambda b: len(b["imu"]))
    metrics.update(bad_samples=stream.bad_samples, queue=len(method.queue), split=split, split_windows=n_split,
                   queue_held_out=len(stream.hold_out),
                   teacher="stored teacher.npy" if method.video_teacher is None else "computed from frames")
    return metrics


# --------------------------------------------------------------------------- evaluation


def window_features(student: nn.Module, shards: list[Path], mean: Tensor, std: Tensor, device: str = "cpu",
                    with_splits: bool = False) -> tuple[Any, ...]:
    """Frozen student features of every labelled window: ((N, F), labels, recording uids), in shard order, and
    with ``with_splits`` each window's ``times.json`` split (None where the build wrote none)."""
    from distillkit.train.progress import progress, shard_sample_count

    feats, labels, groups, splits = [], [], [], []
    student = student.to(device).eval()
    mean, std = mean.view(1, -1, 1).to(device), std.view(1, -1, 1).to(device)
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            with torch.no_grad():
                feats.append(student.features((torch.stack(batch).to(device) - mean) / std).float().cpu().numpy())
            batch.clear()

    for d in shards:
        stream = ShardStream(d, epochs=1, shuffle_shards=False, required=("imu.npy", "times.json"), check=_check,
                             images="raw")
        for s in progress(stream, desc=f"comodo eval: features of {Path(d).name}", total=shard_sample_count(d),
                          unit="window"):
            if "label.txt" not in s:
                continue
            batch.append(torch.from_numpy(np.ascontiguousarray(s["imu.npy"], np.float32)))
            labels.append(bytes(s["label.txt"]).decode().strip())
            groups.append(s["times.json"]["uid"])
            splits.append(s["times.json"].get("split"))
            if len(batch) == 256:
                flush()
    flush()
    if not feats:
        raise ValueError(f"{', '.join(map(str, shards))}: no labelled window (labels.csv) to evaluate on")
    if with_splits:
        return np.concatenate(feats), labels, groups, splits
    return np.concatenate(feats), labels, groups


def eval_students(checkpoint: Path | None, shards: list[Path],
                  config: dict[str, Any]) -> tuple[dict[str, nn.Module], Tensor, Tensor]:
    """The students to probe (``random_init``, and ``distilled`` from ``checkpoint``) and the per-channel IMU
    mean/std (6,) both are fed with.

    A checkpoint's own statistics (the method's ``mean``/``std`` buffers, those of the shards it was trained on)
    standardise the input, not the evaluated shards': the student learned on inputs standardised that way, and
    another dataset's statistics would shift and rescale them. The random-init baseline gets the same input, so the
    comparison stays one of weights only. Without a checkpoint (or one from before the buffers) the statistics
    of ``shards[0]`` are used.

    Args:
        checkpoint: a ``train comodo`` checkpoint, or None for the baseline alone.
        shards: the evaluated shard directories.
        config: the trainer configuration (``size``, ``seed``).
    """
    config = ComodoTrainer.effective_config(config)
    info = shard_info(shards[0])
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    size = SIZES[config["size"]]
    # the student the distilled run started from: the pretrained Mantis (the paper's frozen-student row), a
    # random Mantis, or distillkit's transformer at the same seed
    baseline, _ = build_student(config)
    if baseline is None:
        torch.manual_seed(config["seed"])
        baseline = ImuStudent(size)
    else:  # Mantis sees the raw IMU, as released (the method's mean/std buffers are 0 / 1 then)
        mean, std = torch.zeros(6), torch.ones(6)
    students = {"random_init": baseline}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)["model"]
        if config["student"] == "mantis":
            from distillkit.train.models.mantis_student import MantisStudent

            distilled: nn.Module = MantisStudent()
        else:
            distilled = ImuStudent(size)
        own = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
        try:  # strictly: a checkpoint of the other student kind must not load half-way
            distilled.load_state_dict(own)
        except RuntimeError:
            raise ValueError(f"{checkpoint}: its student.* weights do not fit the {config['student']} student "
                             "(evaluate with the configuration it was trained with)") from None
        students["distilled"] = distilled
        if "mean" in state and "std" in state:
            mean, std = state["mean"].reshape(-1).float(), state["std"].reshape(-1).float()
        else:
            log.warning("%s holds no IMU mean/std: standardising with %s's statistics", checkpoint, shards[0])
    return students, mean, std


def describe_student(config: dict[str, Any]) -> str:
    """What the student before distillation is (the evaluation's baseline), without building it.

    Args:
        config: a trainer configuration.
    """
    eff = ComodoTrainer.effective_config(config)
    if eff["student"] != "mantis":
        return f"distillkit transformer ({eff['size']}) at random init (seed {eff['seed']})"
    if eff["student_checkpoint"]:
        return f"pretrained Mantis-8M before distillation ({eff['student_checkpoint']})"
    return f"Mantis-8M at random init (seed {eff['seed']}; no pretrained weights given)"


_METRICS = {"linear": ("accuracy", "balanced_accuracy"), "svm": ("top1", "top3", "top5")}


def eval_main(checkpoint: Path | None, shards: list[Path], config: dict[str, Any], device: str = "cpu",
              test_fraction: float = 0.3, probe_epochs: int = 300, splits: int = 1,
              protocol: str = "linear") -> dict[str, Any]:
    """Frozen student features on the window labels, the distilled student against the student before
    distillation (``baseline`` says which: the pretrained Mantis, a random Mantis or distillkit's transformer at
    the run's seed; its result keeps the key ``random_init``).

    Sides: when the windows carry the released splits (``times.json`` ``split``), the probe fits on ``train`` and
    reports on every ``test`` window (``splits`` is then 1); without split files, recordings are held out whole,
    ``test_fraction`` of them per activity (the behaviour before split files, said in ``split_source``).

    Args:
        checkpoint: a ``train comodo`` checkpoint, or None for the baseline alone.
        shards: the evaluated shard directories (windows with ``label.txt``).
        config: the trainer configuration (``size``, ``seed``, ``student``).
        device: where the students compute their features (the probe runs on the CPU).
        test_fraction: share of the recordings (per majority activity) on the test side, without split files.
        probe_epochs: full-batch steps of the linear probe.
        splits: recording splits without split files (seeds ``seed`` .. ``seed + splits - 1``), the same for both
            students; with more than one, ``mean`` holds each student's metrics averaged over them and ``splits``
            each split's figures.
        protocol: ``svm``, the released RBF-SVM with top-1/3/5 (``train.comodo_svm.svm_protocol``), or
            ``linear``, distillkit's logistic probe with accuracy and balanced accuracy.

    Raises:
        ValueError: no labelled window, no window on one side, an unknown protocol or ``splits`` < 1.
    """
    from distillkit.train.clip_probe import group_split, linear_probe
    from distillkit.train.comodo_svm import svm_protocol

    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if protocol not in _METRICS:
        raise ValueError(f"unknown protocol {protocol!r} (svm | linear)")
    config = ComodoTrainer.effective_config(config)
    students, mean, std = eval_students(checkpoint, shards, config)
    results: dict[str, Any] = {"protocol": protocol, "baseline": describe_student(config)}
    cuts: list[tuple[np.ndarray, np.ndarray]] = []
    per_split: dict[str, list[dict[str, float]]] = {}
    for name, student in students.items():
        x, labels, groups, window_split = window_features(student, shards, mean, std, device, with_splits=True)
        if not cuts:
            if any(s is not None for s in window_split):  # the released split files (source.splits_dir)
                tr = np.flatnonzero([s == "train" for s in window_split])
                te = np.flatnonzero([s == "test" for s in window_split])
                if len(tr) == 0 or len(te) == 0:
                    raise ValueError(f"need labelled windows of the train and test splits, got {len(tr)} and "
                                     f"{len(te)}")
                if splits > 1:
                    log.warning("the windows carry the released splits: one evaluation (train -> test), not %d",
                                splits)
                cuts.append((tr, te))
                results["split_source"] = "split files: fitted on train, reported on test"
            else:
                for k in range(splits):
                    split = group_split(groups, test_fraction, seed=config["seed"] + k, labels=labels)
                    if len(split[0]) == 0 or len(split[1]) == 0:  # too few recordings per activity to stratify
                        split = group_split(groups, test_fraction, seed=config["seed"] + k)
                    if len(split[0]) == 0 or len(split[1]) == 0:
                        raise ValueError(f"need labelled windows from at least two recordings, got "
                                         f"{len(set(groups))}")
                    cuts.append(split)
                results["split_source"] = (f"no split files: {test_fraction:.0%} of the recordings held out whole "
                                           "(per activity)")
        runs = []
        for tr, te in cuts:
            if protocol == "svm":
                mask_tr, mask_te = np.zeros(len(x), bool), np.zeros(len(x), bool)
                mask_tr[tr], mask_te[te] = True, True
                runs.append(svm_protocol(x, labels, mask_tr, mask_te, seed=config["seed"]))
            else:
                classes = sorted(set(labels))
                y = np.array([classes.index(lab) for lab in labels])
                runs.append(linear_probe(x[tr], y[tr], x[te], y[te], classes, epochs=probe_epochs,
                                         seed=config["seed"]))
        results[name] = runs[0]
        per_split[name] = [{k: float(r[k]) for k in _METRICS[protocol]} for r in runs]
    results["recordings"] = {"train": len({groups[i] for i in cuts[0][0]}),
                             "test": len({groups[i] for i in cuts[0][1]})}
    if len(cuts) > 1:
        results["splits"] = per_split
        results["mean"] = {name: {k: float(np.mean([p[k] for p in rows])) for k in _METRICS[protocol]}
                           for name, rows in per_split.items()}
    return results


class ComodoTrainer(Trainer):
    """``distillkit train comodo``: the keys below plus the common ones (``train.base``)."""

    name = "comodo"
    pipeline = "comodo"
    summary = "COMODO video-to-IMU distillation (queue of frozen video-teacher embeddings)"
    schema = {
        "size": Key(str, "small", choices=tuple(SIZES), doc="student size: small (CPU, tests) or paper (~8 M)"),
        "student": Key(str, None, choices=("mantis", "transformer"),
                       doc="mantis (the released Mantis-8M student; default at size paper) or transformer "
                           "(distillkit's, default at small)"),
        "student_checkpoint": Key(str, "", doc="local Mantis-8M weights: a save_pretrained folder or a weights "
                                                "file (never downloaded)"),
        "random_student": Key(bool, False, doc="allow the Mantis student without student_checkpoint (random init)"),
        "split": Key(str, None, choices=("train", "val", "test", "all"),
                     doc="windows distilled on (default: train when the shards carry splits, else all)"),
        "max_steps": Key(int, None, doc="optimiser steps (default: small 100; paper trains by epochs)"),
        "epochs": Key(int, None, doc="passes over the split: epochs x ceil(windows / batch) steps (paper: 20)"),
        "batch_size": Key(int, None, doc="windows per step over all processes (default: small 32, paper 128 as "
                                         "released on one GPU)"),
        "lr_schedule": Key(str, "clean", choices=("clean", "released"),
                           doc="clean (10% warm-up, linear decay to 0) or released (its warm-up counts queue "
                               "samples as steps)"),
        "teacher_standardise": Key(bool, None, doc="standardise teacher embeddings per dimension before the frozen "
                                                   "head (default: small true, paper false as released)"),
        "queue_size": Key(int, 16384, doc="teacher embeddings in the FIFO queue (clipped to the dataset)"),
        "queue_holdout": Key(bool, None, doc="leave the queue's initial windows out of the first epoch, as released "
                                             "(train.py:292-311; default: paper true, small false)"),
        "tau_s": Key(float, 0.05, doc="student temperature"),
        "tau_t": Key(float, 0.1, doc="teacher temperature"),
        "lr": Key(float, 3e-4, doc="AdamW peak learning rate (10% linear warm-up, then linear decay)"),
        "weight_decay": Key(float, 0.01, doc="AdamW weight decay"),
        "teacher_arch": Key(str, "", choices=("", "conv3d", "timesformer"),
                            doc="video teacher when the shards hold no teacher.npy ('' = the build's)"),
        "teacher_checkpoint": Key(str, "", doc="its local weights ('' = the build's setting; none = random)"),
        "precision": Key(str, "fp32", choices=("fp32", "bf16"), doc="CUDA autocast (CPU runs are fp32)"),
    }
    # `distillkit demo` (synth ego --size demo: 12 recordings x 60 s, IMU mounted turned by up to ~70 degrees, ~700
    # windows): 300 steps of 64 windows (~28 passes) at lr 1e-3. The default lr 3e-4 over 150 steps left the gain
    # within the split-to-split noise on one seed of three (docs/comodo.md "The demo" has the runs).
    demo = {"max_steps": 300, "batch_size": 64, "lr": 1e-3}
    # Ten splits of the 12 recordings (4 held out each time, every activity on the test side), the same for both
    # students: one split's balanced accuracy moves by +-0.05 with the recordings held out.
    demo_eval = {"test_fraction": 0.3, "probe_epochs": 300, "splits": 10}
    eval_schema = {
        "test_fraction": Key(float, 0.3, doc="share of recordings (per activity) held out for the probe's test"),
        "probe_epochs": Key(int, 300, doc="full-batch steps of the logistic-regression probe"),
        "splits": Key(int, 1, doc="train/test splits of the recordings (seeds seed..seed+splits-1): with more than "
                                  "one, the headline is the mean over them"),
        "protocol": Key(str, None, choices=("svm", "linear"),
                        doc="svm: the released RBF-SVM, top-1/3/5 (default at size paper); linear: distillkit's "
                            "logistic probe, balanced accuracy (default at small)"),
    }

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        if config["queue_size"] < 1:
            raise ConfigError(where, "queue_size", "must be >= 1")
        for key in ("tau_s", "tau_t", "lr"):
            if config[key] <= 0:
                raise ConfigError(where, key, "must be > 0")
        if config.get("max_steps") is not None and config.get("epochs") is not None:
            raise ConfigError(where, "epochs", "give max_steps or epochs, not both")
        if config.get("epochs") is not None and config["epochs"] < 1:
            raise ConfigError(where, "epochs", "must be >= 1")
        cls.check_student(config, where)
        student = cls.effective_config(config)["student"]
        if config["student_checkpoint"] and student != "mantis":
            raise ConfigError(where, "student_checkpoint", "only the mantis student loads weights")
        if config["student_checkpoint"] and not Path(config["student_checkpoint"]).exists():
            raise ConfigError(where, "student_checkpoint", f"no such file or folder: {config['student_checkpoint']}")
        if config["teacher_checkpoint"] and not Path(config["teacher_checkpoint"]).is_file():
            raise ConfigError(where, "teacher_checkpoint", f"not a file: {config['teacher_checkpoint']}")

    @classmethod
    def default_sync_batchnorm(cls, config: dict[str, Any]) -> bool:
        """True at every size: the release trains on one GPU (comodo/train.py:136), so its student's BatchNorm
        (utils/model_util.py:21) normalises over the whole batch; synchronising makes a global batch B on N
        processes do the same (with the gathered bank in ``Comodo.loss``, one step equals one step with batch B).
        It only acts under torchrun, and costs one all-reduce of 2 x 2048 floats per step.

        Args:
            config: a resolved configuration.
        """
        return True

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the size's student, batch, run length and teacher normalisation filled in (and
        ``sync_batchnorm``, ``default_sync_batchnorm``).

        Args:
            config: a resolved configuration (``resolve_config``).
        """
        out = super().effective_config(config)
        paper = config.get("size") == "paper"
        if out.get("student") is None:
            out["student"] = "mantis" if paper else "transformer"
        if out.get("batch_size") is None:
            out["batch_size"] = 128 if paper else 32
        if out.get("max_steps") is None and out.get("epochs") is None:
            out["epochs" if paper else "max_steps"] = 20 if paper else 100
        if out.get("teacher_standardise") is None:
            out["teacher_standardise"] = not paper
        if out.get("queue_holdout") is None:
            out["queue_holdout"] = paper
        for key, default in (("student_checkpoint", ""), ("random_student", False), ("lr_schedule", "clean")):
            out.setdefault(key, default)  # configurations stored before these keys
        return out

    @classmethod
    def check_student(cls, config: dict[str, Any], where: str | Path = "train comodo") -> None:
        """Refuse a Mantis student with neither weights nor ``random_student`` (as ``train slidr`` refuses a random
        teacher): a randomly initialised Mantis is not the released student, and its numbers would pass for it.

        Args:
            config: a resolved configuration.
            where: where the configuration came from, for the error.
        """
        eff = cls.effective_config(config)
        if eff["student"] == "mantis" and not eff["student_checkpoint"] and not eff["random_student"]:
            raise ConfigError(where, "student_checkpoint", "the mantis student needs local Mantis-8M weights "
                              "(--student-checkpoint PATH), or --random-student for a random init")

    @classmethod
    def config_sources(cls, config: dict[str, Any]) -> dict[str, str]:
        """Where each default comes from (Breezelled/COMODO 2666a02; docs/comodo.md "Released vs distillkit").

        Args:
            config: a resolved configuration (``resolve_config``).
        """
        paper = config.get("size") == "paper"
        return {
            "size": "distillkit's choice: 'paper' defaults to the released student and recipe, 'small' runs on a CPU",
            "student": (f"{_RELEASE}train.py:227-242 (Mantis-8M through create_pipeline, utils/model_util.py:531-534, "
                        "wrapped in IMUStudentMLP)" if paper else
                        "distillkit's choice: its own small transformer runs without downloaded weights"),
            "student_checkpoint": f"the release passes --imu_ckpt ({_RELEASE}train.py:41; paris-noah/Mantis-8M); "
                                  "distillkit reads it from a local path only",
            "random_student": "distillkit's choice: a Mantis student without weights must be asked for",
            "split": f"distillkit's choice: unset = train when the shards carry splits (the release distils on its "
                     f"train.txt, {_RELEASE}train.py:132 and 262), else every window",
            "max_steps": "distillkit's choice: small runs 100 steps on a CPU" if not paper else
                         "distillkit's choice: unset, the paper size trains by epochs",
            "epochs": (f"{_RELEASE}train.py:48 (--num_epochs 20)" if paper else
                       "distillkit's choice: unset, small trains by max_steps"),
            "batch_size": (f"{_RELEASE}train.py:49 (--batch_size 128, one GPU)" if paper else
                           "distillkit's choice: 32 runs on a CPU; the release uses 128 on one GPU "
                           f"({_RELEASE}train.py:49)"),
            "lr_schedule": f"distillkit's choice: clean; 'released' reproduces {_RELEASE}train.py:379-391, whose "
                           "total counts the queue's samples as batches, so its warm-up (from lr 0 at the first "
                           "step) may never end",
            "teacher_standardise": (f"{_RELEASE}utils/model_util.py:188-196 (pooled teacher features straight into "
                                    "the head)" if paper
                                    else "distillkit's choice: a random teacher's features all point one way; "
                                         "standardising restores their spread"),
            "queue_size": f"{_RELEASE}train.py:44 (--queue_size 16384)",
            "queue_holdout": (f"{_RELEASE}train.py:292-311 (queue windows drawn with a fixed seed and left out of the "
                              "first epoch) and :402-410 (added back at epoch 1); distillkit draws with its own "
                              "seeded permutation of the keys" if paper else
                              "distillkit's choice: small datasets clip the queue to every window, which would leave "
                              "epoch 0 empty"),
            "tau_s": f"{_RELEASE}train.py:45 (--student_temp 0.05)",
            "tau_t": f"{_RELEASE}train.py:46 (--teacher_temp 0.1)",
            "lr": f"{_RELEASE}train.py:47 (--learning_rate 3e-4; not scaled with the batch, train.py:385; "
                  "warm-up 10% then linear decay, train.py:383-391)",
            "weight_decay": f"{_RELEASE}train.py:385 (AdamW without weight_decay: torch's default 0.01)",
            "seed": f"distillkit's choice: 0 (the release's --seed is 42, {_RELEASE}train.py:56; streams differ)",
            "num_workers": f"{_RELEASE}train.py:329 (num_workers commented out: loading in the training "
                           "process)",
            "precision": f"{_RELEASE}train.py:413-422 (no autocast: fp32)",
            "log_every": f"distillkit's choice: the release prints every 10 batches ({_RELEASE}train.py:425) to stdout",
            "teacher_arch": f"distillkit's choice: '' uses the build's teacher (the release's --video_ckpt, {_RELEASE}"
                            "train.py:40, TimeSformer or VideoMAE, train.py:124-127)",
            "teacher_checkpoint": "distillkit's choice: '' uses the build's setting",
            "on_corrupt_shard": "distillkit's choice: a shard that differs from its record stops the run (the release "
                                "reads its data unchecked)",
            "sync_batchnorm": f"distillkit's choice: the release is single-GPU ({_RELEASE}train.py:136, no DDP), its "
                              "student's BatchNorm (utils/model_util.py:21) sees the whole batch; synchronised "
                              "BatchNorm makes a global batch on N processes do the same",
        }

    @classmethod
    def resolve_eval_options(cls, options: dict[str, Any], where: str | Path = "") -> dict[str, Any]:
        resolved = super().resolve_eval_options(options, where)
        where = where or f"eval {cls.name}"
        if not 0.0 < resolved["test_fraction"] < 1.0:
            raise ConfigError(where, "test_fraction", "must be between 0 and 1 (exclusive)")
        for key in ("probe_epochs", "splits"):
            if resolved[key] < 1:
                raise ConfigError(where, key, "must be >= 1")
        return resolved

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        return train_main(location(shards), out, config, device=device, resume=resume, strict=strict)

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        options = self.resolve_eval_options(options or {})
        protocol = options["protocol"] or ("svm" if config.get("size") == "paper" else "linear")
        return eval_main(checkpoint, [Path(s) for s in shards], config, device=device,
                         test_fraction=options["test_fraction"], probe_epochs=options["probe_epochs"],
                         splits=options["splits"], protocol=protocol)

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        """Balanced accuracy (mean recall over the activities present on the probe's test side) of the linear
        probe, averaged over the splits when there are several: the synthetic activities are not balanced after
        holding out whole recordings, and plain accuracy would reward the majority activity.

        Args:
            result: ``evaluate``'s result (``random_init``, and ``distilled`` when a checkpoint was evaluated).
        """
        source = result.get("mean") or result
        n_splits = len(result["splits"]["random_init"]) if "splits" in result else 1
        svm = result.get("protocol") == "svm"
        key = "top1" if svm else "balanced_accuracy"
        metric = ("top-1 accuracy (RBF-SVM)" if svm else "balanced accuracy") + (
            f", mean of {n_splits} splits" if n_splits > 1 else "")
        random = float(source["random_init"][key])
        distilled = float(source["distilled"][key]) if "distilled" in source else None
        return {"metric": metric, "distilled": distilled, "random": random,
                "gain": None if distilled is None else distilled - random}

    def format_eval(self, result: dict[str, Any]) -> str:
        from distillkit.train.clip_probe import format_probe_comparison

        rec = result.get("recordings", {})
        n_splits = len(result["splits"]["random_init"]) if "splits" in result else 1
        if result.get("protocol") == "svm":
            return self._format_svm(result, n_splits)
        head = (f"linear probe on activity labels: {rec.get('train', '?')} train / {rec.get('test', '?')} test "
                "recordings (held out whole)" + (f"; table: the first of {n_splits} splits" if n_splits > 1 else ""))
        lines = [head]
        if "distilled" not in result:
            r = result["random_init"]
            lines.append(f"random init only: accuracy {r['accuracy']:.3f}, balanced {r['balanced_accuracy']:.3f}")
        else:
            lines.append(format_probe_comparison(result["distilled"], result["random_init"]))
        if n_splits > 1:
            means = result["mean"]
            text = ", ".join(f"{name} {m['balanced_accuracy']:.3f}" for name, m in means.items())
            if "distilled" in means:
                gain = means["distilled"]["balanced_accuracy"] - means["random_init"]["balanced_accuracy"]
                text += f", gain {gain:+.3f}"
            lines.append(f"balanced accuracy, mean over {n_splits} splits: {text}")
        return "\n".join(lines)

    @staticmethod
    def _format_svm(result: dict[str, Any], n_splits: int) -> str:
        rec = result.get("recordings", {})
        lines = [f"released RBF-SVM protocol on activity labels ({result.get('split_source', '?')}): "
                 f"{rec.get('train', '?')} train / {rec.get('test', '?')} test recordings",
                 f"baseline: {result.get('baseline', 'the student before distillation')}"]
        for name in ("random_init", "distilled"):
            if name in result:
                r = result[name]
                label = "baseline" if name == "random_init" else "distilled"
                lines.append(f"{label:>9}: top-1 {r['top1']:.3f}  top-3 {r['top3']:.3f}  top-5 {r['top5']:.3f}  "
                             f"(C {r['C']:g}, {r['fit_windows']} fit / {r['test_windows']} test windows; top-1 of "
                             f"predict {r['top1_predict']:.3f})")
        if "distilled" in result:
            lines.append(f"top-1 gain {result['distilled']['top1'] - result['random_init']['top1']:+.3f}")
        if n_splits > 1:
            means = result["mean"]
            lines.append(f"top-1, mean over {n_splits} splits: "
                         + ", ".join(f"{name} {m['top1']:.3f}" for name, m in means.items()))
        return "\n".join(lines)
