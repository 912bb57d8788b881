"""SLidR's downstream protocols on lidarseg-labelled shards: linear probing and label-scarce fine-tuning.

Both compare the distilled point network with the same network at random init (same seed), as in
valeoai/SLidR ``downstream/`` (``config/semseg_nuscenes.yaml``):

- **Linear probing** (``finetune=0``): the trunk is frozen and a new 1x1 layer (96 -> 17 classes on
  Res16UNet34C; the last decoder width on smaller nets) is trained on the features *before* the 64-d
  distillation head: SGD lr 0.05, momentum 0.9, dampening 0.1, weight decay 1e-4, cosine annealing over
  epochs, batch 16, cross-entropy + Lovász-softmax ignoring class 0, on the voxels of every scene of the
  official ``train`` split present in the shards; mIoU on the points of the ``val`` scenes.
- **Fine-tuning on N% of the scenes** (``finetune=N``): every (100/N)-th ``train`` scene in the dataset's
  scene-table order (the released ``dataset_skip_step``, downstream/dataloader_nuscenes.py:127-132), the
  whole network trained with a new head, trunk lr 0.02 and head lr 2.0, BatchNorm momentum 0.02
  (config/semseg_nuscenes.yaml:24), rotation + axis-flip augmentation, the same loss and schedule; mIoU
  on ``val``.

Both drop each epoch's last partial batch as the released loader does (downstream/lightning_datamodule.py:60),
except a split smaller than one batch, which keeps its one batch so that it trains at all.

Deviations that a CPU run needs (docs/decisions.md): on a CPU the linear probe's features are computed once
without augmentation by default (the released probe re-augments every epoch; ``probe_augment`` turns that on,
the default on CUDA); features of all training scenes
are held in memory; when the shards hold fewer than 100/N training scenes (synthetic data), the first
training scene is used. Scenes come from each sample's ``meta.json``; shards without it fall back to a
deterministic half/half split by key, said in the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distillkit.sensors.nuscenes_splits import UnknownSplit, split_scenes
from distillkit.train.base import ConfigError
from distillkit.train.models.sparse import SparseUNet, cylindrical_voxelize
from distillkit.train.probe import (
    NUSCENES_16,
    NUSCENES_16_NAMES,
    confusion_matrix,
    cosine_epoch_lr,
    iou_from_confusion,
    predict,
    segmentation_loss,
    split_keys,
    train_linear_head,
)
from distillkit.train.progress import progress, shard_sample_count
from distillkit.train.streaming import ShardStream

log = logging.getLogger(__name__)
N_CLASSES = len(NUSCENES_16_NAMES)  # 16 + ignore


class MissingSplit(ConfigError, ValueError):
    """Shards that lack the official train or val scenes the protocols need. A ``ConfigError`` (the build's
    ``source.split`` was the wrong value for evaluation), so ``distillkit eval`` prints it in one line; also a
    ``ValueError`` for callers of ``split_by_scene``."""


REBUILD = ("rebuild with --set source.split=all (the packaged slidr-nuscenes default; train slidr keeps the "
           "pretrain scenes itself), or give a train and a val build as two --shards")


def check_built_splits(shards: Sequence[Path]) -> None:
    """Refuse, before any sample is read, shards whose builds cannot hold both official train and val
    scenes (e.g. ``source.split = "pretrain"``), from their ``index.json`` manifests.

    Args:
        shards: shard directories; one built with every scene (``"all"``), or without a recorded
            split, leaves the decision to ``split_by_scene`` on the scenes actually read.

    Raises:
        MissingSplit: naming the builds' splits and what to rebuild.
    """
    from distillkit.pipelines.shards import load_index
    from distillkit.remote import location

    reachable: set[str] = set()
    built = []
    for d in shards:
        source = load_index(location(d)).get("manifest", {}).get("source", {})
        split, scenes = source.get("split"), source.get("scenes") or []
        try:
            allowed = set(scenes) if scenes else split_scenes(split) if isinstance(split, str) else None
        except UnknownSplit:
            allowed = None
        if allowed is None:
            return
        reachable |= allowed
        built.append(f"{split!r}" + (f" ({len(scenes)} named scenes)" if scenes else ""))
    lacking = [name for name in ("train", "val") if not reachable & (split_scenes(name) or set())]
    if lacking:
        raise MissingSplit(", ".join(map(str, shards)), "source.split",
                           f"built with split {', '.join(built)}, which has no official {' or '.join(lacking)} "
                           f"scene; eval slidr needs both: {REBUILD}")


@dataclass
class LabelledCloud:
    """One keyframe for evaluation: voxels of the un-augmented cloud and labels of voxels and points."""

    key: str
    scene: str | None
    xyz: Tensor  # (N, 3) float32, metres
    intensity: Tensor  # (N, 1) float32
    coords: Tensor  # (V, 3) int64 cylindrical voxel coordinates
    feats: Tensor  # (V, 1) float32 intensity of each voxel's first point
    inverse: Tensor  # (N,) voxel of each point
    voxel_labels: Tensor  # (V,) 16-class label of each voxel's first point (the released rule)
    point_labels: Tensor  # (N,)
    scene_index: int | None = None  # the scene's position in the dataset's scene table (meta.json), if recorded


def _labelled(raw: dict[str, Any]) -> bool:
    return "lidarseg.npy" in raw


def load_labelled(shards: Sequence[Path] | Path) -> list[LabelledCloud]:
    """Every sample with ``lidarseg.npy`` from one or more shard directories, in index order.

    Samples without labels are passed over (``select``: counted, not reported as bad). The bar counts every
    sample read, labelled or not, so that its total (the index's sample count) is reached at the end.
    """
    dirs = [shards] if isinstance(shards, (str, Path)) else list(shards)
    out = []
    for d in dirs:
        stream = ShardStream(d, epochs=1, shuffle_shards=False, required=["lidar.npy"], select=_labelled)
        with progress(desc=f"slidr eval: reading {Path(d).name}", total=shard_sample_count(d),
                      unit="sample") as bar:
            passed_over = 0
            for s in stream:
                bar.update(1 + stream.skipped - passed_over)
                passed_over = stream.skipped
                lidar = np.asarray(s["lidar.npy"], dtype=np.float32)
                labels = torch.from_numpy(NUSCENES_16[np.asarray(s["lidarseg.npy"]).astype(np.int64)])
                xyz = torch.from_numpy(lidar[:, :3].copy())
                coords, first, inverse = cylindrical_voxelize(xyz)
                meta = s.get("meta.json")
                scene = meta.get("scene") if isinstance(meta, dict) else None
                scene_index = meta.get("scene_index") if isinstance(meta, dict) else None
                intensity = torch.from_numpy(lidar[:, 3:4].copy())
                out.append(LabelledCloud(s["__key__"], scene, xyz, intensity, coords, intensity[first], inverse,
                                         labels[first], labels, scene_index=scene_index))
            bar.update(stream.skipped - passed_over)  # unlabelled samples after the last labelled one
    if not out:
        raise ValueError(f"{', '.join(map(str, dirs))}: no sample has lidarseg.npy labels; cannot evaluate")
    return out


def split_by_scene(clouds: list[LabelledCloud]) -> tuple[list[LabelledCloud], list[LabelledCloud], str]:
    """(official train scenes, official val scenes, a description). Falls back to a key-parity split
    when the shards record no scenes. Raises ``MissingSplit`` (a ``ValueError``) when no train or no val
    scene is present."""
    if any(c.scene is None for c in clouds):
        tr, te = split_keys(sorted(c.key for c in clouds))
        return ([c for c in clouds if c.key in tr], [c for c in clouds if c.key in te],
                "keys split in halves (these shards record no scenes: rebuild for the official splits)")
    train_s, val_s = split_scenes("train"), split_scenes("val")
    train = [c for c in clouds if c.scene in train_s]
    val = [c for c in clouds if c.scene in val_s]
    if not val or not train:
        present = sorted({c.scene for c in clouds})
        raise MissingSplit("the shards", "scenes",
                           f"{len(train)} samples of official train scenes and {len(val)} of val scenes (scenes: "
                           f"{', '.join(present)}); eval slidr needs both: {REBUILD}")
    return train, val, "official nuScenes train / val scenes"


def every_nth_scene(clouds: list[LabelledCloud], percent: int) -> tuple[list[LabelledCloud], str]:
    """The released N% subset: every (100/N)-th train scene (the 1-based positions that are multiples of
    the step) in the dataset's scene-table order, as valeoai/SLidR downstream/dataloader_nuscenes.py:127-132
    counts them (``for scene_idx in range(len(self.nusc.scene))``, skip_counter % dataset_skip_step); at
    least the first scene when there are fewer. The order is each sample's ``meta.json`` ``scene_index``
    (recorded at build time); shards built without it fall back to name order, said in the note.

    Args:
        clouds: the train clouds.
        percent: N (1 = every 100th scene).
    """
    if not 1 <= percent <= 100:
        raise ValueError(f"finetune percent must be in 1..100, got {percent}")
    step = max(1, round(100 / percent))
    index: dict[str, int | None] = {}
    for c in clouds:
        index.setdefault(c.scene or c.key, c.scene_index)
    table_order = all(i is not None for i in index.values())
    if table_order:
        scenes = sorted(index, key=lambda s: (index[s], s))
        order = "scene-table order"
    else:
        scenes = sorted(index)
        order = "name order: these shards record no scene_index (rebuild for the released scene-table order)"
    chosen = set(scenes[step - 1 :: step])
    note = f"every {step}th of {len(scenes)} train scenes in {order}"
    if not chosen:
        chosen = {scenes[0]}
        note = f"the first of {len(scenes)} train scenes (fewer than {step}: the released rule would keep none)"
    return [c for c in clouds if (c.scene or c.key) in chosen], note


def _input(c: LabelledCloud, device: str | torch.device) -> tuple[Tensor, Tensor]:
    batch = torch.zeros(len(c.coords), 1, dtype=torch.long)
    return torch.cat([batch, c.coords], 1).to(device), c.feats.to(device)


@torch.no_grad()
def frozen_features(net: SparseUNet, clouds: list[LabelledCloud], device: str, desc: str = "features"
                    ) -> list[Tensor]:
    """Per cloud, the (V, D) trunk features before the distillation head (eval mode, float32, on CPU)."""
    net.eval().to(device)
    return [net(*_input(c, device), return_trunk=True).float().cpu()
            for c in progress(clouds, desc=desc, unit="cloud")]


def score(logits_per_cloud: list[Tensor], clouds: list[LabelledCloud]) -> dict[str, Any]:
    """mIoU over the points of ``clouds`` with the released rule (voxel predictions mapped to points)."""
    hist = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.long)
    for logits, c in zip(logits_per_cloud, clouds, strict=True):
        hist += confusion_matrix(predict(logits)[c.inverse], c.point_labels, N_CLASSES)
    miou, per_class = iou_from_confusion(hist, ignore_index=0)
    # The released rule scores a class absent from labels and predictions as 1.0; on data with few
    # classes that dominates the mean, so the mean over the classes present in the labels is reported too.
    present = [i for i in range(1, N_CLASSES) if hist[i].sum() > 0]
    return {"miou": miou, "per_class": {i + 1: float(v) for i, v in enumerate(per_class)},
            "miou_present": float(np.mean([float(per_class[i - 1]) for i in present])) if present else float("nan"),
            "n_test": int(sum(int((c.point_labels > 0).sum()) for c in clouds))}


def _augmented_voxels(net: SparseUNet, train: list[LabelledCloud], device: str, g: torch.Generator
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Trunk features and voxel labels of freshly augmented, re-voxelised ``train`` clouds (one probe epoch)."""
    feats, labels = [], []
    net.eval().to(device)
    with torch.no_grad():
        for c in train:
            vox, first, _ = cylindrical_voxelize(_augment(c.xyz, g))
            coords = torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], 1)
            feats.append(net(coords.to(device), c.intensity[first].to(device), return_trunk=True).float().cpu())
            labels.append(c.point_labels[first])
    return feats, labels


