"""The one reader of audio shards' segments for the evaluations (``eval audio``'s linear probe and speaker
verification, ``eval atst-frame``): every segment's ``meta.json`` and ``label.txt``, and its log-mel only when
asked for, so a protocol that needs a few files of a large shard set (verification trials) decodes and keeps
only theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Segment:
    """One stored segment: its key, ``meta.json``, label (None without ``label.txt``), ``events.json`` as decoded
    (None without it; ``train.frame_eval.check_events`` checks it) and, when decoded, the frames that hold audio in
    the stored dtype (float16 for the audio pipeline's shards)."""

    key: str
    meta: dict[str, Any]
    label: str | None
    frames: np.ndarray | None
    events: Any = None


def decode_label(value: bytes | str) -> str:
    """``label.txt`` as text, stripped.

    Args:
        value: the field as the decoder hands it (bytes or str).
    """
    return value.decode("utf-8").strip() if isinstance(value, bytes) else str(value).strip()


def read_segments(shards: Path, desc: str, frames: bool = True,
                  select: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[Segment]:
    """Every segment of one shard directory, in index order (one pass, no shuffling).

    Args:
        shards: an audio shard directory.
        desc: the progress bar's text.
        frames: decode ``logmel.npy`` (False: ``Segment.frames`` is None and the array stays undecoded bytes
            that are dropped at once).
        select: ``ShardStream``'s ``select``: sees the raw sample and returns False to skip it undecoded
            (``has_label``, ``has_events``; ``train.streaming.JsonFieldFilter`` on ``meta.json`` ``source`` for
            some files).
    """
    from distillkit.train.audio_aug import audio_frames
    from distillkit.train.progress import progress, shard_sample_count
    from distillkit.train.streaming import ShardStream

    stream = ShardStream(shards, epochs=1, shuffle_shards=False, required=["logmel.npy", "meta.json"],
                         keep_raw=() if frames else (".npy",), select=select)
    for s in progress(stream, desc=desc, total=shard_sample_count(shards), unit="segment"):
        spec = None
        if frames:
            stored = s["logmel.npy"]
            # audio_frames returns float32; going back to the stored dtype is exact and halves what a caller keeps
            spec = audio_frames(stored, s["meta.json"]).astype(stored.dtype, copy=False)
        label = decode_label(s["label.txt"]) if "label.txt" in s else None
        yield Segment(s["__key__"], s["meta.json"], label, spec, s.get("events.json"))


class HasField:
    """A ``read_segments`` ``select``: keep the segments that carry one field (the others are not decoded).

    Args:
        field: the field, e.g. ``"label.txt"``.
        what: the kept segments, in words, for ``ShardStream``'s log lines.
    """

    def __init__(self, field: str, what: str):
        self.field = field
        self.what = what

    def __call__(self, raw: dict[str, Any]) -> bool:
        return self.field in raw

    def __repr__(self) -> str:  # ShardStream's log lines name the filter
        return self.what


has_label = HasField("label.txt", "labelled segments")
has_events = HasField("events.json", "segments with events.json")
