"""UniAP: multi-granular pseudo-masks by agglomerative pooling of a patch-feature grid.

Reference: S2-UniSeg (AAAI-26), its released ``FastUniAP.py`` (docs/uniseg.md).

**Default = the released code** (``aggo_whole_batch`` / ``hc_graph``). Tokens of an (h, w) grid are the
nodes of a 4-neighbour graph. For each threshold tau of ``thresholds`` (0.8, 0.7, 0.6, 0.5, 0.4): score
every edge by the cosine of the two nodes' features (raw features *summed* over members, so the cosine of
size-weighted means); contract every edge scoring strictly above tau at once (the groups are the connected
components of those edges); the new node's feature is the sum of its members', its adjacency the union of
theirs; repeat until no edge scores above tau, then read out a level and move to the next tau. A level is
the current partition with nodes of fewer than ``min_size`` tokens, or with no edge left (the whole image
in one node), dropped: their tokens are -1. Levels are nested: each partition (dropped nodes included)
refines the next, so two tokens kept in one region at level l share a region at every later level where
both are kept (``check_nested``). Unlike the released code, non-square grids are handled and there is no
dense N x N matrix: memory is O(h w C). The paper options below need affinity rows over the image's
N tokens, computed a bounded block of rows at a time (``CHUNK_ELEMENTS``).

**Paper options** (Method, Eqs. 1-5):

- ``spatial_weight`` (ω_s, paper 0.4 with ω_f = 1 - ω_s = 0.6; its best ablation is ω_s 0.4, ω_f 0.6):
  the edge score becomes ω_f cos(V_i, V_j) + ω_s S^s_ij with S^s_ij = 1 - (1/HW) ||P_i - P_j||_1, P_i the
  mean affinity row (over all HW tokens of the image) of i's members, affinity = cosine of token features;
- ``update="softmax"`` (Eq. 5): after each contraction every node's feature becomes
  L2N(softmax((M_i A) / σ) F̂) with M_i A the sum of its members' affinity rows (= (M_i F̂) F̂ᵀ), σ = 0.07,
  the softmax over the image's tokens (not over the batch, a bug of the prototype);
- ``semantic=True``: after each instance level, the same identify + merge step runs to convergence at the
  same tau on a *complete* graph over that level's kept instance nodes, giving regions that may consist of
  several disconnected instances. Their levels follow the instance levels in the output (the paper's
  appendix, which specifies this loop, was not available: this reading is an assumption).

**Two paths, identical partitions.** ``backend="scipy"`` (NumPy, scipy's connected components, sparse
summation) is the reference. ``uniap_batch`` is the torch path: many images as one disjoint graph,
connected components by label propagation with pointer jumping, scatter sums; everything stays on the
device (CUDA-capable), with two small synchronisations per contraction (whether to go on, which images
merged: an image that merged nothing keeps its node features, as it would alone).
Both work in float64 by default, so scores equal to tau within rounding are decided alike; both
number regions in raster order of first appearance.

Shapes: features (h, w, C) float (any C >= 1, raw, not normalised); output (L, h, w) int32, one partition
per level, labels 0..R_l-1 in raster order of first appearance, -1 for dropped tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

THRESHOLDS: tuple[float, ...] = (0.8, 0.7, 0.6, 0.5, 0.4)
SIGMA = 0.07
EPS = 1e-10
CHUNK_ELEMENTS = 1 << 24
"""The paper options' dense terms (an edge's or node's affinity row over the image's N tokens) are
computed this many row x token elements at a time (128 MiB in float64), so their memory stays bounded
on large grids; the results do not depend on it."""


NONFINITE = "features contain NaN or inf"


@dataclass(frozen=True)
class UniAPConfig:
    """UniAP settings (see the module docstring).

    Attributes:
        thresholds: decreasing edge-score thresholds, one level each.
        min_size: nodes with fewer tokens are dropped from a level.
        spatial_weight: ω_s of the paper's spatial similarity (0 = off, the released code).
        update: "sum" (released: summed raw features) or "softmax" (paper Eq. 5).
        sigma: temperature of the softmax update.
        semantic: add semantic-pooling levels after the instance levels.
    """

    thresholds: tuple[float, ...] = THRESHOLDS
    min_size: int = 4
    spatial_weight: float = 0.0
    update: str = "sum"
    sigma: float = SIGMA
    semantic: bool = False

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise ValueError("thresholds must not be empty")
        t = self.thresholds
        # scores are cosines: a threshold outside [-1, 1] never or always merges, and the levels are nested
        # only when each threshold is lower than the one before
        in_range = all(np.isfinite(x) and -1.0 <= x <= 1.0 for x in t)
        if not in_range or any(b >= a for a, b in zip(t, t[1:], strict=False)):
            raise ValueError(f"thresholds must be strictly decreasing within [-1, 1], got {list(t)}")
        if not (np.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive number, got {self.sigma}")
        if self.update not in ("sum", "softmax"):
            raise ValueError(f"update must be 'sum' or 'softmax', got {self.update!r}")
        if not 0.0 <= self.spatial_weight <= 1.0:
            raise ValueError(f"spatial_weight must be in [0, 1], got {self.spatial_weight}")
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")

    @property
    def n_levels(self) -> int:
        """Levels in the output: one per threshold, twice that with semantic pooling."""
        return len(self.thresholds) * (2 if self.semantic else 1)

    def level_names(self) -> list[str]:
        """``"instance@0.8"``, ..., then ``"semantic@0.8"``, ... in output order."""
        names = [f"instance@{t:g}" for t in self.thresholds]
        if self.semantic:
            names += [f"semantic@{t:g}" for t in self.thresholds]
        return names


def grid_edges(h: int, w: int) -> np.ndarray:
    """(2, E) int64 4-neighbour edges u < v of a row-major h x w grid: right neighbours, then down.

    Args:
        h: grid rows.
        w: grid columns.
    """
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    right = np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()])
    down = np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()])
    return np.concatenate([right, down], axis=1)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel non-negative ids to 0..R-1 in raster order of first appearance; -1 stays -1.

    Args:
        labels: integer array of any shape.
    """
    flat = labels.ravel()
    keep = flat >= 0
    out = np.full(flat.shape, -1, np.int32)
    if not keep.any():
        return out.reshape(labels.shape)
    uniq, first = np.unique(flat[keep], return_index=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    out[keep] = rank[np.searchsorted(uniq, flat[keep])]
    return out.reshape(labels.shape)


def _cos(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    a, b = x[e[0]], x[e[1]]
    na = np.maximum(np.linalg.norm(a, axis=1), EPS)
    nb = np.maximum(np.linalg.norm(b, axis=1), EPS)
    return np.einsum("ij,ij->i", a, b) / (na * nb)


def _row_blocks(n_rows: int, n_cols: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    return [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]


def _spatial_l1(mu, e0, e1, tok_hat):
    """Per edge (i, j), (1/N) ||(mu_i - mu_j) F̂ᵀ||_1, the L1 distance of the two nodes' mean affinity
    rows over the image's N tokens; NumPy arrays or torch tensors, a block of edges at a time."""
    parts = [abs((mu[e0[b]] - mu[e1[b]]) @ tok_hat.T).sum(1) for b in _row_blocks(len(e0), len(tok_hat))]
    if isinstance(tok_hat, np.ndarray):
        return (np.concatenate(parts) if parts else np.zeros(0, tok_hat.dtype)) / len(tok_hat)
    import torch

    return (torch.cat(parts) if parts else tok_hat.new_zeros(0)) / len(tok_hat)


def _softmax_pool(sums, tok_hat, sigma: float):
    """Eq. 5 before normalisation: softmax((M_i F̂) F̂ᵀ / σ) F̂ per node, over the image's tokens;
    NumPy arrays or torch tensors, a block of nodes at a time."""
    blocks = _row_blocks(len(sums), len(tok_hat))
    if isinstance(tok_hat, np.ndarray):
        out = np.empty((len(sums), tok_hat.shape[1]), tok_hat.dtype)
        for b in blocks:
            logits = sums[b] @ tok_hat.T / sigma
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            out[b] = p @ tok_hat
        return out
    import torch

    out = tok_hat.new_empty((len(sums), tok_hat.shape[1]))
    for b in blocks:
        out[b] = torch.softmax(sums[b] @ tok_hat.T / sigma, dim=1) @ tok_hat
    return out


class _NumpyGraph:
    """Nodes of one image for the reference path."""

    def __init__(self, feats: np.ndarray, cfg: UniAPConfig, dtype: type) -> None:
        n, _ = feats.shape
        self.cfg = cfg
        self.tok = feats.astype(dtype)
        self.tok_hat = self.tok / np.maximum(np.linalg.norm(self.tok, axis=1, keepdims=True), EPS)
        self.x = self.tok_hat.copy() if cfg.update == "softmax" else self.tok.copy()
        self.size = np.ones(n, np.int64)
        self.label = np.arange(n, dtype=np.int64)

    def member_sum(self) -> np.ndarray:
        """(n, C) sum of members' normalised token features."""
        from scipy.sparse import csr_matrix

        n = len(self.size)
        m = csr_matrix((np.ones(len(self.label)), (self.label, np.arange(len(self.label)))), shape=(n, len(self.label)))
        return np.asarray(m @ self.tok_hat)

    def scores(self, e: np.ndarray) -> np.ndarray:
        s = _cos(self.x, e)
        w = self.cfg.spatial_weight
        if w > 0 and e.shape[1]:
            mu = self.member_sum() / self.size[:, None]
            # ||P_i - P_j||_1 / HW with P_i = mu_i F̂ᵀ, the mean affinity row of i's members
            s = (1 - w) * s + w * (1.0 - _spatial_l1(mu, e[0], e[1], self.tok_hat))
        return s

    def contract(self, cl: np.ndarray, n_new: int) -> None:
        from scipy.sparse import csr_matrix

        m = csr_matrix((np.ones(len(cl), dtype=self.x.dtype), (cl, np.arange(len(cl)))), shape=(n_new, len(cl)))
        self.size = np.bincount(cl, weights=self.size, minlength=n_new).astype(np.int64)
        self.label = cl[self.label]
        if self.cfg.update == "softmax":
            v = _softmax_pool(self.member_sum(), self.tok_hat, self.cfg.sigma)
            self.x = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), EPS)
        else:
            self.x = np.asarray(m @ self.x)


def _contract_edges(e: np.ndarray, cl: np.ndarray) -> np.ndarray:
    """Edges between distinct new nodes, u < v, unique, sorted."""
    a, b = cl[e[0]], cl[e[1]]
    keep = a != b
    a, b = a[keep], b[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n = int(cl.max(initial=0)) + 1
    key = np.unique(lo * n + hi)
    return np.stack([key // n, key % n])


def _components(n: int, e: np.ndarray) -> tuple[int, np.ndarray]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(e.shape[1]), (e[0], e[1])), shape=(n, n))
    k, cl = connected_components(g, directed=False)
    return int(k), cl.astype(np.int64)


def _readout(g: _NumpyGraph, e: np.ndarray, min_size: int, shape: tuple[int, int]) -> np.ndarray:
    n = len(g.size)
    has_edge = np.zeros(n, bool)
    has_edge[e[0]] = True
    has_edge[e[1]] = True
    keep = has_edge & (g.size >= min_size)
    lvl = np.where(keep[g.label], g.label, -1)
    return canonical_labels(lvl.reshape(shape))


def _merge_to_convergence(g: _NumpyGraph, e: np.ndarray, tau: float) -> np.ndarray:
    s = g.scores(e)
    while e.shape[1] and (s > tau).any():
        k, cl = _components(len(g.size), e[:, s > tau])
        g.contract(cl, k)
        e = _contract_edges(e, cl)
        s = g.scores(e)
    return e


def _semantic_level(g: _NumpyGraph, inst: np.ndarray, tau: float, cfg: UniAPConfig) -> np.ndarray:
    """Semantic pooling of one instance level: complete graph over its kept nodes, merged at tau.

    The graph holds the level's kept tokens only (dropped tokens stay -1), so affinity rows, the
    spatial term and the softmax update run over those tokens.
    """
    k = int(inst.max(initial=-1)) + 1
    if k < 2:
        return inst.copy()
    flat = inst.ravel()
    tok_idx = np.flatnonzero(flat >= 0)
    sg = _NumpyGraph.__new__(_NumpyGraph)
    sg.cfg, sg.tok, sg.tok_hat = cfg, g.tok[tok_idx], g.tok_hat[tok_idx]
    sg.label = flat[tok_idx].astype(np.int64)
    sg.size = np.bincount(sg.label, minlength=k).astype(np.int64)
    if cfg.update == "softmax":
        v = _softmax_pool(sg.member_sum(), sg.tok_hat, cfg.sigma)
        sg.x = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), EPS)
    else:
        sums = np.zeros((k, g.tok.shape[1]), g.tok.dtype)
        np.add.at(sums, sg.label, sg.tok)
        sg.x = sums
    iu, ju = np.triu_indices(k, k=1)
    _merge_to_convergence(sg, np.stack([iu, ju]).astype(np.int64), tau)
    n = len(sg.size)
    # On a complete graph every node keeps an edge until one node is left. That node is dropped only when it
    # covers the whole image (a partition into one region says nothing); when some tokens were dropped at the
    # instance level (e.g. two same-class blocks on a background) the merged node is a real region: kept.
    whole = n == 1 and len(tok_idx) == flat.size
    keep = sg.size >= cfg.min_size if not whole else np.zeros(n, bool)
    out = np.full(flat.shape, -1, np.int64)
    out[tok_idx] = np.where(keep[sg.label], sg.label, -1)
    return canonical_labels(out.reshape(inst.shape))


