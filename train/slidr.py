"""SLidR image-to-lidar distillation (reference/slidr.md §3-4): method, ``train_main``, ``eval_main``.

The 3D network (``SparseUNet``) is trained so that superpixel-pooled point features match the
superpixel-pooled features of a frozen dilated ResNet teacher followed by a trainable 1x1 decoder.

Sizes: ``small`` = tiny ResNet (layers 1-1-1-1, width 16) teacher and a 3-level sparse UNet,
crops of 112x208 and ``min_pairs`` 64 so CPU runs on synthetic data take seconds; it is optimised
with AdamW (lr 2e-3, 100 steps of batch 2, bf16 on CUDA, gradient clipping at 10) because SGD at
the paper's lr 0.5 needs the paper's long schedule. ``paper`` = the released recipe
(``config/slidr_minkunet.yaml``): MoCo v2 ResNet-50 with replace_stride_with_dilation=(True, True,
True) (2048x56x104 for 224x416), Res16UNet34C, min_pairs 1024, batch 4, 50 epochs, SGD lr 0.5,
momentum 0.9, dampening 0.1, weight decay 1e-4, cosine annealing stepped once per epoch, float32
and no gradient clipping (bf16 and clipping remain options).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.pipelines.manifest import Key
from distillkit.remote import location
from distillkit.sensors.nuscenes_splits import ALL, SPLIT_NAMES, split_scenes
from distillkit.train import distributed
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.image_decode import decode_crops, nvjpeg_available
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.models.resnet import FrozenTeacher, ResNet, load_moco_v2
from distillkit.train.models.sparse import PAPER, SMALL, SparseUNet, SparseUNetConfig
from distillkit.train.models.vit_teacher import DINO_TEACHERS, ViTTeacher, build_vit_teacher
from distillkit.train.probe import format_probe
from distillkit.train.slidr_aug import check_slidr, slidr_collate, slidr_required, slidr_train_transform
from distillkit.train.slidr_loss import superpixel_nce_loss
from distillkit.train.streaming import JsonFieldFilter, ShardStream, make_loader, shard_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlidrSize:
    """Network, crop and optimiser settings of one ``size``."""

    resnet_layers: tuple[int, ...]
    resnet_width: int
    point_net: SparseUNetConfig
    crop: tuple[int, int]
    min_pairs: int
    loop: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 2
    max_steps: int | None = 100  # the run length when neither max_steps nor epochs is given
    epochs: int | None = None
    bf16: bool = True  # autocast on CUDA (CPU runs are float32)
    grad_clip: float | None = 10.0
    sync_batchnorm: bool = False  # under torchrun: BatchNorm over the global batch


SIZES = {
    "small": SlidrSize(
        (1, 1, 1, 1),
        16,
        SMALL,
        (112, 208),
        64,
        {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_steps": 5},
    ),
    "paper": SlidrSize(
        (3, 4, 6, 3),
        64,
        PAPER,
        (224, 416),
        1024,
        {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-4},
        batch_size=4,
        max_steps=None,
        epochs=50,
        bf16=False,
        grad_clip=None,
        sync_batchnorm=True,
    ),
}


class SLidR(nn.Module):
    """3D student + frozen 2D teacher + trainable 1x1 decoder; ``loss(batch)`` is the superpixel NCE."""

    def __init__(
        self,
        point_net: SparseUNet,
        teacher: FrozenTeacher | ViTTeacher,
        crop: tuple[int, int],
        feat_dim: int = 64,
        temperature: float = 0.07,
    ):
        super().__init__()
        self.point_net, self.teacher, self.crop, self.temperature = point_net, teacher, crop, temperature
        self.decoder = nn.Conv2d(teacher.out_channels if isinstance(teacher, ViTTeacher) else teacher.net.out_channels,
                                 feat_dim, 1)

    def train(self, mode: bool = True) -> SLidR:
        super().train(mode)
        self.teacher.train(False)  # frozen: always eval
        return self

    def image_features(self, images: Tensor) -> Tensor:
        """(I, 3, h, w) in [0, 1] -> (I, feat_dim, h, w) unit vectors (bilinear, align_corners=True)."""
        f = self.decoder(self.teacher(images))
        f = F.interpolate(f, size=self.crop, mode="bilinear", align_corners=True)
        return F.normalize(f, dim=1)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        f3 = self.point_net(batch["coords"], batch["feats"])
        images = batch.get("images")
        if images is None:  # deferred decoding: JPEG bytes -> crops on the training device
            images = decode_crops(batch["jpegs"], batch["boxes"], batch["flips"], self.crop, f3.device)
        f2 = self.image_features(images)
        return superpixel_nce_loss(
            f3[batch["pairing_points"]], f2, batch["superpixels"], batch["pairing_images"], self.temperature
        )


def build_point_net(size: str, seed: int) -> SparseUNet:
    torch.manual_seed(seed)  # the distilled net and the random-init baseline start from the same weights
    return SparseUNet(SIZES[size].point_net)


TEACHERS = ("moco_v2_resnet50", *DINO_TEACHERS)


def build_method(size: str, seed: int, teacher_checkpoint: Path | None = None,
                 teacher: str = "moco_v2_resnet50") -> SLidR:
    """The SLidR module at ``size``: point network (seeded), frozen image teacher, trainable 1x1 decoder.

    Args:
        size: "small" or "paper".
        seed: seeds the point network and decoder.
        teacher_checkpoint: the teacher's weights (MoCo v2 ResNet-50, or a DINO ViT /8 backbone).
        teacher: "moco_v2_resnet50" (the release's default, config/slidr_minkunet.yaml:30-32), "dino_vits8" or
            "dino_vitb8" (valeoai/SLidR model/image_model.py:179, :181).
    """
    cfg = SIZES[size]
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r} ({' | '.join(TEACHERS)})")
    point_net = build_point_net(size, seed)
    if teacher in DINO_TEACHERS:
        return SLidR(point_net, build_vit_teacher(teacher, size, teacher_checkpoint), cfg.crop)
    resnet = ResNet(cfg.resnet_layers, cfg.resnet_width, replace_stride_with_dilation=(True, True, True))
    load_moco_v2(resnet, teacher_checkpoint)
    return SLidR(point_net, FrozenTeacher(resnet), cfg.crop)


def make_stream(
    shards: Path,
    size: str,
    seed: int,
    strict: bool,
    rank: int = 0,
    world_size: int = 1,
    augment: bool = True,
    epochs: int | None = None,
    shuffle_buffer: int = 256,
    decode_on_device: bool = False,
    split: str = ALL,
    on_corrupt: str = "stop",
) -> ShardStream:
    """The training stream.

    Args:
        shards: the shard directory.
        size: a key of ``SIZES`` (crop size, ``min_pairs``).
        seed: seed of shard order, shuffle buffer and augmentations.
        strict: raise on the first bad sample instead of skipping it.
        rank: this process's rank; ``world_size`` the number of ranks.
        world_size: the number of ranks.
        augment: SLidR's augmentations (False: the validation resize).
        epochs: passes over the data; ``None`` = forever.
        shuffle_buffer: samples each loader worker holds for shuffling, as stored bytes (decoded
            only when they leave it): 0.42 MB each on small synthetic data, 3.1 MB at nuScenes
            resolution, so 256 cost ~0.8 GB per worker (docs/decisions.md). The build already
            permutes keyframes over the whole dataset; the buffer, about two 128-sample shards,
            changes batch composition from epoch to epoch.
        decode_on_device: leave JPEGs undecoded in the loader; the model decodes and crops them where
            the batch is (nvJPEG on CUDA, see ``train.image_decode``).
        split: keep only samples whose ``meta.json`` scene is in this split
            (``distillkit.sensors.nuscenes_splits``); ``"all"`` keeps every sample. Samples without
            ``meta.json`` (older shards) are kept, with one warning.
    """
    cfg = SIZES[size]
    tf = functools.partial(slidr_train_transform, crop=cfg.crop, min_pairs=cfg.min_pairs, augment=augment)
    return ShardStream(
        shards,
        seed=seed,
        epochs=epochs,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        required=slidr_required(),
        check=check_slidr,
        transform=tf,
        strict=strict,
        keep_raw=(".jpg",) if decode_on_device else (),
        select=split_filter(split),
        on_corrupt=on_corrupt,
    )


def loop_config(
    size: str, max_steps: int, device: str, out: Path | None, resume: bool = False, log_every: int = 10,
    run_config: dict[str, Any] | None = None, steps_per_epoch: int | None = None, bf16: bool | None = None,
    grad_clip: float | None = None, global_batch: int | None = None, sync_batchnorm: bool | None = None,
) -> LoopConfig:
    """The training-loop settings of ``size`` (optimiser, lr, schedule), checkpointing 4 times a run.

    ``steps_per_epoch`` anneals the lr once per epoch (the released schedule); ``bf16`` and
    ``grad_clip`` default to the size's (paper: float32, no clipping)."""
    cfg = SIZES[size]
    return LoopConfig(
        max_steps=max_steps,
        device=device,
        out=out,
        resume=resume,
        log_every=log_every,
        ckpt_every=max(1, max_steps // 4) if max_steps >= 8 else 0,
        run_config=run_config,
        steps_per_epoch=steps_per_epoch,
        bf16=cfg.bf16 if bf16 is None else bf16,
        grad_clip=cfg.grad_clip if grad_clip is None else (grad_clip or None),
        global_batch=global_batch,
        sync_batchnorm=cfg.sync_batchnorm if sync_batchnorm is None else sync_batchnorm,
        **cfg.loop,
    )


def batch_samples(batch: dict[str, Any]) -> int:
    """Number of samples (keyframes) in a collated SLidR batch."""
    return len(batch["keys"])


def split_filter(split: str) -> JsonFieldFilter | None:
    """The stream's ``select`` for ``split``: keep samples whose ``meta.json`` scene is in it
    (None for ``"all"``)."""
    scenes = split_scenes(split)
    return None if scenes is None else JsonFieldFilter("meta.json", "scene", scenes, f"scenes of split {split!r}")


def count_split_samples(shards: Path, split: str) -> int:
    """Samples of ``shards`` that the training stream keeps for ``split`` (for epoch lengths).

    Reads ``index.json`` when the build's own split decides it, else only the ``meta.json`` members
    of the tars (tar headers are skipped over, images are never read) through the stream's own
    ``split_filter``; a sample the filter cannot read is not counted (the stream skips it as bad)."""
    import tarfile

    from distillkit.pipelines.shards import load_index, open_shard

    index = load_index(shards)
    select = split_filter(split)
    built = index.get("manifest", {}).get("source", {}).get("split")
    if select is None or built == split:
        return int(index["counts"]["written"])
    kept = 0
    for path in shard_files(shards):
        metas: dict[str, dict[str, bytes]] = {}
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:  # a URL: range requests
            for member in tar:
                key, _, name = member.name.partition(".")
                raw = metas.setdefault(key, {})
                if name == "meta.json" and (f := tar.extractfile(member)) is not None:
                    raw[name] = f.read()
        for raw in metas.values():
            try:
                kept += select(raw)
            except ValueError:
                continue
    return kept


def resolve_schedule(size: str, max_steps: int | None, epochs: int | None, batch_size: int | None,
                     shards: Path, split: str) -> tuple[int, int | None, int]:
    """(max_steps, steps_per_epoch or None, batch_size) from the options and the size's defaults.

    Raises:
        ValueError: both ``max_steps`` and ``epochs``, or an epoch shorter than one batch.
    """
    cfg = SIZES[size]
    batch_size = batch_size or cfg.batch_size
    if max_steps is not None and epochs is not None:
        raise ValueError("give max_steps or epochs, not both")
    if max_steps is None and epochs is None:
        max_steps, epochs = cfg.max_steps, cfg.epochs
    if epochs is None:
        return int(max_steps), None, batch_size  # type: ignore[arg-type]
    n = count_split_samples(shards, split)
    world = distributed.ranks().world_size
    # batch_size is the global batch (released: the datamodule divides it by the GPU count), and the loader drops
    # the last partial batch
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"{shards}: {n} samples of split {split!r}, fewer than one batch of {batch_size}")
    log.info("%d epochs of %d steps (%d samples of split %r, global batch %d over %d process(es))", epochs,
             per_epoch, n, split, batch_size, world)
    return epochs * per_epoch, per_epoch, batch_size


def train_main(
    shards: Path,
    out: Path | None,
    device: str = "cpu",
    max_steps: int | None = None,
    resume: bool = False,
    strict: bool = False,
    size: str = "small",
    seed: int = 0,
    batch_size: int | None = None,
    num_workers: int = 0,
    teacher_checkpoint: Path | None = None,
    log_every: int = 10,
    decode_on_device: bool | None = None,
    split: str = "pretrain",
    epochs: int | None = None,
    precision: str = "auto",
    grad_clip: float | None = None,
    random_teacher: bool = False,
    sync_batchnorm: bool | None = None,
    teacher: str = "moco_v2_resnet50",
    on_corrupt_shard: str = "stop",
) -> dict:
    """Train SLidR on ``shards``; checkpoints go to ``out/latest.pt``. Returns the final metrics.

    Args:
        shards: a slidr shard directory.
        out: run directory; ``None`` writes nothing (no checkpoint, no run log): for benchmarks,
            where checkpoint writes would let the loader workers refill their queues between steps.
        device: ``"cpu"`` or ``"cuda"``.
        max_steps, epochs: the run length, one or the other (default: the size's, small 100 steps,
            paper 50 epochs); with ``epochs`` the lr anneals once per epoch.
        resume: continue from ``out/latest.pt``.
        strict: stop at the first bad sample.
        size: ``"small"`` or ``"paper"`` (``SIZES``).
        seed: seeds weights, shuffling and augmentations.
        batch_size: samples per step (default: the size's, small 2, paper 4).
        num_workers: DataLoader workers.
        teacher_checkpoint: MoCo v2 ResNet-50 weights for the teacher.
        log_every: steps per logged window.
        decode_on_device: None decodes JPEGs with nvJPEG on the GPU when training on CUDA with
            torchvision importable, else in the loader on the CPU.
        split: train on the samples of these nuScenes scenes (``"pretrain"``, ``"all"``, ...).
        precision: ``"auto"`` (small: bf16 on CUDA; paper: float32, as released), ``"fp32"``, ``"bf16"``.
        grad_clip: gradient-norm clip; None = the size's (small 10, paper none); 0 = none.
        sync_batchnorm: BatchNorm over the global batch under torchrun (None: the size's; paper as released).
        random_teacher: allow ``size="paper"`` without ``teacher_checkpoint`` (the paper's teacher is
            MoCo v2; a random one is a different experiment, so it has to be asked for).
        teacher: the image teacher (``TEACHERS``): "moco_v2_resnet50" or a DINO ViT /8 ("dino_vits8",
            "dino_vitb8"), whose weights ``teacher_checkpoint`` holds.
        on_corrupt_shard: a shard whose sha256 differs from its record: ``"stop"`` or ``"skip"`` (``ShardStream``).

    Raises:
        ValueError: unknown size, paper without a teacher (and not ``random_teacher``), a bad schedule.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} ({' | '.join(SIZES)})")
    if size == "paper" and teacher_checkpoint is None and not random_teacher:
        raise ValueError(PAPER_TEACHER_MESSAGE)
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r} (auto | fp32 | bf16)")
    run_config = {"max_steps": max_steps, "epochs": epochs, "batch_size": batch_size, "num_workers": num_workers,
                  "seed": seed, "log_every": log_every, "size": size, "split": split, "precision": precision,
                  "grad_clip": grad_clip, "random_teacher": random_teacher, "sync_batchnorm": sync_batchnorm,
                  "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None, "teacher": teacher,
                  "on_corrupt_shard": on_corrupt_shard}
    steps, per_epoch, batch_size = resolve_schedule(size, max_steps, epochs, batch_size, location(shards), split)
    if decode_on_device is None:
        decode_on_device = str(device).startswith("cuda") and nvjpeg_available()
    log.info("JPEG decoding: %s", "on the training device" if decode_on_device else "in the data loader (CPU)")
    torch.manual_seed(seed)
    np.random.seed(seed)
    method = build_method(size, seed, teacher_checkpoint, teacher)
    ranks = distributed.ranks()  # under torchrun each rank reads its own shards
    stream = make_stream(location(shards), size, seed, strict, decode_on_device=decode_on_device, split=split,
                         rank=ranks.rank, world_size=ranks.world_size, on_corrupt=on_corrupt_shard)

    def batches() -> Any:
        return make_loader(stream, distributed.rank_batch(batch_size), slidr_collate, num_workers=num_workers,
                           device=device, timeout=600)

    bf16 = None if precision == "auto" else precision == "bf16"
    cfg = loop_config(size, steps, device, Path(out) if out is not None else None, resume=resume,
                      log_every=log_every, run_config=run_config, steps_per_epoch=per_epoch, bf16=bf16,
                      grad_clip=grad_clip, global_batch=batch_size, sync_batchnorm=sync_batchnorm)
    metrics = train_loop(method, batches, cfg, batch_size=batch_samples)
    metrics.update(size=size, seed=seed, bad_samples=stream.bad_samples, decode_on_device=decode_on_device)
    return metrics


PAPER_TEACHER_MESSAGE = (
    "--size paper needs the paper's teacher: --teacher-checkpoint with MoCo v2's 800-epoch ResNet-50 weights "
    "(moco_v2_800ep_pretrain.pth.tar, keys module.encoder_q.*; the fc layer is dropped); pass --random-teacher "
    "to train against a randomly initialised teacher knowingly (teacher = dino_vits8 / dino_vitb8: DINO's "
    "dino_deitsmall8_pretrain.pth / dino_vitbase8_pretrain.pth)"
)


# --------------------------------------------------------------------------- evaluation


def eval_main(
    checkpoint: Path | None, shards: Path | list[Path], device: str = "cpu", size: str = "small", seed: int = 0,
    finetune: int = 0, epochs: int = 100, probe_augment: bool | None = None,
) -> dict:
    """SLidR's downstream protocol (``train.slidr_eval``) for the distilled point network against the
    same network at random init (same seed): linear probing (``finetune=0``) or fine-tuning on
    ``finetune`` percent of the train scenes; ``epochs`` of the head or of fine-tuning; ``probe_augment``: re-augment
    the probe's clouds every epoch as released (None: on CUDA only)."""
    from distillkit.train.slidr_eval import evaluate

    state = None
    if checkpoint is not None:
        st = load_checkpoint(checkpoint)["model"]
        state = {k[len("point_net.") :]: v for k, v in st.items() if k.startswith("point_net.")}
    dirs = [location(shards)] if isinstance(shards, (str, Path)) else [location(d) for d in shards]
    return evaluate(lambda: build_point_net(size, seed), state, dirs, device=device, seed=seed,
                    finetune_percent=finetune, epochs=epochs, probe_augment=probe_augment)


class SlidrTrainer(Trainer):
    """``distillkit train slidr``: the keys below plus the common ones (``train.base``)."""

    name = "slidr"
    pipeline = "slidr"
    summary = "SLidR image-to-lidar distillation (superpixel-pooled InfoNCE)"
    schema = {
        "size": Key(str, "small", choices=tuple(SIZES), doc="network sizes: small (CPU, tests) or paper"),
        "max_steps": Key(int, None, doc="optimiser steps (default: small 100; paper trains by epochs)"),
        "epochs": Key(int, None, doc="passes over the training split, lr annealed once per epoch (paper: 50)"),
        "batch_size": Key(int, None, doc="samples per step (default: small 2, paper 4)"),
        "split": Key(str, "pretrain", choices=SPLIT_NAMES,
                     doc='train on the samples of these nuScenes scenes only (meta.json): "pretrain" = SLidR\'s '
                         '(train minus its 100 held-out scenes), "all" = every sample, or a devkit split'),
        "teacher": Key(str, "moco_v2_resnet50", choices=TEACHERS,
                       doc="frozen image teacher: MoCo v2 ResNet-50 (released default) or a DINO ViT-S/8 or "
                           "ViT-B/8 (released options; small size without a checkpoint: a tiny random ViT /8)"),
        "teacher_checkpoint": Key("existing_path", None,
                                  doc="the teacher's weights: MoCo v2 ResNet-50 (moco_v2_800ep_pretrain.pth.tar) or "
                                      "DINO's dino_deitsmall8_pretrain.pth / dino_vitbase8_pretrain.pth"),
        "random_teacher": Key(bool, False, doc="allow --size paper without --teacher-checkpoint"),
        "precision": Key(str, "auto", choices=("auto", "fp32", "bf16"),
                         doc="CUDA autocast; auto = bf16 for small, fp32 for paper as released (CPU: fp32)"),
        "grad_clip": Key(float, None, doc="gradient-norm clip (default: small 10, paper none; 0 = none)"),
    }
    eval_schema = {
        "finetune": Key(int, 0, doc="0 = linear probing; N = fine-tune on N% of the train scenes (released: 1)"),
        "epochs": Key(int, 100, doc="epochs of the probe's head or of fine-tuning (released: 100)"),
        "probe_augment": Key(bool, None, doc="linear probe: re-augment (rotation, flips) and re-voxelise the train "
                                             "clouds every epoch as released (default: on with CUDA, off on CPU, "
                                             "where it costs a trunk pass per epoch)"),
    }
    # 120 steps on the 6 pretrain keyframes of the small synthetic scenes: figures over 3 seeds in
    # docs/training.md "The demo".
    demo = {"max_steps": 120}

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        path = config.get("teacher_checkpoint")
        if path is not None and not Path(path).is_file():
            raise ConfigError(where, "teacher_checkpoint", f"not a file: {path}")
        if config.get("max_steps") is not None and config.get("epochs") is not None:
            raise ConfigError(where, "epochs", "give max_steps or epochs, not both")
        if config.get("epochs") is not None and config["epochs"] < 1:
            raise ConfigError(where, "epochs", "must be >= 1")
        if config["size"] == "paper" and path is None and not config.get("random_teacher"):
            raise ConfigError(where, "teacher_checkpoint", PAPER_TEACHER_MESSAGE)
        if path is not None and str(config.get("teacher", "")).startswith("dino"):
            # Before the run folder is made: a MoCo file given to a DINO teacher must be a one-line refusal, not a
            # traceback from inside training. The file is memory-mapped, so this costs a moment, not a copy.
            from distillkit.train.models.vit_teacher import build_vit_teacher

            try:
                build_vit_teacher(config["teacher"], config["size"], Path(path))
            except ValueError as exc:
                raise ConfigError(where, "teacher_checkpoint", str(exc)) from None

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the size's defaults filled in (``Trainer.effective_config``): the run length
        (``max_steps`` or ``epochs``, whichever the size trains by when neither is given), ``batch_size``,
        ``grad_clip`` and ``sync_batchnorm``.

        Args:
            config: a resolved configuration.
        """
        out = super().effective_config(config)
        s = SIZES[out["size"]]
        if out.get("max_steps") is None and out.get("epochs") is None:
            if s.epochs is not None:
                out["epochs"] = s.epochs
            else:
                out["max_steps"] = s.max_steps
        for key, value in {"batch_size": s.batch_size, "grad_clip": s.grad_clip}.items():
            if out.get(key) is None and value is not None:
                out[key] = value
        return out

    @classmethod
    def default_sync_batchnorm(cls, config: dict[str, Any]) -> bool:
        """The size's: paper synchronises, as released (pretrain.py:37-39).

        Args:
            config: a resolved configuration.
        """
        return SIZES[config["size"]].sync_batchnorm

    @classmethod
    def config_sources(cls, config: dict[str, Any]) -> dict[str, str]:
        """Where each value of ``effective_config(config)`` comes from (``Trainer.config_sources``): at
        ``size = "paper"`` the released file and line (valeoai/SLidR 14729d0), at ``small`` distillkit's
        reason.

        Args:
            config: a resolved configuration.
        """
        rel = "valeoai/SLidR"
        yaml = f"{rel} config/slidr_minkunet.yaml"
        src = {
            "split": f"{rel} pretrain/dataloader_nuscenes.py:15, :121-123 (phase parametrizing: train scenes minus "
                     "the 100 of CUSTOM_SPLIT)",
            "precision": f"{rel} pretrain.py:45-55 (Lightning Trainer without precision=: float32); "
                         "small bf16 on CUDA is distillkit's choice (speed)",
            "teacher_checkpoint": f"{rel} model/image_model.py:21 (moco_v2_800ep_pretrain.pth.tar, "
                                  f"{yaml}:30 image_weights: moco_v2)",
            "random_teacher": "distillkit's choice: a random teacher at paper size must be asked for",
            "teacher": f"{yaml}:27-32 (images_encoder resnet50, image_weights moco_v2); the DINO ViT-S/8 and "
                       f"ViT-B/8 options: {rel} model/image_model.py:177-182",
        }
        if config["size"] == "paper":
            src.update({
                "batch_size": f"{yaml}:8 (batch_size : 4, the global batch: pretrain/lightning_datamodule.py:29-30 "
                              "divides it by num_gpus)",
                "epochs": f"{yaml}:14 (num_epochs : 50; CosineAnnealingLR over epochs, "
                          f"{rel} pretrain/lightning_trainer.py:43)",
                "sync_batchnorm": f"{rel} pretrain.py:37-39 (num_gpus > 1: ME.MinkowskiSyncBatchNorm."
                                  "convert_sync_batchnorm on the 3D net, nn.SyncBatchNorm.convert_sync_batchnorm "
                                  "on the 2D net)",
                "grad_clip": f"{rel} pretrain.py:45-55 (no gradient_clip_val: none)",
                "max_steps": f"unset: the release trains by epochs ({rel} pretrain.py:50 max_epochs)",
            })
        else:
            why = "distillkit's choice: the small size is a CPU-minutes smoke run on synthetic scenes"
            src.update({
                "batch_size": f"{why} (2 keyframes per step fit CPU memory)",
                "max_steps": f"{why} (100 AdamW steps; SGD at lr 0.5 does not converge in that many)",
                "epochs": why,
                "sync_batchnorm": f"{why}, usually in one process; set it true to follow the release's "
                                  f"multi-GPU rule ({rel} pretrain.py:37-39: synchronised when num_gpus > 1)",
                "grad_clip": f"{why} (clip at 10 keeps AdamW with bf16 stable)",
            })
        return src

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        teacher = config.get("teacher_checkpoint")
        return train_main(
            shards=shards, out=out, device=device, resume=resume, strict=strict,
            max_steps=config["max_steps"], epochs=config["epochs"], size=config["size"], seed=config["seed"],
            batch_size=config["batch_size"], num_workers=config["num_workers"], log_every=config["log_every"],
            teacher_checkpoint=Path(teacher) if teacher else None, split=config["split"],
            precision=config["precision"], grad_clip=config["grad_clip"], random_teacher=config["random_teacher"],
            sync_batchnorm=config.get("sync_batchnorm"), teacher=config["teacher"],
            on_corrupt_shard=config.get("on_corrupt_shard", "stop"),
        )

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        options = self.resolve_eval_options(options or {})
        return eval_main(checkpoint, shards, device=device, size=config["size"], seed=config["seed"],
                         finetune=options["finetune"], epochs=options["epochs"],
                         probe_augment=options.get("probe_augment"))

    def format_eval(self, result: dict[str, Any]) -> str:
        return format_probe(result)

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        """mIoU over the classes present in the val labels: the released rule's mean counts every absent
        class as 1.0 for both networks, which on a synthetic scene mostly measures what is absent."""
        def present(name: str) -> float | None:
            r = result.get(name)
            return float(r["miou_present"]) if isinstance(r, dict) and "miou_present" in r else None

        distilled, random = present("distilled"), present("random")
        gain = distilled - random if distilled is not None and random is not None else None
        return {"metric": "val mIoU (classes present)", "distilled": distilled, "random": random, "gain": gain}