def linear_probe(net: SparseUNet, train: list[LabelledCloud], val: list[LabelledCloud], device: str,
                 epochs: int, seed: int, name: str = "", augment: bool = False) -> dict[str, Any]:
    """Train a new 1x1 layer on frozen trunk features of ``train``; score on ``val``.

    Args:
        net: the point network (frozen, eval mode as released: downstream/lightning_trainer.py:106-107).
        train, val: labelled clouds.
        device: torch device.
        epochs: epochs of the head.
        seed: seeds the head, the sample order and the augmentation.
        name: the network's name in the progress bars.
        augment: re-augment (rotation about z, x/y flips) and re-voxelise the training clouds every epoch, as
            the released probe's loader does (valeoai/SLidR downstream/lightning_datamodule.py:25,
            config/semseg_nuscenes.yaml:32, utils/transforms.py:23-54); costs one trunk pass over the training
            clouds per epoch. False: features computed once, un-augmented.
    """
    tag = f" ({name})" if name else ""
    if augment:
        g = torch.Generator().manual_seed(seed)
        ftr, labels = _augmented_voxels(net, train, device, g)
        resample = lambda epoch: _augmented_voxels(net, train, device, g)  # noqa: E731 (one-line closure)
    else:
        ftr = frozen_features(net, train, device, desc=f"slidr eval: train features{tag}")
        labels, resample = [c.voxel_labels for c in train], None
    head = train_linear_head(ftr, labels, N_CLASSES, epochs=epochs, seed=seed,
                             drop_last=True,  # as released: downstream/lightning_datamodule.py:60
                             resample=resample, desc=f"slidr eval: linear probe{tag}")
    with torch.no_grad():
        logits = [head(f) for f in frozen_features(net, val, device, desc=f"slidr eval: val features{tag}")]
    res = score(logits, val)
    res["n_train"] = int(sum(int((c.voxel_labels > 0).sum()) for c in train))
    res["augmented"] = augment
    return res