def uniap(
    features: np.ndarray,
    thresholds: Sequence[float] = THRESHOLDS,
    min_size: int = 4,
    spatial_weight: float = 0.0,
    update: str = "sum",
    semantic: bool = False,
    sigma: float = SIGMA,
    backend: str = "scipy",
    device: str = "cpu",
    dtype: str = "float64",
) -> np.ndarray:
    """UniAP partitions of one feature grid (see the module docstring).

    Args:
        features: (h, w, C) patch features, raw (the cosine normalises them).
        thresholds: decreasing edge-score thresholds; one level each.
        min_size: nodes of fewer tokens are dropped (-1) from a level.
        spatial_weight: ω_s of the paper's spatial similarity; 0 = the released code.
        update: "sum" (released) or "softmax" (paper Eq. 5).
        semantic: also return semantic-pooling levels (after the instance levels).
        sigma: softmax temperature of the paper's update.
        backend: "scipy" (reference) or "torch" (``uniap_batch`` on ``device``).
        device: torch device of the torch backend.
        dtype: "float64" (default: both backends decide ties alike) or "float32".

    Returns:
        (L, h, w) int32, L = len(thresholds) (twice that with ``semantic``); labels 0..R-1 in raster order
        of first appearance, -1 for dropped tokens.
    """
    cfg = UniAPConfig(tuple(float(t) for t in thresholds), min_size, spatial_weight, update, sigma, semantic)
    features = np.asarray(features)
    if features.ndim != 3 or min(features.shape) < 1:
        raise ValueError(f"features must be (h, w, C) with every side >= 1, got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(NONFINITE)
    if backend == "torch":
        import torch

        return uniap_batch([torch.from_numpy(np.ascontiguousarray(features))], cfg, device=device, dtype=dtype)[0]
    if backend != "scipy":
        raise ValueError(f"backend must be 'scipy' or 'torch', got {backend!r}")
    h, w, c = features.shape
    g = _NumpyGraph(features.reshape(h * w, c), cfg, np.float64 if dtype == "float64" else np.float32)
    e = grid_edges(h, w)
    levels, sem = [], []
    for tau in cfg.thresholds:
        e = _merge_to_convergence(g, e, tau)
        inst = _readout(g, e, cfg.min_size, (h, w))
        levels.append(inst)
        if cfg.semantic:
            sem.append(_semantic_level(g, inst, tau, cfg))
    return np.stack(levels + sem).astype(np.int32)


# --------------------------------------------------------------------------- torch path


def _torch_components(n: int, u, v):
    """Connected components of n nodes and edges (u, v) on the edges' device.

    Hooking of the larger root onto the smaller, then full pointer jumping, until every edge joins
    equal labels. Returns (k, cl) with components numbered by increasing smallest member (scipy's order).
    """
    import torch

    lab = torch.arange(n, device=u.device)
    if u.numel():
        while True:
            lu, lv = lab[u], lab[v]
            lab = lab.scatter_reduce(0, torch.maximum(lu, lv), torch.minimum(lu, lv), reduce="amin")
            while True:
                nxt = lab[lab]
                if torch.equal(nxt, lab):
                    break
                lab = nxt
            if torch.equal(lab[u], lab[v]):
                break
    roots, cl = torch.unique(lab, return_inverse=True)
    return int(roots.numel()), cl


class _TorchBatch:
    """A disjoint union of image graphs on one device."""

    def __init__(self, feats: list, cfg: UniAPConfig, device, dtype) -> None:
        import torch

        self.cfg = cfg
        self.shapes = [tuple(f.shape[:2]) for f in feats]
        self.n_tok = [h * w for h, w in self.shapes]
        self.tok = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).to(device=device, dtype=dtype)
        self.tok_hat = torch.nn.functional.normalize(self.tok, dim=1, eps=EPS)
        self.img_of_tok = torch.repeat_interleave(
            torch.arange(len(feats), device=device), torch.tensor(self.n_tok, device=device)
        )
        n = self.tok.shape[0]
        self.x = self.tok_hat.clone() if cfg.update == "softmax" else self.tok.clone()
        self.size = torch.ones(n, dtype=torch.long, device=device)
        self.label = torch.arange(n, device=device)
        self.img_of_node = self.img_of_tok.clone()
        offsets = np.cumsum([0] + self.n_tok[:-1])
        edges = [torch.from_numpy(grid_edges(h, w) + o) for (h, w), o in zip(self.shapes, offsets, strict=True)]
        self.edges = torch.cat(edges, dim=1).to(device)
        self.tok_offsets = offsets

    def _per_image(self):
        """(image index, token slice) pairs."""
        return [(i, slice(int(o), int(o) + n)) for i, (o, n) in enumerate(zip(self.tok_offsets, self.n_tok,
                                                                                strict=True))]

    def member_sum(self):
        import torch

        out = torch.zeros(self.size.numel(), self.tok.shape[1], dtype=self.tok.dtype, device=self.tok.device)
        return out.index_add_(0, self.label, self.tok_hat)

    def scores(self, e):
        import torch

        a, b = self.x[e[0]], self.x[e[1]]
        s = (a * b).sum(1) / (a.norm(dim=1).clamp_min(EPS) * b.norm(dim=1).clamp_min(EPS))
        w = self.cfg.spatial_weight
        if w > 0 and e.shape[1]:
            mu = self.member_sum() / self.size[:, None].to(self.tok.dtype)
            l1 = torch.zeros_like(s)
            img_e = self.img_of_node[e[0]]
            for i, sl in self._per_image():  # affinity rows are over one image's tokens
                sel = img_e == i
                if sel.any():
                    l1[sel] = _spatial_l1(mu, e[0][sel], e[1][sel], self.tok_hat[sl])
            s = (1 - w) * s + w * (1.0 - l1)
        return s

    def contract(self, cl, n_new: int, merged) -> None:
        """Contract nodes to their components ``cl`` (n_new of them); ``merged`` (bool per image) says which
        images had an edge above tau this round."""
        import torch

        dev = self.tok.device
        self.size = torch.zeros(n_new, dtype=torch.long, device=dev).index_add_(0, cl, self.size)
        img = torch.zeros(n_new, dtype=torch.long, device=dev)
        self.img_of_node = img.scatter(0, cl, self.img_of_node)
        self.label = cl[self.label]
        if self.cfg.update == "softmax":
            # An image that merged nothing this round keeps its nodes' features (moved to their new ids), as the
            # reference, which contracts each image on its own, never touches it; recomputing them would turn a
            # first level's raw token features into their softmax pool (the H200 run found it, docs/uniseg.md).
            x = torch.zeros(n_new, self.x.shape[1], dtype=self.x.dtype, device=dev).index_add_(0, cl, self.x)
            sums = self.member_sum()
            for (i, sl), hot in zip(self._per_image(), merged.tolist(), strict=True):
                if hot:
                    sel = self.img_of_node == i
                    x[sel] = torch.nn.functional.normalize(_softmax_pool(sums[sel], self.tok_hat[sl], self.cfg.sigma),
                                                           dim=1, eps=EPS)
            self.x = x
        else:
            self.x = torch.zeros(n_new, self.x.shape[1], dtype=self.x.dtype, device=dev).index_add_(0, cl, self.x)


