"""The segmentation evaluation's parts against their references: nuscenes-devkit's class mapping,
the released IoU rule, Lovász-softmax's defining property, and the linear head learning."""

from __future__ import annotations

import torch

from distillkit.sensors.nuscenes_reader import load_nuscenes
from distillkit.train.probe import (
    NUSCENES_16,
    NUSCENES_16_NAMES,
    confusion_matrix,
    iou_from_confusion,
    lovasz_softmax,
    predict,
    train_linear_head,
)


def test_class_mapping_matches_nuscenes_devkit(synth_nuscenes):
    """Every lidarseg class maps to the devkit's coarse class of the same name (the old table sent
    static.other (29) to vegetation and static.vegetation (30) to ignore)."""
    from nuscenes.eval.lidarseg.utils import LidarsegClassMapper

    nusc = load_nuscenes(synth_nuscenes, "v1.0-mini")
    mapper = LidarsegClassMapper(nusc)
    assert len(nusc.lidarseg_idx2name_mapping) == len(NUSCENES_16) == 32
    for idx, fine in nusc.lidarseg_idx2name_mapping.items():
        assert NUSCENES_16_NAMES[NUSCENES_16[idx]] == mapper.fine_name_2_coarse_name_mapping[fine], (idx, fine)
    assert NUSCENES_16_NAMES[NUSCENES_16[30]] == "vegetation" and NUSCENES_16[29] == 0


def test_iou_follows_the_released_rule():
    # 17 classes; labels 0 are ignored whatever is predicted; classes 3..16 never occur (IoU 1.0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    preds = torch.tensor([1, 2, 1, 1, 2, 2, 1])
    miou, per_class = iou_from_confusion(confusion_matrix(preds, labels, 17), ignore_index=0)
    iou1 = 2 / (3 + 3 - 2)  # label-1 points: 3, predicted 1 among non-ignored: 3, both: 2
    iou2 = 1 / (2 + 2 - 1)
    assert abs(per_class[0] - iou1) < 1e-12 and abs(per_class[1] - iou2) < 1e-12
    assert (per_class[2:] == 1.0).all() and len(per_class) == 16
    assert abs(miou - (iou1 + iou2 + 14) / 16) < 1e-12


def test_predictions_never_choose_ignore():
    logits = torch.tensor([[9.0, 1.0, 0.0], [5.0, -1.0, 2.0]])
    assert predict(logits).tolist() == [1, 2]


def test_lovasz_of_crisp_predictions_is_one_minus_iou():
    """On one-hot probabilities the Lovász extension equals the Jaccard loss of the discrete prediction,
    averaged over the classes present in the labels (the ignore label left out)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    preds = torch.randint(1, 5, (200,), generator=g)
    probs = torch.nn.functional.one_hot(preds, 5).float()
    keep = labels != 0
    expected = []
    for c in range(1, 5):
        if (labels[keep] == c).any():
            inter = ((preds[keep] == c) & (labels[keep] == c)).sum().item()
            union = ((preds[keep] == c) | (labels[keep] == c)).sum().item()
            expected.append(1 - inter / union)
    got = lovasz_softmax(probs, labels, ignore_index=0)
    assert abs(float(got) - sum(expected) / len(expected)) < 1e-6


def test_linear_head_separates_separable_features():
    g = torch.Generator().manual_seed(1)
    feats, labels = [], []
    for _ in range(6):
        y = torch.randint(1, 4, (300,), generator=g)
        x = torch.nn.functional.one_hot(y, 8).float() * 2 + 0.3 * torch.randn(300, 8, generator=g)
        feats.append(x)
        labels.append(y)
    head = train_linear_head(feats, labels, n_classes=4, epochs=30, batch_size=2)
    with torch.no_grad():
        pred = predict(head(torch.cat(feats)))
    assert (pred == torch.cat(labels)).float().mean() > 0.95
