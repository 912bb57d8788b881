"""A linear classification probe on frozen embeddings, shared by the clip-level evaluations
(audio, COMODO): split by group, fit a logistic regression, report per-class recall.

The protocol is the usual one of self-supervised papers (ATST's linear evaluation, DINO's
``eval_linear``): the encoder is frozen, one embedding per example is computed once, and only a
linear layer is trained on top. Choices made here, and why:

- **Split by group** (``group_split``): windows or segments of one recording are strongly
  correlated, so every group (source file, recording) lands wholly on one side; otherwise the probe
  measures memorisation of recordings, not features. The split is stratified by each group's label
  when labels are given, so every class with at least one group has training examples.
- **Standardised features** (mean/std of the *training* side only, so nothing leaks from the test
  side), optionally L2-normalised first: random-init and distilled encoders differ wildly in the
  scale of their outputs, and a probe with fixed learning rate must not reward scale.
- **Full-batch** logistic regression with AdamW on CPU in float32 with a fixed seed: the
  result is bit-for-bit deterministic for a given input, and small data sets (hundreds to thousands
  of clips) fit in memory.
- **Balanced accuracy** (mean per-class recall) is reported beside accuracy because synthetic and
  real label sets are rarely balanced after a group split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def group_split(groups: Sequence[str], test_fraction: float = 0.3, seed: int = 0,
                labels: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of examples by group: all examples of a group go to one side.

    Args:
        groups: per example, its group id (e.g. the source file of an audio segment, the recording
            of an IMU window).
        test_fraction: fraction of groups (per class when ``labels`` is given) sent to the test side,
            rounded to nearest; a class with one group keeps it on the train side, a class with two
            or more groups gets at least one on each side.
        seed: seeds the order in which groups are drawn (independent of the order of ``groups``:
            groups are sorted before drawing).
        labels: optional per-example labels; a group's label is its most frequent one (ties: the
            smallest). Stratifies the split so every class has training examples where possible.

    Returns:
        (train_idx, test_idx): sorted int64 index arrays into ``groups``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    groups = [str(g) for g in groups]
    if labels is not None and len(labels) != len(groups):
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) differ in length")
    group_label: dict[str, str] = {}
    if labels is not None:
        votes: dict[str, dict[str, int]] = {}
        for g, y in zip(groups, labels, strict=True):
            votes.setdefault(g, {}).setdefault(str(y), 0)
            votes[g][str(y)] += 1
        for g, v in votes.items():
            group_label[g] = sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    strata: dict[str, list[str]] = {}
    for g in sorted(set(groups)):
        strata.setdefault(group_label.get(g, ""), []).append(g)
    rng = np.random.default_rng(seed)
    test_groups: set[str] = set()
    for name in sorted(strata):
        members = strata[name]
        order = [members[i] for i in rng.permutation(len(members))]
        n_test = int(math.floor(test_fraction * len(order) + 0.5))
        if len(order) >= 2 and 0.0 < test_fraction < 1.0:
            n_test = min(max(n_test, 1), len(order) - 1)
        elif len(order) == 1 and test_fraction < 1.0:
            n_test = 0
        test_groups.update(order[:n_test])
    is_test = np.array([g in test_groups for g in groups], dtype=bool)
    idx = np.arange(len(groups), dtype=np.int64)
    return idx[~is_test], idx[is_test]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 class_names: Sequence[str], *, epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-4,
                 l2_normalize: bool = True, seed: int = 0) -> dict[str, Any]:
    """Fit a logistic-regression layer on frozen embeddings and score it on the test side.

    Args:
        train_x: (N, D) float training embeddings.
        train_y: (N,) int class indices into ``class_names``.
        test_x: (M, D) float test embeddings.
        test_y: (M,) int class indices.
        class_names: names of the C classes; C sets the output size.
        epochs: full-batch AdamW steps.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay of the layer.
        l2_normalize: L2-normalise embeddings before standardising them.
        seed: seeds the layer's initialisation.

    Returns:
        ``{"accuracy", "balanced_accuracy", "per_class": {name: {"recall", "n_train", "n_test"}},
        "confusion": C x C list (rows = labels, columns = predictions), "n_train", "n_test",
        "class_names", "dim", "train_accuracy"}``. Recall of a class absent from the test side is NaN
        and left out of the balanced accuracy.
    """
    n_classes = len(class_names)
    xtr = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    xte = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    ytr = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    yte = torch.as_tensor(np.asarray(test_y, dtype=np.int64))
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"embeddings must be (N, D) with equal D, got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if len(xtr) == 0 or len(xte) == 0:
        raise ValueError(f"linear probe needs examples on both sides, got {len(xtr)} train and {len(xte)} test")
    for name, y in (("train_y", ytr), ("test_y", yte)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"{name} holds labels outside 0..{n_classes - 1}")
    if l2_normalize:
        xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    mean, std = xtr.mean(0), xtr.std(0, unbiased=False).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n_classes, xtr.shape[1], generator=gen) * 0.01).requires_grad_(True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    from distillkit.train.progress import progress

    for _ in progress(range(epochs), desc="linear probe", unit="step"):
        loss = F.cross_entropy(xtr @ weight.T + bias, ytr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (xte @ weight.T + bias).argmax(1)
        train_acc = float(((xtr @ weight.T + bias).argmax(1) == ytr).float().mean())
    conf = torch.bincount(yte * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    n_train = torch.bincount(ytr, minlength=n_classes)
    per_class: dict[str, dict[str, float | int]] = {}
    recalls = []
    for c, name in enumerate(class_names):
        n = int(conf[c].sum())
        recall = float(conf[c, c]) / n if n else float("nan")
        if n:
            recalls.append(recall)
        per_class[str(name)] = {"recall": recall, "n_train": int(n_train[c]), "n_test": n}
    return {
        "accuracy": float((pred == yte).float().mean()),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "per_class": per_class,
        "confusion": conf.tolist(),
        "n_train": int(len(ytr)),
        "n_test": int(len(yte)),
        "class_names": [str(c) for c in class_names],
        "dim": int(xtr.shape[1]),
        "train_accuracy": train_acc,
    }


def format_probe_comparison(distilled: dict[str, Any], random_init: dict[str, Any]) -> str:
    """A per-class table of test recall for the distilled and the random-init encoder, with the gain
    (``-`` for a class absent from the test side, whose recall is NaN).

    Args:
        distilled: ``linear_probe`` result of the distilled encoder.
        random_init: ``linear_probe`` result of the same encoder at random init (same test side).
    """
    names = list(distilled["per_class"])
    width = max([len("class"), len("balanced accuracy")] + [len(n) for n in names]) + 2
    lines = [f"{'class':<{width}}{'n_test':>8}{'random':>9}{'distilled':>11}{'gain':>9}"]

    def num(v: float, w: int, sign: str = "") -> str:
        # A class absent from the test side has no recall (NaN in the result): shown as "-", never "nan".
        return f"{'-':>{w}}" if math.isnan(v) else format(v, f">{sign}{w}.3f")

    def row(label: str, n: Any, r: float, d: float) -> str:
        return f"{label:<{width}}{n!s:>8}{num(r, 9)}{num(d, 11)}{num(d - r, 9, '+')}"

    for name in names:
        d, r = distilled["per_class"][name], random_init["per_class"].get(name, {"recall": float("nan")})
        lines.append(row(name, d["n_test"], r["recall"], d["recall"]))
    lines.append(row("accuracy", distilled["n_test"], random_init["accuracy"], distilled["accuracy"]))
    lines.append(row("balanced accuracy", distilled["n_test"], random_init["balanced_accuracy"],
                     distilled["balanced_accuracy"]))
    return "\n".join(lines)
