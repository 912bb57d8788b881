"""UniAP (preprocess/uniap.py): both paths against a direct implementation written here, nesting, options."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from distillkit.preprocess.uniap import UniAPConfig, check_nested, uniap, uniap_batch


def first_appearance(labels: np.ndarray) -> np.ndarray:
    """Relabel 0..R-1 by first appearance in raster order, -1 kept (written independently of the module)."""
    out = np.full(labels.size, -1, np.int32)
    seen: dict[int, int] = {}
    for i, v in enumerate(labels.ravel()):
        if v >= 0:
            out[i] = seen.setdefault(int(v), len(seen))
    return out.reshape(labels.shape)


def direct_uniap(feats, thresholds=(0.8, 0.7, 0.6, 0.5, 0.4), min_size=4, spatial_weight=0.0, update="sum",
                 sigma=0.07):
    """UniAP as reference/uniap.md states it, with dense matrices, Python lists and a union-find."""
    h, w, c = feats.shape
    n_tok = h * w
    x = feats.reshape(n_tok, c).astype(np.float64)
    xh = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)
    adj = np.zeros((n_tok, n_tok), bool)
    for r in range(h):
        for q in range(w):
            i = r * w + q
            if q + 1 < w:
                adj[i, i + 1] = adj[i + 1, i] = True
            if r + 1 < h:
                adj[i, i + w] = adj[i + w, i] = True
    members = [[i] for i in range(n_tok)]
    v = xh.copy() if update == "softmax" else x.copy()

    def score(i, j):
        a, b = v[i], v[j]
        s = a @ b / (max(np.linalg.norm(a), 1e-10) * max(np.linalg.norm(b), 1e-10))
        if spatial_weight:
            pi = xh[members[i]].mean(0) @ xh.T
            pj = xh[members[j]].mean(0) @ xh.T
            s = (1 - spatial_weight) * s + spatial_weight * (1 - np.abs(pi - pj).sum() / n_tok)
        return s

    levels = []
    for tau in thresholds:
        while True:
            n = len(members)
            hot = [(i, j) for i in range(n) for j in range(i + 1, n) if adj[i, j] and score(i, j) > tau]
            if not hot:
                break
            parent = list(range(n))

            def find(a, parent=parent):
                while parent[a] != a:
                    parent[a] = parent[parent[a]]
                    a = parent[a]
                return a

            for i, j in hot:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
            roots = sorted({find(i) for i in range(n)})
            group = {r: [i for i in range(n) if find(i) == r] for r in roots}
            new_members = [sum((members[i] for i in group[r]), []) for r in roots]
            if update == "softmax":
                rows = []
                for mem in new_members:
                    logits = xh[mem].sum(0) @ xh.T / sigma
                    p = np.exp(logits - logits.max())
                    p /= p.sum()
                    f = p @ xh
                    rows.append(f / max(np.linalg.norm(f), 1e-10))
                v = np.array(rows)
            else:
                v = np.array([v[group[r]].sum(0) for r in roots])
            m = len(roots)
            new_adj = np.zeros((m, m), bool)
            for a in range(m):
                for b in range(m):
                    if a != b:
                        new_adj[a, b] = adj[np.ix_(group[roots[a]], group[roots[b]])].any()
            adj, members = new_adj, new_members
        lab = np.full(n_tok, -1)
        for k, mem in enumerate(members):
            if len(mem) >= min_size and adj[k].any():
                lab[mem] = k
        levels.append(first_appearance(lab.reshape(h, w)))
    return np.stack(levels)


def blobs(h: int, w: int, seed: int, noise: float = 0.25) -> np.ndarray:
    """Piecewise-constant class prototypes + noise: background, two separate class-1 blobs, one class-2 blob."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(3, 6))
    f = np.empty((h, w, 6))
    f[:] = protos[0]
    f[1 : h // 3 + 1, 1 : w // 3 + 1] = protos[1]
    f[h // 2 + 1 : h - 1, w // 2 + 1 : w - 1] = protos[1]
    f[1 : h // 3 + 1, w // 2 + 1 : w - 1] = protos[2]
    return f + rng.normal(scale=noise, size=f.shape)


CASES = [
    ("random", lambda rng: rng.normal(size=(7, 9, 4)) + rng.normal(size=4) * 2),
    ("random-1d", lambda rng: rng.normal(size=(1, 13, 3)) + 1.5),
    ("smooth", lambda rng: np.cumsum(rng.normal(size=(9, 6, 5)) * 0.3, axis=1) + 1.0),
    ("blobs", lambda rng: blobs(10, 13, int(rng.integers(1000)))),
]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("options", [{}, {"spatial_weight": 0.4}, {"update": "softmax"}],
                         ids=["released", "spatial", "softmax"])
def test_both_paths_match_direct_implementation(name, make, options):
    rng = np.random.default_rng(zlib.crc32(f"{name}{options}".encode()))  # hash() is salted per process
    for _ in range(2):
        f = make(rng)
        want = direct_uniap(f, **options)
        got = uniap(f, **options)
        got_torch = uniap(f, backend="torch", **options)
        assert got.dtype == np.int32 and got.shape == (5, *f.shape[:2])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_torch, want)
        assert check_nested(got)


def test_batched_torch_path_equals_per_image_and_levels_nest():
    rng = np.random.default_rng(3)
    feats = [blobs(int(rng.integers(6, 14)), int(rng.integers(6, 14)), i, noise=0.4) for i in range(4)]
    feats.append(rng.normal(size=(5, 11, 6)) + 1)
    for cfg in (UniAPConfig(), UniAPConfig(semantic=True, update="softmax", spatial_weight=0.3)):
        batch = uniap_batch(feats, cfg)
        for f, b in zip(feats, batch, strict=True):
            ref = uniap(f, cfg.thresholds, cfg.min_size, cfg.spatial_weight, cfg.update, cfg.semantic)
            np.testing.assert_array_equal(b, ref)
            assert check_nested(b[: len(cfg.thresholds)])


def test_min_size_and_single_node_are_dropped():
    f = np.ones((3, 3, 4))  # everything merges into one node at the first threshold: no edge left
    assert (uniap(f) == -1).all()
    f = np.zeros((4, 8, 2))
    f[..., 0] = 1.0
    f[:, 6:, 0], f[:, 6:, 1] = 0.0, 1.0  # a 4x6 region and a 4x2 region, orthogonal
    lv = uniap(f, min_size=9)
    assert (lv[:, :, :6] == 0).all() and (lv[:, :, 6:] == -1).all()
    lv = uniap(f, min_size=8)
    assert (lv[:, :, 6:] == 1).all()


def test_instance_pooling_separates_and_semantic_pooling_merges_same_class_blobs():
    f = blobs(12, 15, 0, noise=0.1)
    lv = uniap(f, semantic=True)
    inst, sem = lv[4], lv[9]
    a, b, c = inst[1, 1], inst[11 - 2, 15 - 3], inst[1, 15 - 3]  # class-1 blob, class-1 blob, class-2 blob
    assert len({int(a), int(b), int(c), int(inst[0, 0])}) == 4
    assert sem[1, 1] == sem[11 - 2, 15 - 3] != sem[1, 15 - 3]
    np.testing.assert_array_equal(uniap(f, semantic=True, backend="torch"), lv)


def test_non_square_grid_shapes_and_bad_input():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 17, 5))
    assert uniap(f, thresholds=(0.5, 0.2)).shape == (2, 3, 17)
    with pytest.raises(ValueError, match=r"\(h, w, C\)"):
        uniap(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        uniap(np.full((2, 2, 2), np.nan))
    with pytest.raises(ValueError, match="update"):
        uniap(f, update="mean")


def test_dense_terms_in_blocks_give_the_same_partitions(monkeypatch):
    """The spatial term and the softmax update computed a few rows at a time (odd block sizes, a block
    per row) give the partitions of one block for everything, on both paths."""
    import distillkit.preprocess.uniap as mod

    rng = np.random.default_rng(11)
    feats = [blobs(9, 12, 1, noise=0.4), rng.normal(size=(6, 7, 6)) + 1]
    cfg = UniAPConfig(semantic=True, update="softmax", spatial_weight=0.4)
    whole = [uniap(f, cfg.thresholds, cfg.min_size, cfg.spatial_weight, cfg.update, cfg.semantic) for f in feats]
    for chunk in (1, 50, 301):
        monkeypatch.setattr(mod, "CHUNK_ELEMENTS", chunk)
        for f, w in zip(feats, whole, strict=True):
            np.testing.assert_array_equal(uniap(f, cfg.thresholds, cfg.min_size, cfg.spatial_weight, cfg.update,
                                                cfg.semantic), w)
        for b, w in zip(uniap_batch(feats, cfg), whole, strict=True):
            np.testing.assert_array_equal(b, w)


def test_dense_terms_memory_is_bounded_by_the_block_size(monkeypatch):
    """On a 32 x 32 grid one affinity matrix over all edges is 1984 x 1024 float64 (16 MB) and the
    softmax logits 1024 x 1024 (8 MB); in blocks of 2^14 elements the reference path's peak stays
    far below either (measured with tracemalloc, which sees NumPy's allocations)."""
    import tracemalloc

    import distillkit.preprocess.uniap as mod

    f = blobs(32, 32, 5, noise=0.3)

    def peak(chunk: int) -> int:
        monkeypatch.setattr(mod, "CHUNK_ELEMENTS", chunk)
        tracemalloc.start()
        try:
            uniap(f, (0.8,), 4, 0.4, "softmax")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(1 << 30) > 12e6  # the whole matrices: the measurement sees them
    assert peak(1 << 14) < 3e6


def two_blocks_apart() -> np.ndarray:
    """Two same-class 4x4 blocks at opposite corners of a 10x10 grid on a background of scattered noise
    (orthogonal feature per token, so no background token merges and all are dropped at min_size 4)."""
    rng = np.random.default_rng(3)
    f = rng.normal(size=(10, 10, 64))
    f[:4, :4] = 0.0
    f[6:, 6:] = 0.0
    f[:4, :4, 0] = f[6:, 6:, 0] = 1.0
    return f


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_semantic_pooling_keeps_a_merged_node_that_is_not_the_whole_image(backend):
    lv = uniap(two_blocks_apart(), semantic=True, backend=backend)
    inst, sem = lv[:5], lv[5:]
    assert [int(x.max()) + 1 for x in inst] == [2, 2, 2, 2, 2]
    # the two blocks are one class: one semantic region covering both, the background stays dropped
    assert [int(x.max()) + 1 for x in sem] == [1, 1, 1, 1, 1]
    assert (sem[:, :4, :4] == 0).all() and (sem[:, 6:, 6:] == 0).all()
    np.testing.assert_array_equal(sem == -1, inst == -1)
    # a node covering the whole image is still dropped (it says nothing)
    assert (uniap(np.ones((3, 3, 4)), semantic=True, backend=backend) == -1).all()


@pytest.mark.parametrize("thresholds", [(0.5, 0.7), (0.8, 0.8), (1.2, 0.5), (0.5, -1.5), (0.5, float("nan"))])
def test_thresholds_must_decrease_within_minus_one_one(thresholds):
    with pytest.raises(ValueError, match=r"strictly decreasing within \[-1, 1\]"):
        UniAPConfig(thresholds)
    with pytest.raises(ValueError, match=r"strictly decreasing within \[-1, 1\]"):
        uniap(np.ones((2, 2, 2)), thresholds=thresholds)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_both_backends_refuse_non_finite_features_alike(bad):
    f = np.ones((3, 3, 2))
    f[1, 1, 0] = bad
    errors = []
    for call in (lambda: uniap(f), lambda: uniap(f, backend="torch"), lambda: uniap_batch([f])):
        with pytest.raises(ValueError) as exc:
            call()
        errors.append(str(exc.value))
    assert errors == ["features contain NaN or inf"] * 3


def test_an_image_that_merges_nothing_keeps_its_features_in_a_batch():
    """With the softmax update, an image with no edge above tau while another image of the batch merges must
    keep its nodes' features: recomputing them turned its raw token features into their softmax pool and
    changed its later levels (found on an H200; the batch below failed on CPU too before the fix)."""
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(int(rng.integers(4, 40)), int(rng.integers(4, 40)), 64)) + rng.normal(size=64)
             for _ in range(5)]
    cfg = UniAPConfig(semantic=True, update="softmax", spatial_weight=0.4)
    for b, f in zip(uniap_batch(feats[3:5], cfg), feats[3:5], strict=True):
        np.testing.assert_array_equal(b, uniap(f, cfg.thresholds, cfg.min_size, cfg.spatial_weight, cfg.update,
                                               cfg.semantic))
