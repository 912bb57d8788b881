"""Evaluation of the uniseg trainer: a linear probe of frozen patch features for semantic segmentation.

On the samples that hold ``gt.sem.png`` (``distillkit synth images`` writes it), split by key into halves
(``train.probe.split_keys``: crc32 parity): each image is resized to ``size`` x ``size`` (default: the
trainer's global view); a new linear layer is trained on the frozen ViT's last-layer patch tokens of the
train half, each token labelled with the majority class of its pixels (``train.probe.train_linear_head``:
SGD, batches of 4 images, cosine schedule, cross-entropy + Lovász); on the test half its logits are
upsampled bilinearly to the pixel grid and scored by per-class IoU from one
confusion matrix (``train.probe.confusion_matrix`` / ``iou_from_confusion``) against the ground truth
resized (nearest) to the same grid. Semantic id ``k`` is probe class ``k + 1`` (probe class 0 is the
ignore class; ids above 254 are ignored). Two networks, same architecture and seed: the distilled
teacher of the checkpoint and the random initialisation. mIoU is the mean over the classes present in
the test labels (``miou``); the released rule's mean (absent classes count as 1.0) is ``miou_all``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from distillkit.preprocess.vit import ViT
from distillkit.remote import location
from distillkit.train.checkpoint import load_checkpoint
from distillkit.train.probe import confusion_matrix, iou_from_confusion, predict, split_keys, train_linear_head
from distillkit.train.streaming import ShardStream
from distillkit.train.uniseg_data import normalise

log = logging.getLogger(__name__)


def load_labelled(shards: Sequence[Path], size: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, (3, size, size) normalised image, (size, size) int64 probe labels) of every sample with ``gt.sem.png``.

    Args:
        shards: shard directories.
        size: side of the evaluation grid in px.
    """
    from distillkit.pipelines.uniseg import image_field

    out = []
    from distillkit.train.progress import progress, shard_sample_count

    for d in shards:
        for s in progress(ShardStream(d, epochs=1, shuffle_shards=False, required=["gt.sem.png"]),
                          desc=f"uniseg eval: reading {Path(d).name}", total=shard_sample_count(d), unit="image"):
            rgb = s[image_field(s)]
            img = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            sem = cv2.resize(np.asarray(s["gt.sem.png"]).astype(np.int32), (size, size),
                             interpolation=cv2.INTER_NEAREST).astype(np.int64)
            lab = np.where(sem < 255, sem + 1, 0)
            out.append((s["__key__"], normalise(img), torch.from_numpy(lab)))
    if not out:
        raise ValueError(f"{', '.join(map(str, shards))}: no sample has gt.sem.png; cannot evaluate "
                         "(build from images with {stem}.sem.png beside them, e.g. `distillkit synth images`)")
    return out


@torch.no_grad()
def token_features(net: ViT, images: list[torch.Tensor], device: str, batch: int = 32) -> list[torch.Tensor]:
    """Per image, (D, h, w) last-layer patch tokens (CPU float32).

    Args:
        net: the frozen ViT.
        images: (3, size, size) normalised images.
        device: torch device.
        batch: images per forward pass.
    """
    from distillkit.train.progress import progress

    net.eval().to(device)
    out = []
    for i in progress(range(0, len(images), batch), desc="uniseg eval: features", unit="batch"):
        x = torch.stack(images[i : i + batch]).to(device)
        out += list(net(x)[0].permute(0, 3, 1, 2).float().cpu())
    return out


def token_labels(labels: torch.Tensor, grid: tuple[int, int], n_classes: int) -> torch.Tensor:
    """Majority probe class of the pixels under each token: (h * w,) int64.

    Args:
        labels: (size, size) pixel labels.
        grid: token grid (h, w); size must be a multiple of each side.
        n_classes: probe classes.
    """
    h, w = grid
    H, W = labels.shape
    onehot = F.one_hot(labels, n_classes).permute(2, 0, 1).float()[None]
    votes = F.adaptive_avg_pool2d(onehot, (h, w))[0]
    votes[0] = -1.0  # the ignore class wins only where nothing else is present
    lab = votes.argmax(0)
    return torch.where(votes.max(0).values > 0, lab, torch.zeros_like(lab)).flatten()


