"""The clip-level linear probe (train/clip_probe.py): group split, learning, determinism, the table."""

from __future__ import annotations

import numpy as np
import pytest

from distillkit.train.clip_probe import format_probe_comparison, group_split, linear_probe


def test_group_split_keeps_groups_whole_and_classes_on_train_side():
    groups = [f"file{i // 3}" for i in range(60)]  # 20 files, 3 segments each
    labels = [f"c{(i // 3) % 4}" for i in range(60)]  # 5 files per class
    tr, te = group_split(groups, 0.3, seed=1, labels=labels)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    assert not {groups[i] for i in tr} & {groups[i] for i in te}
    for c in {f"c{k}" for k in range(4)}:
        assert any(labels[i] == c for i in tr) and any(labels[i] == c for i in te)
    # deterministic, independent of the order of the examples
    tr2, te2 = group_split(groups, 0.3, seed=1, labels=labels)
    assert tr.tolist() == tr2.tolist() and te.tolist() == te2.tolist()
    perm = np.random.default_rng(0).permutation(60)
    trp, _ = group_split([groups[i] for i in perm], 0.3, seed=1, labels=[labels[i] for i in perm])
    assert {groups[perm[i]] for i in trp} == {groups[i] for i in tr}
    # a class with a single group stays on the train side
    tr1, te1 = group_split(["a", "b", "b"], 0.5, labels=["x", "y", "y"])
    assert 0 in tr1.tolist()
    with pytest.raises(ValueError):
        group_split(["a"], 1.5)


def _blobs(seed: int, sep: float, n: int = 120, dim: int = 16, classes: int = 4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    y = np.arange(n) % classes
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_linear_probe_learns_separable_and_not_noise():
    x, y = _blobs(0, sep=4.0)
    names = ["a", "b", "c", "d"]
    good = linear_probe(x[:80], y[:80], x[80:], y[80:], names, seed=0)
    assert good["accuracy"] > 0.9 and good["balanced_accuracy"] > 0.9
    assert sum(v["n_test"] for v in good["per_class"].values()) == 40
    assert np.array(good["confusion"]).sum() == 40
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    bad = linear_probe(noise[:80], y[:80], noise[80:], y[80:], names, seed=0)
    assert bad["accuracy"] < 0.6
    again = linear_probe(x[:80], y[:80], x[80:], y[80:], names, seed=0)
    assert again == good  # bit-for-bit deterministic
    table = format_probe_comparison(good, bad)
    assert all(n in table for n in names) and "balanced accuracy" in table
    assert f"{good['accuracy'] - bad['accuracy']:+.3f}" in table
    with pytest.raises(ValueError):
        linear_probe(x[:0], y[:0], x, y, names)
