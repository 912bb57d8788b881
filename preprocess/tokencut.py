"""TokenCut (Wang et al., CVPR 2022): one foreground mask per image by a normalised cut of the patch graph.

Reference: TokenCut (``YangtaoWANG95/TokenCut`` ``object_discovery.py: ncut``). For
comparison with UniAP in ``bench/bench_uniseg.py``: a dense N x N affinity and a generalised eigenproblem,
O(N^3) per image where UniAP is near-linear.

Shapes: features (h, w, C) (DINO's last-layer keys in the paper; any features here); mask (h, w) bool.
"""

from __future__ import annotations

import numpy as np


def tokencut(features: np.ndarray, tau: float = 0.2, eps: float = 1e-5) -> np.ndarray:
    """The foreground mask of one feature grid.

    Args:
        features: (h, w, C) patch features.
        tau: affinity threshold: cosine above it counts 1, else ``eps`` (TokenCut 0.2, MaskCut 0.15).
        eps: weight of the edges below ``tau``.

    Returns:
        (h, w) bool: the connected component, containing the most salient token, of the side of the
        Fiedler vector's bipartition that holds that token.
    """
    from scipy.linalg import eigh
    from scipy.ndimage import label

    h, w, c = features.shape
    f = features.reshape(h * w, c).astype(np.float64)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-10)
    a = f @ f.T
    a = np.where(a > tau, 1.0, eps)
    d = np.diag(a.sum(axis=1))
    _, vecs = eigh(d - a, d, subset_by_index=[1, 1])
    x = vecs[:, 0]
    fg = x > x.mean()
    seed = int(np.argmax(np.abs(x)))
    if not fg[seed]:
        fg = ~fg
    comps, _ = label(fg.reshape(h, w))
    return comps == comps.reshape(-1)[seed]
