"""Speaker verification scoring: trials, cosine scores, equal error rate and minimum detection cost.

Pure functions on arrays (no model, no shards), so each can be checked against an independent computation
(tests/test_verification.py: scikit-learn's ``roc_curve`` for the EER, a brute-force threshold sweep for
minDCF). ``train.audio_verification`` applies them to clip embeddings of audio shards.

Conventions (the NIST SRE / VoxSRC ones, as wespeaker's ``wespeaker/utils/score_metrics.py``):

- A trial is accepted when its score is **at least** the threshold. The operating points are every distinct
  score as threshold, plus "accept nothing" (+inf): false-reject rate ``fnr`` = targets below the threshold /
  targets, false-accept rate ``fpr`` = non-targets at or above it / non-targets.
- **EER**: the point where ``fnr = fpr`` on the piecewise-linear curve through those operating points, i.e.
  linearly interpolated between the last point with ``fnr > fpr`` and the first with ``fnr <= fpr`` (what
  wespeaker's ``compute_eer`` does, and what ``brentq(1 - x - interp1d(fpr, tpr)(x))`` on scikit-learn's ROC
  gives). Perfect separation gives 0; scores independent of the label give about 0.5.
- **minDCF**: ``min over thresholds of (C_miss p_target fnr + C_fa (1 - p_target) fpr)``, normalised by the
  cost of the better trivial system ``min(C_miss p_target, C_fa (1 - p_target))``, so it lies in [0, 1]: that
  system (accepting nothing when ``C_miss p_target`` is the smaller, everything otherwise) costs 1, the other one
  more (at P_target 0.05 and C_miss = C_fa = 1, accepting everything costs 0.95 / 0.05 = 19).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# VoxSRC's operating point (2020 onwards): minDCF at P_target = 0.05, C_miss = C_fa = 1.
P_TARGET = 0.05


@dataclass(frozen=True)
class Trials:
    """Verification trials over a list of files: ``enrol[k]`` against ``test[k]``, ``label[k]`` 1 (same
    speaker, target) or 0 (different speakers, non-target). Indices into the caller's file list."""

    enrol: np.ndarray
    test: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} non-finite score(s)")
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ValueError(f"need target and non-target trials, got {int(labels.sum())} target(s) of {len(labels)}")
    return scores, labels.astype(np.int64)


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-reject and false-accept rates at every operating point, strictest first.

    Args:
        scores: (N,) trial scores, higher = more likely the same speaker.
        labels: (N,) 1 for target trials, 0 for non-target trials; both must occur.

    Returns:
        ``(thresholds, fnr, fpr)``: thresholds descending, starting with +inf (accept nothing: fnr 1, fpr 0)
        and ending with the lowest score (accept everything: fnr 0, fpr 1).
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last trial of each distinct score
    accepted_targets = np.r_[0, np.cumsum(y)[last]]
    accepted_nontargets = np.r_[0, np.cumsum(1 - y)[last]]
    fnr = 1.0 - accepted_targets / y.sum()
    fpr = accepted_nontargets / (len(y) - y.sum())
    return np.r_[np.inf, s[last]], fnr, fpr


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """EER, interpolated at the crossing of the false-reject and false-accept rates (module docstring).

    Args:
        scores: (N,) trial scores.
        labels: (N,) 1 target, 0 non-target.

    Returns:
        ``(eer, threshold)``: the threshold is the first operating point at which ``fnr <= fpr``.
    """
    thresholds, fnr, fpr = error_rates(scores, labels)
    d = fnr - fpr  # 1 at "accept nothing", -1 at "accept everything", non-increasing in between
    k = int(np.flatnonzero(d <= 0)[0])
    if d[k] == 0:
        return float(fnr[k]), float(thresholds[k])
    a = d[k - 1] / (d[k - 1] - d[k])  # where the segment from point k-1 to point k crosses fnr = fpr
    return float(fnr[k - 1] + a * (fnr[k] - fnr[k - 1])), float(thresholds[k])


def min_dcf(scores: np.ndarray, labels: np.ndarray, p_target: float = P_TARGET, c_miss: float = 1.0,
            c_fa: float = 1.0) -> tuple[float, float]:
    """Normalised minimum detection cost over all operating points (module docstring).

    Args:
        scores: (N,) trial scores.
        labels: (N,) 1 target, 0 non-target.
        p_target: prior probability of a target trial (VoxSRC: 0.05).
        c_miss: cost of a false reject.
        c_fa: cost of a false accept.

    Returns:
        ``(min_dcf, threshold)`` of the cheapest operating point (+inf: accepting nothing is cheapest).
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    thresholds, fnr, fpr = error_rates(scores, labels)
    cost = (c_miss * p_target * fnr + c_fa * (1.0 - p_target) * fpr) / min(c_miss * p_target, c_fa * (1 - p_target))
    k = int(np.argmin(cost))
    return float(cost[k]), float(thresholds[k])


def cosine_scores(embeddings: np.ndarray, trials: Trials, center: bool = True) -> np.ndarray:
    """Cosine similarity of each trial's two embeddings.

    Args:
        embeddings: (F, D) one embedding per file, indexed by ``trials``.
        trials: the trials.
        center: subtract the mean embedding of the files first (wespeaker scores "cosine (sub mean of
            vox2_dev)"; here the mean of ``embeddings``, which uses no label): every encoder, random ones most,
            puts a large common component in all its outputs, which would otherwise dominate every cosine.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if center:
        x = x - x.mean(0, keepdims=True)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", x[trials.enrol], x[trials.test])


