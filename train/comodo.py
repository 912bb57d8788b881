"""COMODO video-to-IMU distillation (reference/comodo_audio.md part A): method, trainer and evaluation.

An IMU student learns to place each window among a FIFO queue of frozen video-teacher embeddings the way the
teacher places it: ``loss = -sum softmax(z_t Q^T / tau_t) * log_softmax(z_s Q^T / tau_s)`` (tau_t 0.1,
tau_s 0.05: the student is sharper), with ``Q = [queue; z_t of the batch]`` and the queue then ``Q[B:]``.

- **Teacher side.** ``teacher.npy`` from the shards (the build's teacher stage, computed once), or, when the
  shards have none, the same frozen video teacher run on the stored frames (said in the log). As in the
  released code, the teacher embedding then passes through a frozen, randomly initialised MLP (Linear -> BN ->
  GELU -> Linear, 2048 hidden, 128 out; never trained) and is L2-normalised.
- **Student.** One encoder shared by the six channels (each channel on its own, as Mantis/MOMENT encode
  channels), the six features concatenated, then the same kind of MLP head (trained) and L2 normalisation;
  at evaluation the head is dropped. The per-channel encoder is a small transformer over patches of the
  channel linearly interpolated to 512 samples (Mantis' input length): ``small`` (64-d, 2 layers; CPU tests
  and the demo) or ``paper`` (256-d, 6 layers, ~8 M parameters with the head, Mantis-8M's budget).
- **Queue.** ``queue_size`` (default 16384) embeddings, first filled with the teacher embeddings of windows
  drawn with a fixed seed from the shards (the released code holds them out of epoch 0; here they are not
  held out) and clipped to the dataset's size when that is smaller. It is a buffer of the method, so it is
  checkpointed and a resumed run continues with the same queue. The windows are chosen by key, uniformly over
  the whole dataset (keys listed from the tar headers, without reading the samples), then one pass reads only
  those: one window is held at a time, never a shuffle buffer of thousands of windows with all their JPEGs.
- **Optimiser.** AdamW 3e-4, linear warm-up over 10% of the steps then linear decay (released schedule).
- **Teacher statistics.** Raw teacher embeddings are standardised per dimension (mean/std of the queue's initial
  windows, kept in the checkpoint) before the frozen head: a randomly initialised teacher's mean-pooled ReLU
  features point almost the same way for every clip (cosine ~0.997 on the synthetic data), which makes the
  teacher's targets uniform and leaves nothing to distil; standardising restores their spread (mean cosine ~0).
- **Normalisation.** IMU channels are standardised with the per-channel mean/std the build wrote into
  ``index.json`` (the released code uses raw values; standardising keeps gravity from dominating). They are
  buffers of the method, so the checkpoint keeps them, and evaluating a checkpoint standardises with *its*
  statistics, whatever shards it is evaluated on (the student was trained on those inputs).
"""

from __future__ import annotations

import logging
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.pipelines.manifest import Key
from distillkit.sensors.imu import CHANNELS
from distillkit.train import distributed
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import ShardStream, make_loader, shard_files

log = logging.getLogger(__name__)

MANTIS_LENGTH = 512


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


def comodo_loss(z_s: Tensor, z_t: Tensor, queue: Tensor, tau_s: float = 0.05, tau_t: float = 0.1) -> Tensor:
    """COMODO's distillation loss (released ``loss.py``), averaged over the batch.

    Args:
        z_s: (B, D) unit student embeddings.
        z_t: (B, D) unit teacher embeddings (no gradient).
        queue: (K, D) unit teacher embeddings of earlier windows.
        tau_s, tau_t: student and teacher temperatures.
    """
    bank = torch.cat([queue, z_t], 0).detach()
    target = F.softmax(z_t.detach() @ bank.T / tau_t, dim=1)
    return -(target * F.log_softmax(z_s @ bank.T / tau_s, dim=1)).sum(1).mean()


