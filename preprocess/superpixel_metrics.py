"""Superpixel quality against a ground-truth segmentation (numpy, CPU): boundary recall, achievable
segmentation accuracy, and the label invariants the shards rely on (contiguous from 0, 4-connected)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another label (both sides of every edge are marked).

    Args:
        labels: (H, W) integer label map.
    """
    b = np.zeros(labels.shape, bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    b[1:, :] |= dy
    b[:-1, :] |= dy
    return b


def boundary_recall(labels: np.ndarray, truth: np.ndarray, tolerance: int = 2) -> float:
    """Fraction of ground-truth boundary pixels with a superpixel boundary pixel within ``tolerance`` px
    (Chebyshev distance, i.e. a (2t+1) x (2t+1) window); 1.0 if the truth has no boundary.

    Args:
        labels: (H, W) superpixel labels.
        truth: (H, W) ground-truth segment (or class) labels.
        tolerance: distance in pixels.
    """
    gt = boundaries(truth)
    if not gt.any():
        return 1.0
    near = ndimage.maximum_filter(boundaries(labels).astype(np.uint8), size=2 * tolerance + 1) > 0
    return float((near & gt).sum() / gt.sum())


def achievable_segmentation_accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    """ASA: the fraction of pixels labelled correctly when every superpixel takes the ground-truth label it
    overlaps most (an upper bound on the accuracy of any labelling constant on superpixels).

    Args:
        labels: (H, W) non-negative superpixel labels.
        truth: (H, W) non-negative ground-truth labels.
    """
    s = np.asarray(labels, np.int64).ravel()
    g = np.unique(np.asarray(truth).ravel(), return_inverse=True)[1].astype(np.int64)
    n_g = int(g.max()) + 1
    joint = np.bincount(s * n_g + g, minlength=(int(s.max()) + 1) * n_g).reshape(-1, n_g)
    return float(joint.max(1).sum() / s.size)


def is_contiguous(labels: np.ndarray) -> bool:
    """Labels are exactly 0..S-1, each present.

    Args:
        labels: (H, W) integer labels.
    """
    present = np.bincount(np.asarray(labels).ravel().astype(np.int64))
    return bool(labels.min() == 0 and (present > 0).all())


def disconnected_labels(labels: np.ndarray) -> int:
    """How many labels are split into more than one 4-connected piece (0 for a valid superpixel map).

    Args:
        labels: (H, W) integer labels, contiguous from 0.
    """
    pieces = 0
    objects = ndimage.find_objects(np.asarray(labels) + 1)
    for k, sl in enumerate(objects):
        if sl is None:
            continue
        _, n = ndimage.label(labels[sl] == k)
        pieces += n > 1
    return int(pieces)