def _pair_blocks(keys: Sequence[str], order: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(a_lo, a_hi, b_lo, b_hi)`` of positions in ``order`` whose pairs are every pair of
    ``order[lo:hi]`` with different keys, each once: a run of equal keys against everything after it."""
    blocks = []
    start = lo
    for i in range(lo + 1, hi + 1):
        if i == hi or keys[order[i]] != keys[order[start]]:
            if i < hi:
                blocks.append((start, i, i, hi))
            start = i
    return blocks


def _sample_pairs(blocks: list[tuple[int, int, int, int]], order: np.ndarray, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct pairs drawn uniformly from the pairs ``blocks`` describe, as (n, 2) file indices; the
    pairs are numbered without being listed, so millions of candidate pairs cost nothing."""
    if not blocks or n == 0:
        return np.empty((0, 2), dtype=np.int64)
    b = np.array(blocks, dtype=np.int64)
    sizes = (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])
    ends = np.cumsum(sizes)
    picks = np.sort(rng.choice(int(ends[-1]), size=n, replace=False))
    blk = np.searchsorted(ends, picks, side="right")
    offset = picks - (ends[blk] - sizes[blk])
    width = b[blk, 3] - b[blk, 2]
    return np.stack([order[b[blk, 0] + offset // width], order[b[blk, 2] + offset % width]], axis=1)


def draw_trials(speakers: Sequence[str], groups: Sequence[str] | None, n_trials: int, seed: int = 0) -> Trials:
    """Balanced trials drawn from speaker labels: half target, half non-target, each pair at most once.

    A target pair is two files of one speaker from **different groups** (recordings: VoxCeleb's video, the
    ``group`` column of labels.csv; without groups every file is its own group): two cuts of one recording share
    its channel and session, and a trial that can be passed by recognising the recording would not measure the
    speaker. A non-target pair is two files of different speakers (their groups may coincide, as two voices of
    one conversation). A file is never paired with itself. Pairs are drawn uniformly without replacement from
    all eligible pairs, deterministically for a ``seed`` and the files' order (ties within a speaker and group
    keep it; the audio evaluation lists files sorted by path).

    Args:
        speakers: per file, its speaker.
        groups: per file, its recording (None: each file its own).
        n_trials: trials wanted; ``n_trials // 2`` of each kind, fewer (still balanced) when fewer target or
            non-target pairs exist.
        seed: seeds the draw.

    Raises:
        ValueError: no target pair (no speaker with files in two groups) or no non-target pair (one speaker).
    """
    speakers = [str(s) for s in speakers]
    groups = [str(g) for g in groups] if groups is not None else [f"\0file{i}" for i in range(len(speakers))]
    if len(groups) != len(speakers):
        raise ValueError(f"{len(speakers)} speakers but {len(groups)} groups")
    if n_trials < 2:
        raise ValueError(f"n_trials must be >= 2, got {n_trials}")
    # a canonical order (speaker, group, then the file's own index) makes the draw a function of the data only
    order = np.array(sorted(range(len(speakers)), key=lambda i: (speakers[i], groups[i], i)), dtype=np.int64)
    nontarget = _pair_blocks(speakers, order, 0, len(order))
    cuts = [0, *(i for i in range(1, len(order)) if speakers[order[i]] != speakers[order[i - 1]]), len(order)]
    target = [blk for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) for blk in _pair_blocks(groups, order, lo, hi)]
    count = {name: sum((b[1] - b[0]) * (b[3] - b[2]) for b in blocks)
             for name, blocks in (("target", target), ("non-target", nontarget))}
    if count["target"] == 0:
        raise ValueError("no target trial possible: no speaker has files in two different groups (recordings)")
    if count["non-target"] == 0:
        raise ValueError("no non-target trial possible: every file has the same speaker")
    n = min(n_trials // 2, count["target"], count["non-target"])
    rng = np.random.default_rng(seed)
    pairs = np.concatenate([_sample_pairs(target, order, n, rng), _sample_pairs(nontarget, order, n, rng)])
    label = np.r_[np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)]
    return Trials(pairs[:, 0], pairs[:, 1], label)


class TrialsFileError(ValueError):
    """A trials file (or one of its lines) that cannot be used: ``where`` (``PATH`` or ``PATH:LINE``) and
    ``reason``."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def read_trials(path: Path | str, files: Sequence[str]) -> Trials:
    """Trials from a file in the VoxCeleb convention: one ``label enrol test`` per line, ``label`` 1 (same
    speaker) or 0, ``enrol`` and ``test`` file paths relative to the source root (as the shards' ``meta.json``
    ``source``). Blank lines are skipped.

    Args:
        path: the trials file.
        files: the known files (relative paths); the returned indices point into it.

    Raises:
        TrialsFileError: unreadable file, a malformed line, a path not among ``files``, a file against itself,
            or no target or no non-target trial; the message names the file and line.
    """
    path = Path(path)
    index = {name: i for i, name in enumerate(files)}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrialsFileError(str(path), f"cannot read trials: {exc}") from None
    enrol, test, label = [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise TrialsFileError(where, f"expected 'label enrol test' with label 1 or 0, got {line.strip()!r}")
        pair = []
        for name in fields[1:]:
            rel = Path(name).as_posix()
            if rel not in index:
                example = next(iter(index), "none")
                raise TrialsFileError(where, f"{name} is not a file of the evaluated shards (paths are relative "
                                      f"to source.root, e.g. {example!r})")
            pair.append(index[rel])
        if pair[0] == pair[1]:
            raise TrialsFileError(where, f"{fields[1]} against itself")
        enrol.append(pair[0])
        test.append(pair[1])
        label.append(int(fields[0]))
    labels = np.array(label, dtype=np.int64)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise TrialsFileError(str(path), f"needs target (1) and non-target (0) trials, got {int(labels.sum())} "
                              f"target(s) of {len(labels)}")
    return Trials(np.array(enrol, dtype=np.int64), np.array(test, dtype=np.int64), labels)
