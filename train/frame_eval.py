"""Frame-level evaluation of audio encoders: sound event detection with a frame-wise linear probe
(``eval atst-frame --protocol events``, ``eval audio --protocol events``; docs/audio.md "Frame-level evaluation").

Every segment that carries ``events.json`` (a list of ``{"onset", "offset", "event_label"}``, seconds relative to
the segment start) is embedded frame by frame by the frozen encoder: one feature per 40 ms token (4 log-mel frames
at the 10 ms hop). A linear layer (one sigmoid output per event label, BCE) is trained on the tokens of the training
files, its probabilities on the held-out files are median-filtered and thresholded at 0.5, and runs of active
tokens become events. The split is by source file (``meta.json`` ``group`` or ``source``), so no recording has
segments on both sides. Scores are ``sed_eval``'s, micro-averaged over all test segments and labels:

- event-based F1: onset collar 200 ms, offset collar max(200 ms, 20% of the reference event's length) (DCASE's
  settings since 2016; ``sed_eval``'s own default for the offset is 50%, so it is set here);
- segment-based F1 over 1 s segments.

Both for the distilled encoder and for the same network at random init, as every distillkit protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.messages import one_line
from distillkit.remote import location
from distillkit.train.base import ConfigError

THRESHOLD = 0.5
MEDIAN_TOKENS = 7
"""Median filter length in tokens (7 x 40 ms = 280 ms): it removes active runs and fills gaps of up to 3 tokens
(120 ms), flicker shorter than the 200 ms onset collar that would otherwise count as extra (or split) events, while
an event of 160 ms or more survives it. DCASE's baselines filter with windows of the same order (0.27-0.45 s)."""
T_COLLAR = 0.2
PERCENTAGE_OF_LENGTH = 0.2
SEGMENT_S = 1.0
TOKEN_FRAMES = 4
"""Log-mel frames per token of both audio encoders: ATST-Clip's 64 x 4 patches and ATST-Frame's ``patch_w``
(the release's train_small.sh:24), 40 ms at the 10 ms hop."""


@dataclass(frozen=True)
class EventSegment:
    """One annotated segment: key, group (source file), audio frames ((n_mels, n), the stored dtype), its events."""

    key: str
    group: str
    frames: np.ndarray
    events: list[dict[str, Any]]


# --------------------------------------------------------------------------- reading
def check_events(events: Any, duration_s: float, where: str) -> list[dict[str, Any]]:
    """``events.json``'s list, checked as the build checks it (``sensors.events.check_segment_events``: exactly
    ``onset``, ``offset``, ``event_label``, inside the segment, sorted), so the evaluation trusts no more than
    the pipeline writes.

    Args:
        events: the field (bytes, str or already decoded list).
        duration_s: the segment's length in seconds (``meta.json``'s ``duration_s``).
        where: the segment, for the message.

    Raises:
        ConfigError: one line naming the segment and what is wrong.
    """
    from distillkit.sensors.events import check_segment_events

    if isinstance(events, bytes | str):
        try:
            events = json.loads(events)
        except ValueError as exc:
            raise ConfigError(where, "events.json", f"not JSON ({exc})") from None
    try:
        check_segment_events(events, duration_s)
    except ValueError as exc:
        raise ConfigError(where, "events.json", one_line(exc)) from None
    return [{"onset": float(ev["onset"]), "offset": float(ev["offset"]), "event_label": ev["event_label"]}
            for ev in events]


def load_events(shards: list[Path]) -> list[EventSegment]:
    """Every segment with ``events.json`` of ``shards``, in index order (the others are not decoded).

    Args:
        shards: audio shard directories.

    Raises:
        ConfigError: no segment carries ``events.json``, or one is malformed.
    """
    from distillkit.train.audio_segments import has_events, read_segments

    out = []
    for d in map(location, shards):  # a local folder or a URL (distillkit.remote)
        for seg in read_segments(d, f"events eval: reading {Path(d).name}", select=has_events):
            events = check_events(seg.events, seg.meta["duration_s"], f"{d}/{seg.key}")
            # segments cut from one recording share a group: never split them across train and test
            out.append(EventSegment(seg.key, f"{d}:{seg.meta.get('group') or seg.meta['source']}", seg.frames,
                                    events))
    if not out:
        raise ConfigError(", ".join(map(str, shards)), "events.json",
                          "no segment carries event annotations; cannot evaluate --protocol events (name a DESED "
                          "TSV with source.events in the manifest and rebuild)")
    return out


