"""COMODO's released evaluation: an RBF-SVM on frozen student features, top-1/3/5 accuracy on the test windows.

Every step follows Breezelled/COMODO (commit 2666a02) comodo/utils/svm_util.py and its caller
comodo/unsupervised_rep_test.py:

1. Features are the student's before its head (``remove_projection_layer``, unsupervised_rep_test.py:64; in
   distillkit ``student.features``), computed in eval mode (svm_util.py:12), one per window.
2. Each feature vector is L2-normalised (svm_util.py:23).
3. A ``StandardScaler`` is fitted on *all* training windows (svm_util.py:31-32, before any subsampling) and
   applied to the test windows (svm_util.py:69).
4. With fewer than 5 training windows per class on average, or fewer than 50 in all, no grid search: one
   ``SVC(C=1e5, gamma="scale")`` on every training window (svm_util.py:34-37).
5. Otherwise, above ``max_samples`` = 10,000 training windows, a stratified subsample of 10,000 drawn by
   ``train_test_split(train_size=10000, random_state=0, stratify=labels)`` (svm_util.py:30, 55-58), and C chosen
   from {1e-4, 1e-3, ..., 1e4} by ``GridSearchCV(cv=5)`` (svm_util.py:39-63): RBF kernel, ``gamma="scale"``,
   ``max_iter=10_000_000``, the rest scikit-learn's defaults (svm_util.py:41-52); scikit-learn scores a
   classifier by accuracy on ``StratifiedKFold(5)`` folds without shuffling, and refits the best C on the
   whole (subsampled) training set (svm_util.py:64, ``best_estimator_``).
6. Class probabilities of every test window (svm_util.py:72): top-1 is the most probable class (svm_util.py:74-75,
   ``argmax`` of the probabilities, which can differ from ``SVC.predict``), top-3 and top-5 by scikit-learn's
   ``top_k_accuracy_score`` (svm_util.py:78, 82).

A quirk of the released protocol, kept: scikit-learn's grid search keeps the *smallest* C among equal CV scores,
and at C = 1e-4 every dual coefficient sits at its bound, so the decision values are tiny and libsvm's Platt fit
can collapse to uniform probabilities. The ranking (``predict``) stays right, but the released top-1, the argmax
of the probabilities, falls to the frequency of the first class. On well-separated synthetic clusters (8 classes,
16-d) C = 1e-4 wins the grid with CV accuracy 0.93 and top-1 is exactly 1/8 (tests/test_comodo_svm.py);
``top1_predict`` exposes it.

Where distillkit differs, and why (none changes the chosen C or, given the same Platt seed, the accuracies):

- The grid search fits ``probability=False``; only the final model computes probabilities. ``SVC.score`` (the
  grid's criterion) uses ``predict``, which never reads the Platt calibration, and libsvm fits the decision
  function on the full training data whatever ``probability`` says, so the CV scores and the chosen C are the
  same, for about a sixth of the fits (each ``probability=True`` fit adds an internal 5-fold CV).
- The Platt calibration's internal CV is seeded (``seed``); the release leaves ``random_state`` unset, so its
  probabilities, and top-k, vary from run to run.
- ``n_jobs`` defaults to 1 (the release uses 10, svm_util.py:61): parallelism does not change the result.
- Predicted columns are mapped through ``svm.classes_``: the release compares the column index with the label
  (svm_util.py:74-75), which is the same only when the training labels are exactly 0..K-1. Test windows of a
  class absent from the training side count as misses (the release's ``top_k_accuracy_score`` would stop with
  an error); the result reports how many there were.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

RELEASED_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # svm_util.py:40
RELEASED_MAX_SAMPLES = 10_000  # svm_util.py:30
RELEASED_FALLBACK_C = 1e5  # svm_util.py:34
RELEASED_MAX_ITER = 10_000_000  # svm_util.py:51
RELEASED_SUBSAMPLE_SEED = 0  # svm_util.py:57
RELEASED_FOLDS = 5  # svm_util.py:61


def _mask(mask: Any, n: int, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype != bool or m.shape != (n,):
        raise ValueError(f"{name} must be a boolean array of shape ({n},), got dtype {m.dtype} shape {m.shape}")
    return m


def _svc(c: float, probability: bool, seed: int | None) -> Any:
    from sklearn.svm import SVC

    # svm_util.py:34 and 41-52: RBF, gamma "scale", shrinking, tol 1e-3, cache 200 MB, ovr: all scikit-learn's
    # defaults except max_iter (its default is no limit) and probability. ``probability`` is passed only when
    # True: scikit-learn >= 1.9 warns about the parameter whenever it is given, even False.
    extra = {"probability": True} if probability else {}
    return SVC(C=c, kernel="rbf", gamma="scale", max_iter=RELEASED_MAX_ITER, random_state=seed,
               decision_function_shape="ovr", **extra)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (at least 1e-12), as ``torch.nn.functional.normalize`` (svm_util.py:23)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def svm_protocol(features: np.ndarray, labels: Sequence[Any] | np.ndarray, train_mask: np.ndarray,
                 test_mask: np.ndarray, *, max_samples: int = RELEASED_MAX_SAMPLES,
                 c_grid: Sequence[float] = RELEASED_C_GRID, folds: int = RELEASED_FOLDS,
                 subsample_seed: int = RELEASED_SUBSAMPLE_SEED, seed: int = 0, n_jobs: int = 1) -> dict[str, Any]:
    """The released SVM evaluation of frozen features (module docstring, step by step with file:line).

    Args:
        features: (N, F) features of N windows, before the student's head.
        labels: (N,) window labels (strings or integers).
        train_mask: (N,) bool, the windows the SVM is fitted on (the training split).
        test_mask: (N,) bool, the windows it is scored on (the test split): every one of them counts.
        max_samples: cap on the windows the grid search and the final SVM are fitted on (released 10,000).
        c_grid: candidate C values (released 1e-4 .. 1e4, nine values).
        folds: cross-validation folds of the grid search (released 5).
        subsample_seed: ``random_state`` of the stratified subsample (released 0).
        seed: ``random_state`` of the final SVM's Platt calibration (unset in the release; see above).
        n_jobs: parallel fits of the grid search.

    Returns:
        ``top1``, ``top3``, ``top5`` (accuracy over every test window), ``C`` (the C used), ``grid_searched``
        (False when the release's small-data fallback applied), ``cv_accuracy`` (mean CV accuracy of that C, None
        without grid search), ``train_windows`` (given), ``fit_windows`` (after the cap), ``test_windows``,
        ``classes`` (sorted training classes), ``unseen_test_windows`` (test windows of classes with no training
        window, counted as misses), ``top1_predict`` (distillkit's diagnostic: top-1 of ``SVC.predict``, the
        decision function the grid search scored; far above ``top1`` when the calibration collapsed, see below).

    Raises:
        ValueError: shapes that do not agree, non-finite features, overlapping or empty sides, fewer than two
            training classes, or an empty ``c_grid``.
    """
    from sklearn.metrics import top_k_accuracy_score
    from sklearn.model_selection import GridSearchCV, train_test_split
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty (N, F) array, got shape {x.shape}")
    n = len(x)
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) like the features, got {y.shape}")
    tr, te = _mask(train_mask, n, "train_mask"), _mask(test_mask, n, "test_mask")
    if (tr & te).any():
        raise ValueError(f"{int((tr & te).sum())} windows are on both the train and the test side")
    if not tr.any() or not te.any():
        raise ValueError(f"need windows on both sides, got {int(tr.sum())} train and {int(te.sum())} test")
    if not np.isfinite(x[tr | te]).all():
        raise ValueError("features hold NaN or infinite values")
    if not c_grid:
        raise ValueError("c_grid is empty")
    if max_samples < 2:
        raise ValueError(f"max_samples must be >= 2, got {max_samples}")

    x = l2_normalise(x.astype(np.float32))  # svm_util.py:23 (torch float32 embeddings)
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    classes = np.unique(y_tr)
    if len(classes) < 2:
        raise ValueError(f"the training side holds {len(classes)} class; an SVM needs at least two")
    scaler = StandardScaler().fit(x_tr)  # svm_util.py:31-32: on every training window, before the cap
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)

    cv_accuracy = None
    if len(x_tr) // len(classes) < 5 or len(x_tr) < 50:  # svm_util.py:36-37: too few windows to cross-validate
        c, grid_searched = RELEASED_FALLBACK_C, False
    else:
        if len(x_tr) > max_samples:  # svm_util.py:55-58
            x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=max_samples, random_state=subsample_seed,
                                                stratify=y_tr)
        grid = GridSearchCV(_svc(1.0, probability=False, seed=None), {"C": [float(v) for v in c_grid]},
                            cv=folds, n_jobs=n_jobs, refit=False)  # refitted below, with probabilities
        with warnings.catch_warnings():  # a class with fewer than `folds` windows: scikit-learn warns, as released
            warnings.simplefilter("ignore", UserWarning)
            grid.fit(x_tr, y_tr)
        c, grid_searched = float(grid.best_params_["C"]), True
        cv_accuracy = float(grid.best_score_)
    with warnings.catch_warnings():
        # scikit-learn 1.9 deprecates SVC(probability=True) (removal planned for 1.11); it is the released model
        warnings.simplefilter("ignore", FutureWarning)
        svm = _svc(c, probability=True, seed=seed).fit(x_tr, y_tr)
        proba = svm.predict_proba(x_te)  # svm_util.py:72

        predicted = svm.predict(x_te)  # distillkit's diagnostic, see ``top1_predict``
    known = np.isin(y_te, svm.classes_)
    n_test = len(y_te)
    top1_hits = int((svm.classes_[np.argmax(proba, axis=1)] == y_te).sum())  # svm_util.py:74-75

    def top_k(k: int) -> float:  # svm_util.py:78, 82
        if not known.any():
            return 0.0
        if k >= len(svm.classes_):  # every known class is within the top k (scikit-learn warns and says 1.0)
            return float(known.sum()) / n_test
        hits = top_k_accuracy_score(y_te[known], proba[known], k=k, labels=svm.classes_, normalize=False)
        return float(hits) / n_test

    return {"top1": top1_hits / n_test, "top3": top_k(3), "top5": top_k(5), "C": c, "grid_searched": grid_searched,
            "cv_accuracy": cv_accuracy, "train_windows": int(tr.sum()), "fit_windows": int(len(x_tr)),
            "test_windows": n_test, "classes": [k.item() if hasattr(k, "item") else k for k in svm.classes_],
            "unseen_test_windows": int((~known).sum()), "top1_predict": float((predicted == y_te).mean())}