class Comodo(nn.Module):
    """Student + frozen teacher projection + queue; ``loss(batch)`` for the shared loop."""

    def __init__(self, size: StudentSize, teacher_dim: int, queue: Tensor, mean: Tensor, std: Tensor,
                 tau_s: float, tau_t: float, seed: int, teacher: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(seed)  # eval_main rebuilds this init as the random-init baseline
        self.student = ImuStudent(size)
        torch.manual_seed(seed + 1)
        self.teacher_head = projection_mlp(teacher_dim, 2048, size.out_dim).eval()
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.video_teacher = teacher  # frames -> embedding when the shards hold no teacher.npy
        self.register_buffer("queue", queue.clone())
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

    @torch.no_grad()
    def fill_queue(self, raw: Tensor) -> None:
        """Set the teacher statistics from ``raw`` (K, D) teacher embeddings and the queue to their projections."""
        self.t_mean.copy_(raw.mean(0))
        self.t_std.copy_(raw.std(0, unbiased=False).clamp_min(1e-6) if len(raw) > 1 else torch.ones_like(raw[0]))
        self.queue.copy_(self.project_teacher(raw))

    def loss(self, batch: dict[str, Any]) -> Tensor:
        z_t = self.teacher_embedding(batch)
        z_s = self.student(self.normalise(batch["imu"]))
        loss = comodo_loss(z_s, z_t, self.queue, self.tau_s, self.tau_t)
        with torch.no_grad():  # FIFO: the batch's teacher embeddings (every rank's, as MoCo) push out the oldest
            z_all = distributed.gather_rows(z_t.detach()).to(self.queue.dtype)
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


def make_stream(shards: Path, seed: int, strict: bool, epochs: int | None = None, shuffle: bool = True,
                shuffle_buffer: int = 512, rank: int = 0, world_size: int = 1) -> ShardStream:
    """The training stream: imu.npy + teacher.npy (or the frames when the shards hold no teacher.npy);
    ``rank`` of ``world_size`` reads its share of the shards."""
    return ShardStream(shards, seed=seed, epochs=epochs, shuffle_shards=shuffle, rank=rank, world_size=world_size,
                       shuffle_buffer=shuffle_buffer if shuffle else 0, required=("imu.npy", "times.json"),
                       check=_check, transform=_sample, strict=strict, images="raw")


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
    return {"mean": mean, "std": std, "samples": int(index["counts"]["written"]), "teacher": teacher}


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
            with tarfile.open(path) as tar:
                for member in tar:
                    match = _KEY.match(member.name)
                    if match and (not keys or keys[-1] != match.group(1)):  # a sample's members are contiguous
                        keys.append(match.group(1))
        except (tarfile.TarError, OSError) as exc:
            log.warning("%s: cannot list its samples for the queue (%s): left out", path, exc)
    return keys


class KeySelect:
    """A ``ShardStream`` ``select`` keeping the samples whose key is in ``keys`` (module-level, so it pickles)."""

    def __init__(self, keys: set[str]):
        self.keys = keys

    def __call__(self, raw: dict[str, Any]) -> bool:
        return raw.get("__key__") in self.keys

    def __repr__(self) -> str:
        return f"{len(self.keys)} windows chosen for the queue"


def _queue_item(s: dict[str, Any], rng: Any, gen: Any) -> tuple[str, dict[str, Any]]:
    """(key, teacher embedding or frames) of one queue window: the frames are decoded only without teacher.npy."""
    if "teacher.npy" in s:
        return s["__key__"], {"teacher": torch.from_numpy(s["teacher.npy"].astype(np.float32))}
    from distillkit.sensors.images import decode_rgb

    return s["__key__"], {"frames": np.stack([decode_rgb(s[k]) for k in sorted(s) if k.startswith("frame")])}


def _embed_keys(shards: Path, keys: list[str], video_teacher: nn.Module | None, device: str,
                batch: int = 64) -> dict[str, Tensor]:
    """Raw teacher embeddings of the windows ``keys``, by key, in one pass over the shards that holds one window
    (plus up to ``batch`` decoded clips waiting for the video teacher) at a time.

    Args:
        shards: the shard directory.
        keys: the windows wanted.
        video_teacher: the frozen teacher, for shards without teacher.npy.
        device: where the video teacher runs.
        batch: clips per teacher forward.
    """
    from distillkit.preprocess.video_encoder import embed_clips

    stream = ShardStream(shards, epochs=1, shuffle_shards=False, required=("imu.npy", "times.json"), check=_check,
                         transform=_queue_item, images="raw", select=KeySelect(set(keys)))
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
                               device: str = "cpu") -> Tensor:
    """Raw teacher embeddings (size, D) of ``size`` windows drawn uniformly with ``seed`` from the whole dataset,
    in the drawn order.

    The draw is over keys (:func:`shard_keys`), so memory holds keys and embeddings, not samples; windows that turn
    out unusable are replaced by the next ones of the same seeded permutation.

    Args:
        shards: the shard directory.
        size: windows wanted (fewer when the shards hold fewer usable ones).
        seed: the draw's seed.
        video_teacher: the frozen teacher, for shards without teacher.npy.
        device: where the video teacher runs.

    Raises:
        ValueError: no usable window.
    """
    order = shard_keys(shards)
    random.Random(f"comodo-queue/{seed}").shuffle(order)
    found: dict[str, Tensor] = {}
    used = 0
    while len(found) < size and used < len(order):
        wanted = order[used:used + size - len(found)]
        used += len(wanted)
        found.update(_embed_keys(shards, wanted, video_teacher, device))
    if not found:
        raise ValueError(f"{shards}: no usable window for the queue")
    return torch.stack([found[k] for k in order[:used] if k in found])


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


