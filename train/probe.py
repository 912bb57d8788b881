"""Segmentation evaluation shared by trainers: class mappings, the released mIoU rule, Lovász-softmax,
and training a new per-point linear head on frozen features.

The rules follow valeoai/SLidR's downstream code (``utils/metrics.py``, ``downstream/``):

- nuScenes-lidarseg's 32 classes map to the 16-class benchmark plus ``0 = ignore`` exactly as its
  ``eval_labels`` table (and nuscenes-devkit's ``LidarsegClassMapper``) do;
- mIoU comes from a 17x17 confusion matrix whose ignore row is zeroed; a class absent from both
  predictions and labels (union 0) counts as IoU 1.0, and the mean is over all 16 classes;
- predictions never choose the ignore class;
- the loss is cross-entropy plus Lovász-softmax, both ignoring label 0; SGD with momentum 0.9,
  dampening 0.1, weight decay 1e-4 and a cosine schedule over epochs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# nuScenes lidarseg (32 classes) -> the 16-class semantic-segmentation benchmark (0 = ignore).
# Index 29 is static.other (ignored) and 30 static.vegetation (vegetation); tests/test_probe.py checks
# every entry against nuscenes-devkit's own fine-to-coarse mapping by category name.
NUSCENES_16 = np.array(
    [0, 0, 7, 7, 7, 0, 7, 0, 0, 1, 0, 0, 8, 0, 2, 3, 3, 4, 5, 0, 0, 6, 9, 10, 11, 12, 13, 14, 15, 0, 16, 0],
    dtype=np.int64,
)
NUSCENES_16_NAMES = [
    "ignore",
    "barrier",
    "bicycle",
    "bus",
    "car",
    "construction_vehicle",
    "motorcycle",
    "pedestrian",
    "traffic_cone",
    "trailer",
    "truck",
    "driveable_surface",
    "other_flat",
    "sidewalk",
    "terrain",
    "manmade",
    "vegetation",
]


def split_keys(keys: list[str]) -> tuple[set[str], set[str]]:
    """Deterministic train/test split of sample keys (by crc32 parity; never an empty side if >= 2 keys).
    Only for shards without scene records, where the official splits cannot be applied."""
    train = {k for k in keys if zlib.crc32(k.encode()) % 2 == 0}
    test = set(keys) - train
    if (not train or not test) and len(keys) >= 2:
        ordered = sorted(keys)
        train, test = set(ordered[: len(ordered) // 2]), set(ordered[len(ordered) // 2 :])
    return train, test


def confusion_matrix(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """(n_classes, n_classes) counts, rows = labels, columns = predictions (int64)."""
    idx = target.long() * n_classes + pred.long()
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_from_confusion(hist: Tensor, ignore_index: int | None = 0) -> tuple[float, Tensor]:
    """The released rule: zero the ignore row, IoU = diag / (row + col - diag), IoU of a class with an
    empty union is 1.0, mean over every class but the ignore one. Returns (mIoU, per-class IoU)."""
    hist = hist.double().clone()
    if ignore_index is not None:
        hist[ignore_index] = 0.0
    inter = torch.diag(hist)
    union = hist.sum(1) + hist.sum(0) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    if ignore_index is not None:
        iou = torch.cat([iou[:ignore_index], iou[ignore_index + 1 :]])
    return float(iou.mean()), iou


def lovasz_softmax(probs: Tensor, labels: Tensor, ignore_index: int | None = 0) -> Tensor:
    """Lovász-softmax loss (Berman et al., CVPR 2018), averaged over the classes present in ``labels``.

    Args:
        probs: (N, C) class probabilities.
        labels: (N,) int labels; entries equal to ``ignore_index`` are left out.
        ignore_index: label to ignore (None: none).
    """
    if ignore_index is not None:
        keep = labels != ignore_index
        probs, labels = probs[keep], labels[keep]
    if probs.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(probs.shape[1]):
        fg = (labels == c).to(probs.dtype)
        if c == ignore_index or fg.sum() == 0:
            continue
        errors = (fg - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        intersection = gts - fg_sorted.cumsum(0)
        union = gts + (1.0 - fg_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])  # the Lovász extension's gradient
        losses.append(torch.dot(errors_sorted, grad))
    return torch.stack(losses).mean() if losses else probs.sum() * 0.0


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = 0) -> Tensor:
    """Cross-entropy + Lovász-softmax, both ignoring ``ignore_index`` (the released "lovasz" loss)."""
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index) if (labels != ignore_index).any() \
        else logits.sum() * 0.0
    return ce + lovasz_softmax(F.softmax(logits, dim=1), labels, ignore_index)


def predict(logits: Tensor, ignore_index: int | None = 0) -> Tensor:
    """Argmax that never chooses the ignore class."""
    if ignore_index is not None:
        logits = logits.clone()
        logits[:, ignore_index] = -math.inf
    return logits.argmax(1)


def cosine_epoch_lr(lr: float, epoch: int, epochs: int) -> float:
    """``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def train_linear_head(
    features: Sequence[Tensor],
    labels: Sequence[Tensor],
    n_classes: int,
    epochs: int = 100,
    batch_size: int = 16,
    lr: float = 0.05,
    momentum: float = 0.9,
    dampening: float = 0.1,
    weight_decay: float = 1e-4,
    seed: int = 0,
    desc: str = "linear probe",
    drop_last: bool = False,
    resample: Callable[[int], tuple[Sequence[Tensor], Sequence[Tensor]]] | None = None,
) -> nn.Linear:
    """Train a new per-point linear layer (a 1x1 convolution) on frozen features.

    Args:
        features: per training sample, (V_i, D) frozen voxel features.
        labels: per training sample, (V_i,) voxel labels (0 = ignore).
        n_classes: output classes including the ignore class.
        epochs, batch_size, lr, momentum, dampening, weight_decay: the released linear-probing
            settings (batch of samples, SGD, cosine annealing over epochs, CE + Lovász-softmax).
        seed: seeds the head's initialisation and the sample order.
        desc: the progress bar's label (``train.progress``: stderr, terminals only).
        drop_last: skip each epoch's last partial batch (SLidR's released loader does,
            valeoai/SLidR downstream/lightning_datamodule.py:60), except when there is only one batch.
        resample: ``resample(epoch)`` gives the (features, labels) of epochs after the first (``features``,
            ``labels`` are epoch 0's): a probe that re-augments its training clouds every epoch.
    """
    from distillkit.train.progress import progress

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(features[0].shape[1], n_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay)
    n = len(features)
    for epoch in progress(range(epochs), desc=desc, unit="epoch"):
        if resample is not None and epoch > 0:
            features, labels = resample(epoch)
            if len(features) != n:
                raise ValueError(f"resample({epoch}) gave {len(features)} samples, epoch 0 had {n}")
        for group in opt.param_groups:
            group["lr"] = cosine_epoch_lr(lr, epoch, epochs)
        order = torch.randperm(n, generator=g).tolist()
        # drop_last: a split smaller than one batch keeps its one short batch so it trains at all
        used = n - n % batch_size if drop_last and n >= batch_size else n
        for start in range(0, used, batch_size):
            idx = order[start : start + batch_size]
            x = torch.cat([features[i] for i in idx]).float()
            y = torch.cat([labels[i] for i in idx]).long()
            loss = segmentation_loss(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head


def format_probe(result: dict[str, Any]) -> str:
    """A readable report of an evaluation result: mIoU of each network, then IoU per class."""
    lines = []
    runs = [name for name in ("distilled", "random") if isinstance(result.get(name), dict)]
    if result.get("protocol"):
        lines.append(f"{result['protocol']}")
    for name in runs:
        r = result[name]
        present = f", {r['miou_present']:.3f} over the classes present" if "miou_present" in r else ""
        lines.append(f"{result.get('metric_name', 'linear probe')} mIoU {name:>9}: {r['miou']:.3f}{present}  "
                     f"(train points {r['n_train']}, test points {r['n_test']})")
    classes = sorted({int(c) for name in runs for c in result[name]["per_class"]})
    if classes:
        lines.append(f"  {'class':<20}" + "".join(f"{name:>11}" for name in runs))
        for c in classes:
            row = "".join(f"{result[name]['per_class'].get(c, float('nan')):>11.3f}" for name in runs)
            lines.append(f"  {NUSCENES_16_NAMES[c]:<20}{row}")
    return "\n".join(lines)
