"""Linear-probe evaluation shared by trainers: logistic regression on frozen features, mIoU.

Features are standardised with the training split's mean/std, then a linear layer is trained with
full-batch L-BFGS on cross-entropy (deterministic for a seed). mIoU is averaged over the classes
present in the test labels; a point predicted as a class absent from them still lowers the IoU
of its true class (a miss), but that class is not averaged in.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# nuScenes lidarseg (32 classes) -> the 16-class semantic-segmentation benchmark (0 = ignore).
NUSCENES_16 = np.array(
    [0, 0, 7, 7, 7, 0, 7, 0, 0, 1, 0, 0, 8, 0, 2, 3, 3, 4, 5, 0, 0, 6, 9, 10, 11, 12, 13, 14, 15, 16, 0, 0],
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
    """Deterministic train/test split of sample keys (by crc32 parity; never an empty side if >= 2 keys)."""
    train = {k for k in keys if zlib.crc32(k.encode()) % 2 == 0}
    test = set(keys) - train
    if (not train or not test) and len(keys) >= 2:
        ordered = sorted(keys)
        train, test = set(ordered[: len(ordered) // 2]), set(ordered[len(ordered) // 2 :])
    return train, test


def miou(pred: Tensor, target: Tensor, classes: list[int]) -> tuple[float, dict[int, float]]:
    """Mean IoU over ``classes`` and the per-class IoUs."""
    ious = {}
    for c in classes:
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        ious[c] = inter / union if union else float("nan")
    vals = [v for v in ious.values() if not np.isnan(v)]
    return (float(np.mean(vals)) if vals else 0.0), ious


def linear_probe(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    n_classes: int,
    seed: int = 0,
    max_iter: int = 200,
    weight_decay: float = 1e-4,
) -> dict[str, object]:
    """Train logistic regression on (N, D) features / (N,) labels (ignore label 0), report test mIoU."""
    torch.manual_seed(seed)
    m = y_train > 0
    x_train, y_train = x_train[m].float(), y_train[m]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = (x_train - mean) / std
    lin = torch.nn.Linear(xt.shape[1], n_classes)
    opt = torch.optim.LBFGS(
        lin.parameters(), lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), y_train) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        mt = y_test > 0
        pred = lin((x_test[mt].float() - mean) / std).argmax(1)
    classes = sorted(int(c) for c in torch.unique(y_test[mt]))
    score, per_class = miou(pred, y_test[mt], classes)
    return {"miou": score, "per_class": per_class, "n_train": int(m.sum()), "n_test": int(mt.sum())}


def format_probe(result: dict[str, Any]) -> str:
    """A readable report of ``eval_main``'s result: mIoU of both networks, then IoU per class."""
    lines = []
    runs = [name for name in ("distilled", "random") if isinstance(result.get(name), dict)]
    for name in runs:
        r = result[name]
        lines.append(f"linear probe mIoU {name:>9}: {r['miou']:.3f}  (train points {r['n_train']}, "
                     f"test points {r['n_test']})")
    classes = sorted({c for name in runs for c in result[name]["per_class"]})
    if classes:
        lines.append(f"  {'class':<20}" + "".join(f"{name:>11}" for name in runs))
        for c in classes:
            row = "".join(f"{result[name]['per_class'].get(c, float('nan')):>11.3f}" for name in runs)
            lines.append(f"  {NUSCENES_16_NAMES[c]:<20}{row}")
    return "\n".join(lines)