def probe(net: ViT, train: list, test: list, n_classes: int, device: str, epochs: int, seed: int
          ) -> dict[str, Any]:
    """Train the linear probe on ``train``'s tokens and score ``test``'s pixels.

    The linear layer is trained per token on the majority class under it (cheap: the features stay on the
    token grid) and applied per pixel to the bilinearly upsampled tokens (the same as upsampling its logits,
    since the layer is linear).

    Args:
        net: frozen ViT.
        train: (key, image, labels) training items.
        test: (key, image, labels) test items.
        n_classes: probe classes including the ignore class 0.
        device: torch device.
        epochs: probe epochs.
        seed: probe seed.
    """
    ftr = token_features(net, [t[1] for t in train], device)
    labels = [token_labels(t[2], f.shape[1:], n_classes) for f, t in zip(ftr, train, strict=True)]
    head = train_linear_head([f.flatten(1).T for f in ftr], labels, n_classes, epochs=epochs, batch_size=4,
                             seed=seed, desc="uniseg eval: linear probe")
    hist = torch.zeros(n_classes, n_classes, dtype=torch.long)
    with torch.no_grad():
        for f, (_, _, lab) in zip(token_features(net, [t[1] for t in test], device), test, strict=True):
            logits = head(f.flatten(1).T).T.reshape(n_classes, *f.shape[1:])
            up = F.interpolate(logits[None], size=lab.shape, mode="bilinear", align_corners=False)[0]
            hist += confusion_matrix(predict(up.flatten(1).T), lab.flatten(), n_classes)
    miou_all, per_class = iou_from_confusion(hist, ignore_index=0)
    present = [c for c in range(1, n_classes) if hist[c].sum() > 0]
    return {
        "miou": float(np.mean([float(per_class[c - 1]) for c in present])) if present else float("nan"),
        "miou_all": miou_all,
        "per_class": {c - 1: float(per_class[c - 1]) for c in present},  # keyed by semantic id
        "pixel_accuracy": float(torch.diag(hist)[1:].sum() / hist[1:].sum().clamp_min(1)),
        "n_train": int(sum(int((lab > 0).sum()) for lab in labels)),
        "n_test": int(hist[1:].sum()),
    }


