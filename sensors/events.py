"""Sound-event annotations in the DESED convention: read and check the TSV, clip events to a segment.

The TSV (DCASE task 4 / DESED "strong" labels) has a header row naming the tab-separated columns
``filename``, ``onset``, ``offset`` and ``event_label`` (other columns are ignored), one event a row,
times in seconds from the start of the file, ``filename`` relative to the audio root. A file with no
row has no events; a row whose onset, offset and label are all empty lists a file without events
(DESED's validation sets write such rows). Everything else that is not a valid event is an error
naming the TSV and its line, never skipped: a silently dropped event would be scored as a miss.

:func:`clip_events` turns a file's events into one segment's: times relative to the segment start,
clipped to ``[0, duration]``, events wholly outside dropped, sorted, rounded to ``TIME_DECIMALS``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, NamedTuple

COLUMNS: tuple[str, ...] = ("filename", "onset", "offset", "event_label")
TIME_DECIMALS = 4
"""Event times in shards are rounded to 0.1 ms. Why: a segment's start is ``sample_index / rate``, so a time
relative to it carries float noise (``2.9999999999999996``) that would make the JSON differ between equal
builds and never equal the TSV's own value; 0.1 ms is far below a 10 ms log-mel hop (the finest grid any
evaluation scores on) and far above float64 noise on times of hours."""


class EventsError(ValueError):
    """A TSV that is not valid DESED event annotation; the message names the file and the line."""


class Event(NamedTuple):
    """One annotated event: times in seconds (from the file start, or the segment start once clipped)."""

    onset: float
    offset: float
    event_label: str


def read_events(path: Path | str, known: Collection[str] | None = None) -> dict[str, list[Event]]:
    """``filename -> events`` (sorted by onset, then label, then offset) of a DESED TSV.

    Args:
        path: the TSV file.
        known: the filenames (relative, POSIX) that exist; a row naming another file is an error. None: not
            checked.

    Raises:
        EventsError: a missing column in the header, a row with too few fields, an empty filename or label,
            a time that is not a finite number, a negative time, onset >= offset, a file not in ``known``;
            each names the TSV and the line (1 = the header).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a TSV saved by a spreadsheet starts with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise EventsError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    rows = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = [c.strip() for c in next(rows, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise EventsError(f"{path}:1: header lacks the column(s) {', '.join(missing)} (tab-separated "
                          f"{' '.join(COLUMNS)} expected, got {header!r})")
    col = {c: header.index(c) for c in COLUMNS}
    events: dict[str, list[Event]] = {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank line (a trailing newline pair)
        if len(row) <= max(col.values()):
            raise EventsError(f"{path}:{line}: {len(row)} tab-separated fields, the header has {len(header)}")
        if not row[col["filename"]].strip():
            raise EventsError(f"{path}:{line}: empty filename")
        name = Path(row[col["filename"]].strip()).as_posix()  # "./a.wav", "a//b.wav" -> "a.wav", "a/b.wav"
        if known is not None and name not in known:
            raise EventsError(f"{path}:{line}: {name!r} is not an audio file under the root (filenames are "
                              "relative to source.root)")
        cells = [row[col[c]].strip() for c in ("onset", "offset", "event_label")]
        if not any(cells):
            events.setdefault(name, [])  # a file listed without events
            continue
        onset, offset = (_seconds(path, line, c, row[col[c]]) for c in ("onset", "offset"))
        label = cells[2]
        if not label:
            raise EventsError(f"{path}:{line}: empty event_label")
        if onset >= offset:
            raise EventsError(f"{path}:{line}: onset {onset:g} s >= offset {offset:g} s")
        events.setdefault(name, []).append(Event(onset, offset, label))
    return {name: sorted(evs, key=_order) for name, evs in events.items()}


def _seconds(path: Path, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise EventsError(f"{path}:{line}: {column} {cell.strip()!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise EventsError(f"{path}:{line}: {column} {cell.strip()!r} is not a finite number of seconds")
    if value < 0:
        raise EventsError(f"{path}:{line}: negative {column} {value:g} s")
    return value


def _order(e: Event) -> tuple[float, str, float]:
    return e.onset, e.event_label, e.offset


def clip_events(events: Iterable[Event | tuple[float, float, str]], start_s: float,
                duration_s: float) -> list[dict[str, Any]]:
    """One segment's events: ``[{"onset", "offset", "event_label"}]`` relative to ``start_s``.

    Times are clipped to ``[0, duration_s]`` and rounded to ``TIME_DECIMALS``; an event that does not overlap
    the segment (or overlaps it by less than the rounding step) is dropped; sorted by onset, then label (then
    offset, so that the order is total).

    Args:
        events: the file's events, times from the file start in seconds.
        start_s: the segment's start in the file, seconds.
        duration_s: the segment's length in seconds (the audio it holds, padding excluded).
    """
    out = []
    for onset, offset, label in events:
        lo = round(min(max(onset - start_s, 0.0), duration_s), TIME_DECIMALS)
        hi = round(min(max(offset - start_s, 0.0), duration_s), TIME_DECIMALS)
        if hi > lo:
            out.append(Event(lo, hi, label))
    return [e._asdict() for e in sorted(out, key=_order)]


def check_segment_events(value: Any, duration_s: float) -> None:
    """Check a shard's ``events.json`` value against its segment; raises ``ValueError`` with the reason.

    Args:
        value: the decoded field.
        duration_s: the segment's length in seconds (``meta.json``'s ``duration_s``).
    """
    if not isinstance(value, list):
        raise ValueError(f"expected a list of events, got {type(value).__name__}")
    prev = None
    for i, e in enumerate(value):
        if not isinstance(e, dict) or set(e) != set(Event._fields):
            raise ValueError(f"event {i}: expected an object with exactly {list(Event._fields)}, got {e!r}")
        on, off, label = e["onset"], e["offset"], e["event_label"]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (on, off)):
            raise ValueError(f"event {i}: onset and offset must be numbers, got {on!r}, {off!r}")
        if not isinstance(label, str) or not label:
            raise ValueError(f"event {i}: event_label must be a non-empty string, got {label!r}")
        if not 0 <= on < off <= duration_s + 10 ** -TIME_DECIMALS:
            raise ValueError(f"event {i}: [{on}, {off}] is not inside the segment's [0, {duration_s}] with onset "
                             "< offset")
        key = _order(Event(on, off, label))
        if prev is not None and key < prev:
            raise ValueError(f"event {i}: not sorted by onset, then label")
        prev = key