def _torch_contract_edges(e, cl, n_new: int):
    import torch

    a, b = cl[e[0]], cl[e[1]]
    keep = a != b
    a, b = a[keep], b[keep]
    key = torch.unique(torch.minimum(a, b) * n_new + torch.maximum(a, b))
    return torch.stack([key // n_new, key % n_new])


def _torch_merge(g: _TorchBatch, e, tau: float):
    import torch

    s = g.scores(e)
    while True:
        hot = s > tau
        if not bool(hot.any()):  # the one synchronisation per contraction
            return e
        k, cl = _torch_components(g.size.numel(), e[0][hot], e[1][hot])
        merged = torch.zeros(len(g.shapes), dtype=torch.bool, device=e.device)
        merged[g.img_of_node[e[0][hot]]] = True
        g.contract(cl, k, merged)
        e = _torch_contract_edges(e, cl, k)
        s = g.scores(e)


def _torch_canonical(lvl, img_of_tok, n_img: int, n_tok: list[int]):
    """Per image, labels renumbered 0..R-1 by first appearance in raster order (on the device)."""
    import torch

    dev = lvl.device
    pos = torch.cat([torch.arange(n, device=dev) for n in n_tok])
    valid = lvl >= 0
    out = torch.full_like(lvl, -1)
    if not bool(valid.any()):
        return out
    ids, inv = torch.unique(lvl[valid], return_inverse=True)
    first = torch.full((ids.numel(),), np.iinfo(np.int64).max, device=dev, dtype=torch.long)
    first = first.scatter_reduce(0, inv, pos[valid], reduce="amin")
    img = torch.zeros(ids.numel(), dtype=torch.long, device=dev).scatter(0, inv, img_of_tok[valid])
    order = torch.argsort(img * (max(n_tok) + 1) + first)  # by image, then first appearance
    rank_global = torch.empty_like(order)
    rank_global[order] = torch.arange(order.numel(), device=dev)
    counts = torch.bincount(img, minlength=n_img)
    start = torch.cumsum(counts, 0) - counts
    out[valid] = rank_global[inv] - start[img[inv]]
    return out


def _torch_readout(g: _TorchBatch, e, min_size: int):
    import torch

    n = g.size.numel()
    has_edge = torch.zeros(n, dtype=torch.bool, device=e.device)
    has_edge[e[0]] = True
    has_edge[e[1]] = True
    keep = has_edge & (g.size >= min_size)
    lvl = torch.where(keep[g.label], g.label, torch.full_like(g.label, -1))
    return _torch_canonical(lvl, g.img_of_tok, len(g.shapes), g.n_tok)


def _torch_semantic(g: _TorchBatch, inst, tau: float, cfg: UniAPConfig):
    """Semantic pooling of one instance level for every image of the batch (complete graph per image)."""
    import torch

    dev = g.tok.device
    valid = inst >= 0
    out = torch.full_like(inst, -1)
    if not bool(valid.any()):
        return out
    # global node id per (image, instance label)
    base = torch.zeros(len(g.shapes), dtype=torch.long, device=dev)
    n_per = torch.zeros(len(g.shapes), dtype=torch.long, device=dev).scatter_reduce(
        0, g.img_of_tok[valid], inst[valid] + 1, reduce="amax")
    base[1:] = torch.cumsum(n_per, 0)[:-1]
    tok_idx = torch.nonzero(valid).squeeze(1)
    node = (base[g.img_of_tok] + inst)[tok_idx]
    n = int(n_per.sum())
    sg = _TorchBatch.__new__(_TorchBatch)
    sg.cfg = cfg
    sg.tok, sg.tok_hat = g.tok[tok_idx], g.tok_hat[tok_idx]
    sg.img_of_tok = g.img_of_tok[tok_idx]
    sg.shapes = g.shapes
    sg.n_tok = torch.bincount(sg.img_of_tok, minlength=len(g.shapes)).tolist()
    sg.tok_offsets = np.cumsum([0] + sg.n_tok[:-1])
    sg.label = node
    sg.size = torch.bincount(node, minlength=n)
    sg.img_of_node = torch.zeros(n, dtype=torch.long, device=dev).scatter(0, node, sg.img_of_tok)
    src = sg.tok if cfg.update == "sum" else sg.tok_hat
    sums = torch.zeros(n, src.shape[1], dtype=src.dtype, device=dev).index_add_(0, node, src)
    if cfg.update == "softmax":
        v = torch.zeros_like(sums)
        for i, sl in sg._per_image():
            sel = sg.img_of_node == i
            if sel.any():
                v[sel] = _softmax_pool(sums[sel], sg.tok_hat[sl], cfg.sigma)
        sg.x = torch.nn.functional.normalize(v, dim=1, eps=EPS)
    else:
        sg.x = sums
    # complete graph within each image
    edges = []
    for i in range(len(g.shapes)):
        k = int(n_per[i])
        if k >= 2:
            iu = torch.triu_indices(k, k, offset=1, device=dev)
            edges.append(iu + base[i])
    e = torch.cat(edges, 1) if edges else torch.zeros(2, 0, dtype=torch.long, device=dev)
    _torch_merge(sg, e, tau)
    counts_img = torch.bincount(sg.img_of_node, minlength=len(g.shapes))
    # one node left that covers every token of its image is dropped (as in ``_semantic_level``)
    covers_all = torch.tensor(sg.n_tok, device=dev) == torch.tensor(g.n_tok, device=dev)
    single = (counts_img[sg.img_of_node] <= 1) & covers_all[sg.img_of_node]
    keep = (sg.size >= cfg.min_size) & ~single
    lvl_sub = torch.where(keep[sg.label], sg.label, torch.full_like(sg.label, -1))
    # images whose level had fewer than two kept instances are copied unchanged (as the reference does)
    few = n_per < 2
    full = torch.full_like(inst, -1)
    full[tok_idx] = lvl_sub
    # ids must stay unique across images until the per-image renumbering: shift the copied ones past the nodes
    copied = torch.where(inst >= 0, sg.size.numel() + base[g.img_of_tok] + inst, inst)
    full = torch.where(few[g.img_of_tok], copied, full)
    return _torch_canonical(full, g.img_of_tok, len(g.shapes), g.n_tok)


def uniap_batch(features: list, cfg: UniAPConfig | None = None, device: str = "cpu",
                dtype: str = "float64") -> list[np.ndarray]:
    """The torch path: UniAP of many feature grids at once, one disjoint graph on ``device``.

    Args:
        features: list of (h_i, w_i, C) tensors or arrays (sizes may differ; C must not).
        cfg: UniAP settings (default ``UniAPConfig()``, the released code).
        device: torch device ("cpu", "cuda", ...).
        dtype: "float64" (default, matches the reference exactly) or "float32".

    Returns:
        Per image, (L, h_i, w_i) int32 numpy partitions as ``uniap`` returns them.
    """
    import torch

    cfg = cfg or UniAPConfig()
    tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    feats = [torch.as_tensor(f) for f in features]
    if not feats:
        return []
    for f in feats:
        if f.ndim != 3 or min(f.shape) < 1:
            raise ValueError(f"features must be (h, w, C) with every side >= 1, got {tuple(f.shape)}")
        if not bool(torch.isfinite(f).all()):  # the same refusal as the scipy path
            raise ValueError(NONFINITE)
    g = _TorchBatch(feats, cfg, torch.device(device), tdtype)
    e = g.edges
    inst_levels, sem_levels = [], []
    for tau in cfg.thresholds:
        e = _torch_merge(g, e, tau)
        inst = _torch_readout(g, e, cfg.min_size)
        inst_levels.append(inst)
        if cfg.semantic:
            sem_levels.append(_torch_semantic(g, inst, tau, cfg))
    stacked = torch.stack(inst_levels + sem_levels).to(torch.int32).cpu().numpy()  # (L, total tokens)
    out, o = [], 0
    for (h, w), n in zip(g.shapes, g.n_tok, strict=True):
        out.append(np.ascontiguousarray(stacked[:, o : o + n].reshape(-1, h, w)))
        o += n
    return out


def check_nested(levels: np.ndarray) -> bool:
    """True if every partition refines the next: tokens sharing a label at level l share one at l+1,
    for tokens kept at both levels (a token dropped at l may be kept later, and vice versa).

    Args:
        levels: (L, h, w) partitions as ``uniap`` returns them (instance levels only).
    """
    flat = levels.reshape(levels.shape[0], -1)
    for a, b in zip(flat[:-1], flat[1:], strict=True):
        both = (a >= 0) & (b >= 0)
        pairs = np.unique(np.stack([a[both], b[both]], 1), axis=0)
        if len(np.unique(pairs[:, 0])) != len(pairs):
            return False
    return True
