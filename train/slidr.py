"""SLidR image-to-lidar distillation (reference/slidr.md §3-4): method, ``train_main``, ``eval_main``.

The 3D network (``SparseUNet``) is trained so that superpixel-pooled point features match the
superpixel-pooled features of a frozen dilated ResNet teacher followed by a trainable 1x1 decoder.

Sizes: ``small`` = tiny ResNet (layers 1-1-1-1, width 16) teacher and a 3-level sparse UNet,
crops of 112x208 and ``min_pairs`` 64 so CPU runs on synthetic data take seconds; it is optimised
with AdamW (lr 2e-3) because SGD at the paper's lr 0.5 needs the paper's long schedule.
``paper`` = ResNet-50 with replace_stride_with_dilation=(True, True, True) (2048x56x104 for
224x416), a MinkUNet-like 5-level sparse UNet, min_pairs 1024 and SGD lr 0.5, momentum 0.9,
dampening 0.1, weight decay 1e-4, cosine schedule (reference §4).
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
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.image_decode import decode_crops, nvjpeg_available
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.models.resnet import FrozenTeacher, ResNet, load_moco_v2
from distillkit.train.models.sparse import PAPER, SMALL, SparseUNet, SparseUNetConfig, cylindrical_voxelize
from distillkit.train.probe import NUSCENES_16, NUSCENES_16_NAMES, format_probe, linear_probe, split_keys
from distillkit.train.slidr_aug import check_slidr, slidr_collate, slidr_required, slidr_train_transform
from distillkit.train.slidr_loss import superpixel_nce_loss
from distillkit.train.streaming import ShardStream, make_loader

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
    ),
}


class SLidR(nn.Module):
    """3D student + frozen 2D teacher + trainable 1x1 decoder; ``loss(batch)`` is the superpixel NCE."""

    def __init__(
        self,
        point_net: SparseUNet,
        teacher: FrozenTeacher,
        crop: tuple[int, int],
        feat_dim: int = 64,
        temperature: float = 0.07,
    ):
        super().__init__()
        self.point_net, self.teacher, self.crop, self.temperature = point_net, teacher, crop, temperature
        self.decoder = nn.Conv2d(teacher.net.out_channels, feat_dim, 1)

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


def build_method(size: str, seed: int, teacher_checkpoint: Path | None = None) -> SLidR:
    cfg = SIZES[size]
    point_net = build_point_net(size, seed)
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
    shuffle_buffer: int = 16,
    decode_on_device: bool = False,
) -> ShardStream:
    """The training stream. ``decode_on_device`` leaves JPEGs undecoded in the loader; the model
    decodes and crops them where the batch is (nvJPEG on CUDA, see ``train.image_decode``)."""
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
    )


def loop_config(
    size: str, max_steps: int, device: str, out: Path | None, resume: bool = False, log_every: int = 10,
    run_config: dict[str, Any] | None = None,
) -> LoopConfig:
    """The training-loop settings of ``size`` (optimiser, lr, schedule), checkpointing 4 times a run."""
    return LoopConfig(
        max_steps=max_steps,
        device=device,
        out=out,
        resume=resume,
        log_every=log_every,
        ckpt_every=max(1, max_steps // 4) if max_steps >= 8 else 0,
        run_config=run_config,
        **SIZES[size].loop,
    )


def batch_samples(batch: dict[str, Any]) -> int:
    """Number of samples (keyframes) in a collated SLidR batch."""
    return len(batch["keys"])


def train_main(
    shards: Path,
    out: Path | None,
    device: str = "cpu",
    max_steps: int = 100,
    resume: bool = False,
    strict: bool = False,
    size: str = "small",
    seed: int = 0,
    batch_size: int = 2,
    num_workers: int = 0,
    teacher_checkpoint: Path | None = None,
    log_every: int = 10,
    decode_on_device: bool | None = None,
) -> dict:
    """Train SLidR on ``shards``; checkpoints go to ``out/latest.pt``. Returns the final metrics.

    ``out=None`` writes nothing (no checkpoint, no run log): for benchmarks, where checkpoint
    writes would let the loader workers refill their queues between timed steps.

    ``decode_on_device=None`` decodes JPEGs with nvJPEG on the GPU when training on CUDA with
    torchvision importable, else in the loader on the CPU."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} ({' | '.join(SIZES)})")
    if decode_on_device is None:
        decode_on_device = str(device).startswith("cuda") and nvjpeg_available()
    log.info("JPEG decoding: %s", "on the training device" if decode_on_device else "in the data loader (CPU)")
    torch.manual_seed(seed)
    np.random.seed(seed)
    method = build_method(size, seed, teacher_checkpoint)
    stream = make_stream(Path(shards), size, seed, strict, decode_on_device=decode_on_device)

    def batches() -> Any:
        return make_loader(
            stream, batch_size, slidr_collate, num_workers=num_workers, device=device, timeout=600
        )

    run_config = {"max_steps": max_steps, "batch_size": batch_size, "num_workers": num_workers, "seed": seed,
                  "log_every": log_every, "size": size,
                  "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None}
    cfg = loop_config(size, max_steps, device, Path(out) if out is not None else None, resume=resume,
                      log_every=log_every, run_config=run_config)
    metrics = train_loop(method, batches, cfg, batch_size=batch_samples)
    metrics.update(size=size, seed=seed, bad_samples=stream.bad_samples, decode_on_device=decode_on_device)
    return metrics


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def point_features(
    point_net: SparseUNet, shards: Path, device: str, max_points: int = 4000, seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per sample key: (features (n, D), 16-class labels (n,)) for up to ``max_points`` labelled points.

    Voxel features from the un-augmented cloud are mapped back to points through the inverse indices.
    """
    point_net.eval().to(device)
    stream = ShardStream(
        shards, seed=seed, epochs=1, shuffle_shards=False, required=["lidar.npy", "lidarseg.npy"]
    )
    out = {}
    for s in stream:
        lidar = np.asarray(s["lidar.npy"], dtype=np.float32)
        labels = torch.from_numpy(NUSCENES_16[np.asarray(s["lidarseg.npy"]).astype(np.int64)])
        coords, first, inverse = cylindrical_voxelize(torch.from_numpy(lidar[:, :3]))
        c = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).to(device)
        f = point_net(c, torch.from_numpy(lidar[:, 3:4])[first].to(device)).float().cpu()[inverse]
        idx = torch.nonzero(labels > 0).squeeze(1)
        if len(idx) > max_points:
            g = torch.Generator().manual_seed(seed)
            idx = idx[torch.randperm(len(idx), generator=g)[:max_points]]
        out[s["__key__"]] = (f[idx], labels[idx])
    return out


def probe(point_net: SparseUNet, shards: Path, device: str, seed: int) -> dict[str, Any]:
    feats = point_features(point_net, shards, device, seed=seed)
    if not feats:
        raise ValueError(f"{shards}: no sample has lidarseg.npy labels; cannot evaluate")
    train_keys, test_keys = split_keys(sorted(feats))

    def cat(keys: set[str]) -> tuple[Tensor, Tensor]:
        ks = sorted(keys)
        return torch.cat([feats[k][0] for k in ks]), torch.cat([feats[k][1] for k in ks])

    xtr, ytr = cat(train_keys)
    xte, yte = cat(test_keys)
    res = linear_probe(xtr, ytr, xte, yte, n_classes=len(NUSCENES_16_NAMES), seed=seed)
    res.update(train_samples=len(train_keys), test_samples=len(test_keys))
    return res



def eval_main(
    checkpoint: Path | None, shards: Path, device: str = "cpu", size: str = "small", seed: int = 0
) -> dict:
    """Linear-probe mIoU of the distilled point network vs the same network at random init (same seed)."""
    random_net = build_point_net(size, seed)
    result: dict[str, Any] = {"random": probe(random_net, shards, device, seed)}
    if checkpoint is not None:
        st = load_checkpoint(checkpoint)["model"]
        distilled = build_point_net(size, seed)
        distilled.load_state_dict(
            {k[len("point_net.") :]: v for k, v in st.items() if k.startswith("point_net.")}
        )
        result["distilled"] = probe(distilled, shards, device, seed)
    result["miou_random"] = result["random"]["miou"]
    result["miou_distilled"] = result["distilled"]["miou"] if "distilled" in result else None
    return result


class SlidrTrainer(Trainer):
    """``distillkit train slidr``: the keys below plus the common ones (``train.base``)."""

    name = "slidr"
    pipeline = "slidr"
    summary = "SLidR image-to-lidar distillation (superpixel-pooled InfoNCE)"
    schema = {
        "size": Key(str, "small", choices=tuple(SIZES), doc="network sizes: small (CPU, tests) or paper"),
        "teacher_checkpoint": Key("existing_path", None,
                                  doc="MoCo v2 ResNet-50 checkpoint for the frozen teacher (none: random)"),
    }

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        path = config.get("teacher_checkpoint")
        if path is not None and not Path(path).is_file():
            raise ConfigError(where, "teacher_checkpoint", f"not a file: {path}")

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        teacher = config.get("teacher_checkpoint")
        return train_main(
            shards=shards, out=out, device=device, resume=resume, strict=strict,
            max_steps=config["max_steps"], size=config["size"], seed=config["seed"],
            batch_size=config["batch_size"], num_workers=config["num_workers"], log_every=config["log_every"],
            teacher_checkpoint=Path(teacher) if teacher else None,
        )

    def evaluate(self, checkpoint: Path | None, shards: Path, config: dict[str, Any],
                 device: str = "cpu") -> dict[str, Any]:
        return eval_main(checkpoint, shards, device=device, size=config["size"], seed=config["seed"])

    def format_eval(self, result: dict[str, Any]) -> str:
        return format_probe(result)