class Segmenter(nn.Module):
    """The point network's trunk with a new per-voxel classification head (replaces the 64-d head)."""

    def __init__(self, net: SparseUNet, n_classes: int = N_CLASSES):
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.trunk_dim, n_classes)

    def forward(self, coords: Tensor, feats: Tensor) -> Tensor:
        return self.head(self.net(coords, feats, return_trunk=True))


def _augment(xyz: Tensor, g: torch.Generator) -> Tensor:
    """The released downstream cloud augmentation: rotation about z, then x and y flips (p = 0.5 each)."""
    a = float(torch.rand(1, generator=g)) * 2 * np.pi
    c, s = np.cos(a), np.sin(a)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=xyz.dtype)
    out = xyz @ rot.T
    flips = torch.rand(2, generator=g) < 0.5
    out[:, 0] = -out[:, 0] if flips[0] else out[:, 0]
    out[:, 1] = -out[:, 1] if flips[1] else out[:, 1]
    return out


def full_batches(n: int, batch_size: int) -> int:
    """How many samples an epoch uses when the last partial batch is dropped, as the released downstream
    loader does (valeoai/SLidR downstream/lightning_datamodule.py:60, ``drop_last=True``). When ``n`` is
    below one batch the release trains on nothing; distillkit keeps that one short batch instead so a
    small (synthetic) split still trains (distillkit's choice).

    Args:
        n: training samples.
        batch_size: samples per step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n if n < batch_size else n - n % batch_size


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's running-statistics momentum (torch convention); returns how many were set.

    Args:
        model: the network.
        momentum: the new momentum.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            count += 1
    return count


# valeoai/SLidR config/semseg_nuscenes.yaml:24 (bn_momentum : 0.02), read by model/res16unet.py:36 for every
# BatchNorm of the downstream network; pretraining uses 0.05 (config/slidr_minkunet.yaml:22).
FINETUNE_BN_MOMENTUM = 0.02


def finetune(net: SparseUNet, train: list[LabelledCloud], val: list[LabelledCloud], device: str, epochs: int,
             seed: int, batch_size: int = 16, lr: float = 0.02, lr_head: float = 2.0, name: str = "",
             bn_momentum: float = FINETUNE_BN_MOMENTUM) -> dict[str, Any]:
    """Fine-tune the whole network with a new head on ``train`` (augmented); score on ``val``.

    Args:
        net: the point network (its 64-d head is replaced by a new classification layer).
        train, val: labelled clouds.
        device: torch device.
        epochs: passes over ``train`` (cosine annealing per epoch).
        seed: seeds the head, the sample order and the augmentation.
        batch_size: clouds per step; the last partial batch of an epoch is dropped (``full_batches``).
        lr, lr_head: trunk and head learning rates (released: 0.02 and 2.0).
        name: the network's name in the progress bars.
        bn_momentum: BatchNorm momentum while fine-tuning (released: 0.02).
    """
    torch.manual_seed(seed)
    model = Segmenter(net).to(device)
    set_bn_momentum(model, bn_momentum)
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    trunk_params = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.SGD([{"params": head_params, "lr": lr_head}, {"params": trunk_params, "lr": lr}],
                          momentum=0.9, dampening=0.1, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    tag = f" ({name})" if name else ""
    for epoch in progress(range(epochs), desc=f"slidr eval: fine-tuning{tag}", unit="epoch"):
        for group, base in zip(opt.param_groups, (lr_head, lr), strict=True):
            group["lr"] = cosine_epoch_lr(base, epoch, epochs)
        model.train()
        order = torch.randperm(len(train), generator=g).tolist()
        for start in range(0, full_batches(len(order), batch_size), batch_size):
            batch = [train[i] for i in order[start : start + batch_size]]
            coords, feats, labels = [], [], []
            for b, c in enumerate(batch):
                vox, first, _ = cylindrical_voxelize(_augment(c.xyz, g))
                coords.append(torch.cat([torch.full((len(vox), 1), b, dtype=torch.long), vox], 1))
                feats.append(c.intensity[first])
                labels.append(c.point_labels[first])
            logits = model(torch.cat(coords).to(device), torch.cat(feats).to(device))
            loss = segmentation_loss(logits.float(), torch.cat(labels).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = [model(*_input(c, device)).float().cpu()
                  for c in progress(val, desc=f"slidr eval: val predictions{tag}", unit="cloud")]
    res = score(logits, val)
    res["n_train"] = int(sum(int((c.voxel_labels > 0).sum()) for c in train))
    return res


def evaluate(make_net: Callable[[], SparseUNet], distilled_state: dict[str, Tensor] | None, shards: Sequence[Path],
             device: str = "cpu", seed: int = 0, finetune_percent: int = 0, epochs: int = 100,
             probe_augment: bool | None = None) -> dict[str, Any]:
    """The chosen protocol for the random-init network and, given its state, the distilled one.

    Args:
        make_net: builds the point network at its seed's random init (called once per run).
        distilled_state: the distilled point network's state dict, or None for the baseline only.
        shards: shard directories holding lidarseg labels (and ``meta.json`` scenes).
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds the heads, sample orders and augmentations.
        finetune_percent: 0 for linear probing, else N for fine-tuning on N% of the train scenes.
        epochs: training epochs of the head (probe) or network (fine-tuning); 100 in the released configs.
        probe_augment: re-augment the probe's training clouds every epoch as released (``linear_probe``);
            None = on when ``device`` is CUDA (one trunk pass per epoch is cheap there; on a CPU it multiplies
            the probe's time by about the epoch count, so it is off).
    """
    if probe_augment is None:
        probe_augment = str(device).startswith("cuda")
    check_built_splits([shards] if isinstance(shards, Path) else list(shards))  # before reading every sample
    clouds = load_labelled(shards)
    train, val, how = split_by_scene(clouds)
    note = ""
    if finetune_percent:
        train, note = every_nth_scene(train, finetune_percent)
    result: dict[str, Any] = {
        "protocol": (f"fine-tuning on {finetune_percent}% ({note})" if finetune_percent else "linear probing")
        + f"; train {len(train)} / val {len(val)} samples; {how}; {epochs} epochs"
        + ("" if finetune_percent else f"; {'re-augmented every epoch' if probe_augment else 'no augmentation'}"),
        "metric_name": f"{finetune_percent}% fine-tune" if finetune_percent else "linear probe",
    }
    runs: list[tuple[str, dict[str, Tensor] | None]] = [("random", None)]
    if distilled_state is not None:
        runs.append(("distilled", distilled_state))
    for name, state in runs:
        net = make_net()
        if state is not None:
            net.load_state_dict(state)
        if finetune_percent:
            result[name] = finetune(net, train, val, device, epochs, seed, name=name)
        else:
            result[name] = linear_probe(net, train, val, device, epochs, seed, name=name, augment=probe_augment)
        log.info("%s %s mIoU %.3f", result["metric_name"], name, result[name]["miou"])
    result["miou_random"] = result["random"]["miou"]
    result["miou_distilled"] = result["distilled"]["miou"] if "distilled" in result else None
    return result