def build_method(shards: Path, config: dict[str, Any], device: str, with_queue: bool = True) -> Comodo:
    """The COMODO method for ``shards`` (queue filled when ``with_queue``; else a placeholder of the same size)."""
    info = shard_info(shards)
    needs_frames = not _has_teacher(shards)
    teacher, dim = _teacher_for(info, config, needs_frames)
    size = SIZES[config["size"]]
    k = min(config["queue_size"], info["samples"])
    method = Comodo(size, dim, torch.zeros(k, size.out_dim), torch.tensor(info["mean"]), torch.tensor(info["std"]),
                    config["tau_s"], config["tau_t"], config["seed"], teacher)
    if with_queue:
        if k < config["queue_size"]:
            log.info("queue clipped to the dataset: %d windows (queue_size %d)", k, config["queue_size"])
        raw = initial_teacher_embeddings(shards, k, config["seed"], teacher)
        if len(raw) < k:
            raise ValueError(f"{shards}: only {len(raw)} usable windows for a queue of {k} (index.json counts "
                             f"{info['samples']}): rebuild the shards or lower queue_size")
        method.fill_queue(raw)
    return method


def train_main(shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu", resume: bool = False,
               strict: bool = False) -> dict[str, Any]:
    """Train COMODO on ``shards`` (see the module docstring); returns the loop's final metrics."""
    seed = config["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed)
    ranks = distributed.ranks()
    # rank 0 decides (a node-local or lagging view of OUT must not make ranks disagree) and alone fills the queue:
    # DDP copies its buffers, the queue and the teacher statistics, to every rank
    resuming = distributed.from_rank0(resume and out is not None and (Path(out) / "latest.pt").is_file())
    method = build_method(Path(shards), config, device, with_queue=not resuming and ranks.main)
    stream = make_stream(Path(shards), seed, strict, rank=ranks.rank, world_size=ranks.world_size)
    steps = config["max_steps"]
    cfg = LoopConfig(max_steps=steps, device=device, out=Path(out) if out is not None else None, resume=resume,
                     log_every=config["log_every"], ckpt_every=max(1, steps // 4) if steps >= 8 else 0,
                     run_config=config, optimizer="adamw", lr=config["lr"], weight_decay=config["weight_decay"],
                     warmup_steps=int(round(0.1 * steps)), schedule="linear", grad_clip=None,
                     bf16=config["precision"] == "bf16")
    metrics = train_loop(
        method,
        lambda: make_loader(stream, config["batch_size"], collate, num_workers=config["num_workers"], device=device),
        cfg,
        batch_size=lambda b: len(b["imu"]),
    )
    metrics.update(bad_samples=stream.bad_samples, queue=len(method.queue),
                   teacher="stored teacher.npy" if method.video_teacher is None else "computed from frames")
    return metrics


# --------------------------------------------------------------------------- evaluation


def window_features(student: ImuStudent, shards: list[Path], mean: Tensor, std: Tensor,
                    device: str = "cpu") -> tuple[np.ndarray, list[str], list[str]]:
    """Frozen student features of every labelled window: ((N, F), labels, recording uids), in shard order."""
    from distillkit.train.progress import progress, shard_sample_count

    feats, labels, groups = [], [], []
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
            if len(batch) == 256:
                flush()
    flush()
    if not feats:
        raise ValueError(f"{', '.join(map(str, shards))}: no labelled window (labels.csv) to evaluate on")
    return np.concatenate(feats), labels, groups


def eval_students(checkpoint: Path | None, shards: list[Path],
                  config: dict[str, Any]) -> tuple[dict[str, ImuStudent], Tensor, Tensor]:
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
    info = shard_info(shards[0])
    mean, std = torch.tensor(info["mean"]), torch.tensor(info["std"])
    size = SIZES[config["size"]]
    torch.manual_seed(config["seed"])  # the same init as the distilled run started from
    students = {"random_init": ImuStudent(size)}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)["model"]
        distilled = ImuStudent(size)
        distilled.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        students["distilled"] = distilled
        if "mean" in state and "std" in state:
            mean, std = state["mean"].reshape(-1).float(), state["std"].reshape(-1).float()
        else:
            log.warning("%s holds no IMU mean/std: standardising with %s's statistics", checkpoint, shards[0])
    return students, mean, std


def eval_main(checkpoint: Path | None, shards: list[Path], config: dict[str, Any], device: str = "cpu",
              test_fraction: float = 0.3, probe_epochs: int = 300, splits: int = 1) -> dict[str, Any]:
    """Linear probe of frozen student features on the window labels, distilled against the same student at
    random init (same seed), test windows from recordings the probe never trained on.

    Args:
        checkpoint: a ``train comodo`` checkpoint, or None for the random init alone.
        shards: the evaluated shard directories (windows with ``label.txt``).
        config: the trainer configuration (``size``, ``seed``).
        device: where the students compute their features (the probe runs on the CPU).
        test_fraction: share of the recordings (per majority activity) on the test side.
        probe_epochs: full-batch steps of the probe.
        splits: train/test splits of the recordings (seeds ``seed`` .. ``seed + splits - 1``); the same splits for
            both students. ``random_init``/``distilled`` hold the first split's probe; with more than one,
            ``mean`` holds each student's accuracy and balanced accuracy averaged over the splits (a few held-out
            recordings make one split's figure move by several points: which recordings are held out matters
            as much as the weights) and ``splits`` each split's figures.

    Raises:
        ValueError: no labelled window, fewer than two recordings, or ``splits`` < 1.
    """
    from distillkit.train.clip_probe import group_split, linear_probe

    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    students, mean, std = eval_students(checkpoint, shards, config)
    results: dict[str, Any] = {}
    cuts: list[tuple[np.ndarray, np.ndarray]] = []
    per_split: dict[str, list[dict[str, float]]] = {}
    for name, student in students.items():
        x, labels, groups = window_features(student, shards, mean, std, device)
        classes = sorted(set(labels))
        y = np.array([classes.index(lab) for lab in labels])
        if not cuts:
            for k in range(splits):
                split = group_split(groups, test_fraction, seed=config["seed"] + k, labels=labels)
                if len(split[0]) == 0 or len(split[1]) == 0:  # too few recordings per activity to stratify
                    split = group_split(groups, test_fraction, seed=config["seed"] + k)
                if len(split[0]) == 0 or len(split[1]) == 0:
                    raise ValueError(f"need labelled windows from at least two recordings, got {len(set(groups))}")
                cuts.append(split)
        probes = [linear_probe(x[tr], y[tr], x[te], y[te], classes, epochs=probe_epochs, seed=config["seed"])
                  for tr, te in cuts]
        results[name] = probes[0]
        per_split[name] = [{k: p[k] for k in ("accuracy", "balanced_accuracy")} for p in probes]
    results["recordings"] = {"train": len({groups[i] for i in cuts[0][0]}),
                             "test": len({groups[i] for i in cuts[0][1]})}
    if splits > 1:
        results["splits"] = per_split
        results["mean"] = {name: {k: float(np.mean([p[k] for p in rows])) for k in ("accuracy", "balanced_accuracy")}
                           for name, rows in per_split.items()}
    return results


class ComodoTrainer(Trainer):
    """``distillkit train comodo``: the keys below plus the common ones (``train.base``)."""

    name = "comodo"
    pipeline = "comodo"
    summary = "COMODO video-to-IMU distillation (queue of frozen video-teacher embeddings)"
    schema = {
        "size": Key(str, "small", choices=tuple(SIZES), doc="student size: small (CPU, tests) or paper (~8 M)"),
        "batch_size": Key(int, 32, doc="windows per step (released: 128)"),
        "queue_size": Key(int, 16384, doc="teacher embeddings in the FIFO queue (clipped to the dataset)"),
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
    }

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        if config["queue_size"] < 1:
            raise ConfigError(where, "queue_size", "must be >= 1")
        for key in ("tau_s", "tau_t", "lr"):
            if config[key] <= 0:
                raise ConfigError(where, key, "must be > 0")
        if config["teacher_checkpoint"] and not Path(config["teacher_checkpoint"]).is_file():
            raise ConfigError(where, "teacher_checkpoint", f"not a file: {config['teacher_checkpoint']}")

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
        return train_main(Path(shards), out, config, device=device, resume=resume, strict=strict)

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        options = self.resolve_eval_options(options or {})
        return eval_main(checkpoint, [Path(s) for s in shards], config, device=device,
                         test_fraction=options["test_fraction"], probe_epochs=options["probe_epochs"],
                         splits=options["splits"])

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        """Balanced accuracy (mean recall over the activities present on the probe's test side) of the linear
        probe, averaged over the splits when there are several: the synthetic activities are not balanced after
        holding out whole recordings, and plain accuracy would reward the majority activity.

        Args:
            result: ``evaluate``'s result (``random_init``, and ``distilled`` when a checkpoint was evaluated).
        """
        source = result.get("mean") or result
        n_splits = len(result["splits"]["random_init"]) if "splits" in result else 1
        metric = "balanced accuracy" + (f", mean of {n_splits} splits" if n_splits > 1 else "")
        random = float(source["random_init"]["balanced_accuracy"])
        distilled = float(source["distilled"]["balanced_accuracy"]) if "distilled" in source else None
        return {"metric": metric, "distilled": distilled, "random": random,
                "gain": None if distilled is None else distilled - random}

    def format_eval(self, result: dict[str, Any]) -> str:
        from distillkit.train.clip_probe import format_probe_comparison

        rec = result.get("recordings", {})
        n_splits = len(result["splits"]["random_init"]) if "splits" in result else 1
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