def teacher_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA teacher's backbone weights of a uniseg checkpoint.

    Args:
        checkpoint: ``latest.pt`` of ``distillkit train uniseg``.
    """
    st = load_checkpoint(checkpoint)["model"]
    prefix = "teacher.backbone."
    state = {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{checkpoint}: no teacher.backbone.* weights (not a uniseg checkpoint)")
    return state


def evaluate(checkpoint: Path | None, shards: Sequence[Path], config: dict[str, Any], device: str = "cpu",
             epochs: int = 50, size: int | None = None) -> dict[str, Any]:
    """The linear probe for the random-init ViT and, given a checkpoint, the distilled teacher.

    Args:
        checkpoint: a uniseg checkpoint, or None for the random init only.
        shards: shard directories with ground truth.
        config: the training configuration (network size, seed).
        device: torch device.
        epochs: probe epochs.
        size: evaluation image side in px (default: the size's global view).
    """
    from distillkit.train.uniseg import SIZES, initial_backbone

    size = size or SIZES[config["size"]].global_size
    items = load_labelled([location(d) for d in shards], size)  # a URL stays a string (remote.location)
    tr_keys, _ = split_keys(sorted(k for k, _, _ in items))
    train = [t for t in items if t[0] in tr_keys]
    test = [t for t in items if t[0] not in tr_keys]
    if not train or not test:
        raise ValueError(f"{len(items)} labelled sample(s): the probe needs at least one to train and one to test")
    n_classes = int(max(int(t[2].max()) for t in items)) + 1
    result: dict[str, Any] = {
        "protocol": f"linear probe of frozen patch tokens, {size}x{size} px, {epochs} epochs; "
                    f"train {len(train)} / test {len(test)} images (key halves); baseline ('random'): "
                    + (f"the init checkpoint {Path(config['init_checkpoint']).name}" if config.get("init_checkpoint")
                       else "the seed's random initialisation"),
    }
    runs: list[tuple[str, dict[str, torch.Tensor] | None]] = [("random", None)]
    if checkpoint is not None:
        runs.append(("distilled", teacher_state(Path(checkpoint))))
    for name, state in runs:
        net = initial_backbone(config).eval()
        if state is not None:
            net.load_state_dict(state)
        result[name] = probe(net, train, test, n_classes, device, epochs, config["seed"])
        log.info("uniseg probe %s mIoU %.3f", name, result[name]["miou"])
    result["miou_random"] = result["random"]["miou"]
    result["miou_distilled"] = result["distilled"]["miou"] if "distilled" in result else None
    return result


def format_result(result: dict[str, Any]) -> str:
    """The probe's report: mIoU of each network, then IoU per semantic id.

    Args:
        result: what ``evaluate`` returned.
    """
    runs = [n for n in ("distilled", "random") if isinstance(result.get(n), dict)]
    lines = [result.get("protocol", "")]
    for n in runs:
        r = result[n]
        lines.append(f"semantic probe mIoU {n:>9}: {_num(r['miou'])} (pixel acc {_num(r['pixel_accuracy'])}, "
                     f"released rule {_num(r['miou_all'])}; train tokens {r['n_train']}, test px {r['n_test']})")
    classes = sorted({int(c) for n in runs for c in result[n]["per_class"]})
    if classes:
        lines.append(f"  {'semantic id':<12}" + "".join(f"{n:>11}" for n in runs))
        for c in classes:
            lines.append(f"  {c:<12}" + "".join(f"{_num(result[n]['per_class'].get(c)):>11}" for n in runs))
    return "\n".join(lines)


def _num(v: float | None) -> str:
    """A score to three decimals, ``-`` where there is none (a class absent from the test labels has no IoU,
    and an mIoU over no class is undefined: printed as ``-``, never ``nan``)."""
    return "-" if v is None or v != v else f"{v:.3f}"


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The demo summary's number: the probe's mIoU over the classes present in the test labels.

    Args:
        result: what ``evaluate`` returned.

    Returns:
        ``{"metric", "distilled", "random", "gain"}`` (``Trainer.headline``); None where a value is missing
        or undefined (no class present), so nothing prints as ``nan``.
    """

    def value(name: str) -> float | None:
        r = result.get(name)
        v = r.get("miou") if isinstance(r, dict) else None
        return None if v is None or v != v else float(v)

    distilled, random = value("distilled"), value("random")
    gain = None if distilled is None or random is None else distilled - random
    return {"metric": "probe mIoU", "distilled": distilled, "random": random, "gain": gain}


def best_match_iou(levels: np.ndarray, gt: np.ndarray, ignore: tuple[int, ...] = (0,)) -> np.ndarray:
    """Pseudo-mask quality: for each ground-truth segment, the best IoU of any region of each level.

    Regions are upsampled from the patch grid to the ground truth's pixels (nearest). Returns an
    (L + 1, S) array: per level and, in the last row, over all levels' regions together (UniAP's
    multi-granular output); S = the segments (ids of ``gt`` not in ``ignore``) in increasing id order.

    Args:
        levels: (L, h, w) int partitions, -1 = dropped.
        gt: (H, W) int ground-truth ids (instances or classes).
        ignore: ids that are not segments (background).
    """
    H, W = gt.shape
    ids = [int(i) for i in np.unique(gt) if int(i) not in ignore]
    out = np.zeros((len(levels) + 1, len(ids)))
    gt_flat = gt.ravel()
    for li, lvl in enumerate(levels):
        up = cv2.resize(lvl.astype(np.int32), (W, H), interpolation=cv2.INTER_NEAREST).ravel()
        n_reg = int(up.max(initial=-1)) + 1
        if n_reg == 0:
            continue
        keep = up >= 0
        region_area = np.bincount(up[keep], minlength=n_reg)
        for si, i in enumerate(ids):
            g = gt_flat == i
            inter = np.bincount(up[keep & g], minlength=n_reg)
            union = region_area + g.sum() - inter
            out[li, si] = float((inter / np.maximum(union, 1)).max())
    out[-1] = out[:-1].max(axis=0) if len(levels) else 0.0
    return out