# --------------------------------------------------------------------------- frame features
@torch.no_grad()
def atst_frame_features(method: Any, spec: np.ndarray, device: str, which: str) -> np.ndarray:
    """ATST-Frame's frame tokens of one segment: (n // 4, D) (``FrameTeacherStudent.frame_embeddings``).

    Args:
        method: a ``train.atst_frame.FrameTeacherStudent``.
        spec: (n_mels, n) dB frames.
        device: torch device.
        which: ``"teacher"`` or ``"student"``.
    """
    x = method.normalise(torch.from_numpy(np.ascontiguousarray(spec, dtype=np.float32)).to(device))[None, None]
    return method.frame_embeddings(x, which).float().cpu().numpy()


@torch.no_grad()
def clip_patch_features(method: Any, spec: np.ndarray, device: str, which: str) -> np.ndarray:
    """ATST-Clip's patch tokens pooled over frequency, one per 40 ms: (max(n // 4, 1), D).

    The segment is cut into consecutive training-crop windows (the position table's length; the last window is
    wrapped cyclically as ``clip_embeddings`` does) and only the tokens of real frames are kept. With 64 x 4 patches
    there is one frequency row, so the pooling is a mean over one row; it stays a mean for other patch heights.

    Args:
        method: a ``train.audio.AudioTeacherStudent``.
        spec: (n_mels, n) dB frames.
        device: torch device.
        which: ``"teacher"`` or ``"student"``.
    """
    from distillkit.train.audio_aug import window

    enc = (method.teacher if which == "teacher" else method.student).encoder
    crop = enc.base_grid[1] * TOKEN_FRAMES
    n = spec.shape[1]
    wins = np.stack([window(spec, s, crop) for s in range(0, n, crop)])[:, None]
    x = method.normalise(torch.from_numpy(np.ascontiguousarray(wins, dtype=np.float32)).to(device))
    tokens = enc.forward_features(x).patches.mean(1)  # (W, w, D): mean over the frequency rows
    return tokens.flatten(0, 1)[: max(n // TOKEN_FRAMES, 1)].float().cpu().numpy()


# --------------------------------------------------------------------------- targets, probe, decoding
def frame_targets(events: list[dict[str, Any]], n_tokens: int, hop_s: float, labels: list[str]) -> np.ndarray:
    """(n_tokens, C) 0/1 targets: a token is active for a label when its centre lies in one of its events.

    Args:
        events: the segment's events (seconds from its start).
        n_tokens: tokens of the segment.
        hop_s: seconds per token.
        labels: the event labels, in output order.
    """
    y = np.zeros((n_tokens, len(labels)), dtype=np.float32)
    centres = (np.arange(n_tokens) + 0.5) * hop_s
    for ev in events:
        if ev["event_label"] in labels:
            y[(centres >= ev["onset"]) & (centres < ev["offset"]), labels.index(ev["event_label"])] = 1.0
    return y


def median_filter(active: np.ndarray, length: int = MEDIAN_TOKENS) -> np.ndarray:
    """Median over ``length`` tokens (odd) along time, per column, the ends padded by repeating the edge token.

    Args:
        active: (T, C) values (0/1 or probabilities).
        length: window length in tokens (1 = no filtering).
    """
    if length < 1 or length % 2 == 0:
        raise ValueError(f"median filter length must be odd and >= 1, got {length}")
    if length == 1 or len(active) == 0:
        return active.copy()
    half = length // 2
    padded = np.pad(active, ((half, half), (0, 0)), mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, length, axis=0), axis=-1).astype(active.dtype)


def decode_events(probs: np.ndarray, hop_s: float, labels: list[str], threshold: float = THRESHOLD,
                  median: int = MEDIAN_TOKENS) -> list[dict[str, Any]]:
    """Frame probabilities to events: threshold, median filter, one event per run of active tokens (a run from
    token ``a`` to ``b`` exclusive is ``[a * hop_s, b * hop_s)``).

    Args:
        probs: (T, C) probabilities.
        hop_s: seconds per token.
        labels: the event label of each column.
        threshold: a token is active at ``p >= threshold``.
        median: median filter length in tokens (odd; 1 = none).

    Returns:
        ``[{"onset", "offset", "event_label"}]``, sorted by onset then label.
    """
    active = median_filter((probs >= threshold).astype(np.float32), median) > 0.5
    out = []
    for c, label in enumerate(labels):
        edges = np.diff(np.concatenate([[0], active[:, c].astype(np.int8), [0]]))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            out.append({"onset": round(float(a * hop_s), 6), "offset": round(float(b * hop_s), 6),
                        "event_label": label})
    return sorted(out, key=lambda e: (e["onset"], e["event_label"]))


def train_frame_probe(x: np.ndarray, y: np.ndarray, epochs: int = 300, lr: float = 0.01,
                      seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A multi-label linear probe on standardised frame features (full-batch AdamW, BCE on sigmoid outputs).

    Args:
        x: (N, D) training tokens.
        y: (N, C) 0/1 targets.
        epochs: full-batch steps.
        lr: AdamW learning rate.
        seed: seeds the layer's init.

    Returns:
        A function from (M, D) features to (M, C) probabilities.
    """
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-6)
    layer = nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.AdamW(layer.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(layer((xt - mean) / std), yt).backward()
        opt.step()

    @torch.no_grad()
    def predict(feats: np.ndarray) -> np.ndarray:
        return torch.sigmoid(layer((torch.from_numpy(feats).float() - mean) / std)).numpy()

    return predict


def sed_scores(reference: dict[str, list[dict[str, Any]]], estimated: dict[str, list[dict[str, Any]]],
               durations: dict[str, float], labels: list[str]) -> dict[str, float]:
    """Event-based and segment-based scores of ``sed_eval``, micro-averaged over all files and labels.

    Args:
        reference: per file, its reference events.
        estimated: per file, its detected events (a missing file: none).
        durations: per file, its length in seconds (the segment-based metric's evaluated length).
        labels: every event label.

    Returns:
        ``event_f1``, ``event_precision``, ``event_recall``, ``event_error_rate``, and the same with ``segment_``.
    """
    import warnings

    with warnings.catch_warnings():  # dcase_util imports pkg_resources, deprecated in setuptools
        warnings.simplefilter("ignore")
        import sed_eval

    events = sed_eval.sound_event.EventBasedMetrics(event_label_list=labels, t_collar=T_COLLAR,
                                                    percentage_of_length=PERCENTAGE_OF_LENGTH,
                                                    evaluate_onset=True, evaluate_offset=True)
    segments = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=labels, time_resolution=SEGMENT_S)
    for name in sorted(reference):
        ref = [{**e, "filename": name} for e in reference[name]]
        est = [{**e, "filename": name} for e in estimated.get(name, [])]
        events.evaluate(ref, est)
        segments.evaluate(ref, est, evaluated_length_seconds=durations[name])
    out = {}
    for prefix, metric in (("event", events), ("segment", segments)):
        overall = metric.results_overall_metrics()
        f = overall["f_measure"]
        out.update({f"{prefix}_f1": float(f["f_measure"]), f"{prefix}_precision": float(f["precision"]),
                    f"{prefix}_recall": float(f["recall"]),
                    f"{prefix}_error_rate": float(overall["error_rate"]["error_rate"])})
    # sed_eval reports NaN where nothing was detected or annotated (0 / 0): F1 is 0 then, not undefined
    return {k: (0.0 if not math.isfinite(v) and not k.endswith("error_rate") else v) for k, v in out.items()}


# --------------------------------------------------------------------------- the protocol
def evaluate_events(checkpoint: Path | None, state: dict[str, Any] | None, shards: list[Path],
                    config: dict[str, Any], device: str, build: Callable[..., nn.Module],
                    features: Callable[[Any, np.ndarray, str, str], np.ndarray], encoder: str = "teacher",
                    test_fraction: float = 0.3, epochs: int = 300, lr: float = 0.01, splits: int = 1,
                    what: str = "frame tokens") -> dict[str, Any]:
    """Sound event detection with a frame-wise linear probe: distilled encoder against random init.

    Args:
        checkpoint: the checkpoint's path (None: random init only).
        state: its model state dict, or None.
        shards: audio shard directories with ``events.json``.
        config: the effective training configuration.
        device: torch device of the encoder (the probe runs on CPU).
        build: the trainer's ``build_method``.
        features: (method, dB frames, device, encoder) -> (tokens, D) frame features.
        encoder: ``"teacher"`` or ``"student"``.
        test_fraction: fraction of source files on the test side.
        epochs: full-batch steps of the probe.
        lr: AdamW learning rate of the probe.
        splits: random splits by file (seeds ``seed``, ``seed + 1``, ...); each network's features are computed
            once and a probe is trained per split. With more than one, ``gain_*`` and the headline are means over
            the splits (a test side of ~30 recordings moves event F1 by several points from one split to the
            next) and ``splits`` lists each split's F1s; the table shows the first split.
        what: the features, in words, for the protocol line.

    Returns:
        ``{"eval_protocol": "events", "protocol": text, "labels", "median_tokens", "hop_s", "random_init":
        sed_scores(...), "distilled": same (with a checkpoint), "gain_event_f1", "gain_segment_f1"}``, and
        ``"splits"`` with more than one split.
    """
    from distillkit.train.audio import add_gains, eval_method, eval_runs, read_norm
    from distillkit.train.clip_probe import group_split

    segs = load_events([location(s) for s in shards])
    labels = sorted({e["event_label"] for s in segs for e in s.events})
    if not labels:
        raise ConfigError(", ".join(map(str, shards)), "events.json", f"{len(segs)} annotated segment(s) but no "
                          "event in any: nothing to detect")
    front = read_norm(location(shards[0]))[2]
    hop_s = TOKEN_FRAMES * front["hop_length"] / front["sample_rate"]
    groups = [s.group for s in segs]
    if splits < 1:
        raise ValueError("splits must be >= 1")
    cuts = [group_split(groups, test_fraction, seed=config["seed"] + k) for k in range(splits)]
    tr, te = cuts[0]
    if len(tr) == 0 or len(te) == 0:
        raise ConfigError(", ".join(map(str, shards)), "events.json", f"{len(set(groups))} annotated source "
                          "file(s): too few for a train/test split by file")
    durations = {s.key: s.frames.shape[1] * front["hop_length"] / front["sample_rate"] for s in segs}
    result: dict[str, Any] = {
        "eval_protocol": "events",
        "protocol": (f"sound event detection: frame-wise linear probe (sigmoid per label, {epochs} full-batch AdamW "
                     f"steps) of {encoder} {what} every {hop_s * 1000:g} ms; threshold {THRESHOLD}, median filter "
                     f"{MEDIAN_TOKENS} tokens; {len(set(groups))} source files, {len(segs)} segments, split by file "
                     f"({len(tr)} train / {len(te)} test segments), {len(labels)} labels; sed_eval micro F1: "
                     f"event-based (collars {T_COLLAR * 1000:g} ms / {PERCENTAGE_OF_LENGTH:.0%} of length), "
                     f"segment-based ({SEGMENT_S:g} s)"),
        "labels": labels, "hop_s": hop_s, "median_tokens": MEDIAN_TOKENS,
    }
    per_split: dict[str, list[dict[str, float]]] = {}
    for name, weights in eval_runs(state):
        method = eval_method(config, shards, state, weights, checkpoint, build=build)
        method.eval().to(device)
        feats = [features(method, s.frames, device, encoder) for s in segs]
        targets = [frame_targets(s.events, len(f), hop_s, labels) for s, f in zip(segs, feats, strict=True)]
        scores = []
        for tr, te in cuts:
            predict = train_frame_probe(np.concatenate([feats[i] for i in tr]),
                                        np.concatenate([targets[i] for i in tr]), epochs=epochs, lr=lr,
                                        seed=config["seed"])
            estimated = {segs[i].key: decode_events(predict(feats[i]), hop_s, labels) for i in te}
            scores.append(sed_scores({segs[i].key: segs[i].events for i in te}, estimated,
                                     {segs[i].key: durations[segs[i].key] for i in te}, labels))
        result[name] = scores[0]
        per_split[name] = [{k: sc[k] for k in ("event_f1", "segment_f1")} for sc in scores]
    add_gains(result, ("event_f1", "segment_f1"), per_split=per_split)
    if splits > 1:
        result["splits"] = per_split
        result["protocol"] += f"; gains are the mean over {splits} splits (table: the first)"
    return result


def format_events(result: dict[str, Any]) -> str:
    """The protocol line and a table of F1 / precision / recall / error rate per encoder.

    Args:
        result: ``evaluate_events``'s result.
    """
    lines = [result["protocol"], f"{'':12s} {'event F1':>9s} {'P':>6s} {'R':>6s} {'ER':>6s}   "
                                 f"{'segment F1':>10s} {'P':>6s} {'R':>6s} {'ER':>6s}"]
    for name in ("random_init", "distilled"):
        if name in result:
            r = result[name]
            lines.append(f"{name:12s} {r['event_f1']:9.3f} {r['event_precision']:6.3f} {r['event_recall']:6.3f} "
                         f"{r['event_error_rate']:6.3f}   {r['segment_f1']:10.3f} {r['segment_precision']:6.3f} "
                         f"{r['segment_recall']:6.3f} {r['segment_error_rate']:6.3f}")
    if "distilled" in result:
        lines.append(f"gain: event F1 {result['gain_event_f1']:+.3f}, segment F1 {result['gain_segment_f1']:+.3f}")
    return "\n".join(lines)


def events_headline(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of an events result: event-based F1 (DCASE's primary SED metric), gain = distilled - random.

    Args:
        result: ``evaluate_events``'s result.
    """
    from distillkit.train.audio import mean_over_splits

    n = len(result.get("splits", {}).get("random_init") or [None])
    rnd = mean_over_splits(result, "random_init", "event_f1")
    dist = mean_over_splits(result, "distilled", "event_f1")
    return {"metric": "event-based F1 (frame probe, sed_eval)" + (f", mean of {n} file splits" if n > 1 else ""),
            "distilled": dist, "random": rnd, "gain": None if dist is None or rnd is None else dist - rnd}
