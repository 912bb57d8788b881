"""The released SVM protocol (train/comodo_svm.py) on synthetic features: it must separate separable classes,
stay at chance on random labels, respect the 10,000-window cap and choose C from the released grid."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")

from distillkit.train.comodo_svm import RELEASED_C_GRID, RELEASED_FALLBACK_C, svm_protocol  # noqa: E402


def _clusters(n: int, k: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(size=(k, dim)) * spread
    return centres[y] + rng.normal(size=(n, dim)), y


def _halves(n: int, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    tr = np.zeros(n, bool)
    tr[:n_train] = True
    return tr, ~tr


def test_released_constants():
    assert RELEASED_C_GRID == (1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100, 1e3, 1e4)
    defaults = {k: p.default for k, p in inspect.signature(svm_protocol).parameters.items()}
    assert defaults["max_samples"] == 10_000 and defaults["folds"] == 5 and defaults["subsample_seed"] == 0


def _rings(n: int, k: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c on a sphere of radius c + 1 (noise 0.1), plus a constant coordinate so that the radius survives
    the protocol's L2 normalisation as an angle: separable, but only by a non-linear boundary."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    d = rng.normal(size=(n, dim))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    x = d * (1 + y)[:, None] + 0.1 * rng.normal(size=(n, dim))
    return np.concatenate([x, np.full((n, 1), 3.0)], 1), y


def test_separable_classes_are_found_and_c_comes_from_the_grid():
    x, y = _rings(600, 8, 4, seed=0)
    tr, te = _halves(600, 400)
    r = svm_protocol(x, y, tr, te)
    assert r["top1"] > 0.9
    assert r["top5"] >= r["top3"] >= r["top1"]
    assert r["grid_searched"] and r["C"] in RELEASED_C_GRID
    assert (r["train_windows"], r["fit_windows"], r["test_windows"]) == (400, 400, 200)
    # the grid fits without probabilities; the release's own configuration (probability=True) picks the same C
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    xs = x.astype(np.float32)
    xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    xs = StandardScaler().fit_transform(xs[tr])
    with warnings.catch_warnings():  # scikit-learn >= 1.9 deprecates probability=True
        warnings.simplefilter("ignore", FutureWarning)
        released = GridSearchCV(SVC(gamma="scale", probability=True, max_iter=10_000_000),
                                {"C": list(RELEASED_C_GRID)}, cv=5).fit(xs, y[tr])
    assert released.best_params_["C"] == r["C"]
    assert released.best_score_ == pytest.approx(r["cv_accuracy"])


def test_released_quirk_smallest_c_collapses_the_probabilities():
    # well-separated clusters: C = 1e-4 already ranks right, ties or wins the grid, and libsvm's Platt fit gives
    # uniform probabilities, so the released top-1 (argmax of the probabilities) is the first class's frequency
    x, y = _clusters(600, 8, 16, spread=0.9, seed=0)
    r = svm_protocol(x, y, *_halves(600, 400))
    assert r["C"] == 1e-4 and r["cv_accuracy"] > 0.9
    assert r["top1"] == pytest.approx(1 / 8) and r["top1_predict"] > 0.9


def test_random_labels_stay_at_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1500, 16))
    y = rng.integers(0, 10, size=1500)
    tr, te = _halves(1500, 500)
    r = svm_protocol(x, y, tr, te)
    assert 0.04 < r["top1"] < 0.17  # chance 0.1 over 1000 test windows
    assert 0.40 < r["top5"] < 0.60  # chance 0.5
    assert r["C"] in RELEASED_C_GRID


def test_cap_of_ten_thousand_training_windows():
    x, y = _clusters(10_700, 5, 8, spread=3.0, seed=2)
    tr, te = _halves(10_700, 10_500)
    r = svm_protocol(x, y, tr, te, c_grid=(1.0,))  # one C keeps this cheap; the cap is the default's
    assert (r["train_windows"], r["fit_windows"], r["test_windows"]) == (10_500, 10_000, 200)
    assert r["top1"] > 0.9
    small = svm_protocol(x[:600], y[:600], *_halves(600, 400), max_samples=100, c_grid=(1.0,))
    assert small["fit_windows"] == 100


def test_scale_of_each_window_does_not_matter():
    # L2 normalisation comes first, so rescaling a window's feature vector changes nothing
    x, y = _clusters(300, 4, 8, spread=1.0, seed=3)
    tr, te = _halves(300, 200)
    scale = np.random.default_rng(4).uniform(0.1, 10.0, size=(300, 1))
    a = svm_protocol(x, y, tr, te, c_grid=(0.1, 1.0, 10.0))
    b = svm_protocol(x * scale, y, tr, te, c_grid=(0.1, 1.0, 10.0))
    assert (a["top1"], a["top3"], a["C"]) == pytest.approx((b["top1"], b["top3"], b["C"]))


def test_small_training_side_uses_the_released_fallback_and_unseen_classes_miss():
    x, y = _clusters(100, 4, 8, spread=3.0, seed=5)
    y = np.array([f"activity_{v}" for v in y])
    tr, te = _halves(100, 40)  # < 50 training windows: no grid search, C = 1e5 (svm_util.py:34-37)
    y_te = y.copy()
    y_te[90:] = "never_trained"  # ten test windows of a class with no training window
    r = svm_protocol(x, y_te, tr, te)
    assert not r["grid_searched"] and r["C"] == RELEASED_FALLBACK_C and r["cv_accuracy"] is None
    assert r["unseen_test_windows"] == 10 and r["test_windows"] == 60
    assert r["top5"] == pytest.approx(50 / 60)  # four classes: every known window is within the top 5
    assert r["top1"] <= 50 / 60
    assert r["classes"] == [f"activity_{i}" for i in range(4)]


@pytest.mark.parametrize("case, message", [
    ("overlap", "on both the train and the test side"),
    ("int_mask", "must be a boolean array"),
    ("one_class", "at least two"),
    ("nan", "NaN or infinite"),
])
def test_bad_input_fails_in_one_line(case, message):
    x, y = _clusters(60, 3, 4, spread=2.0, seed=6)
    tr, te = _halves(60, 40)
    if case == "overlap":
        te = te.copy()
        te[0] = True
    elif case == "int_mask":
        tr = tr.astype(int)
    elif case == "one_class":
        y = np.where(tr, 0, y)
    else:
        x = x.copy()
        x[3, 1] = np.nan
    with pytest.raises(ValueError, match=message) as err:
        svm_protocol(x, y, tr, te)
    assert "\n" not in str(err.value)
