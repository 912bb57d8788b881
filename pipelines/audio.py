"""The audio pipeline: any folder of audio files -> log-mel segments (fields: docs/reading.md; docs/audio.md).

plan (client): every audio file under ``source.root`` in sorted relative-path order, one ref per
file with its label from ``labels.csv`` when listed; no file is opened.
samples (worker): decode, mix down, resample (``sensors.audio``), cut into ``segment_s``
segments (the last partial one zero padded, or dropped: always when under ``min_tail_s``), log-mel each
(``preprocess.logmel``, librosa reference or the batched torch path), one sample per segment with key
``{sanitised relative path}_{segment:04d}`` (a path that is not valid UTF-8: the percent-encoding of its bytes,
``sensors.listing.shard_key``). Folders named like audio files, symlink loops and unreadable files are rejected
while planning, with the reason (``sensors.listing``).
Fields: ``logmel.npy`` (float16 dB), ``meta.json``, optional ``audio.flac`` (the resampled
segment, 16-bit) and ``label.txt`` (UTF-8 class name) when the file is labelled.
Statistics: log-mel mean/std over the frames that hold audio (not padding) go into
``index.json`` for the trainer's normalisation. Decisions: docs/audio.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distillkit.pipelines.base import Built, Demo, FieldSpec, Pipeline, Rejected, Rejection, Sample, SampleRef, guarded
from distillkit.pipelines.codecs import SampleView, json_bytes, npy_bytes
from distillkit.pipelines.manifest import Key, Manifest, ManifestError, check_output_outside
from distillkit.pipelines.placement import DEVICES, resolve_device, run_stage
from distillkit.preprocess.logmel import LogMelConfig, cut_segment, logmel, segment_bounds, valid_frames
from distillkit.sensors.audio import (
    AUDIO_EXTENSIONS,
    AudioReadError,
    flac_bytes,
    read_audio,
    read_label_rows,
)
from distillkit.sensors.events import EventsError, check_segment_events, clip_events, read_events
from distillkit.sensors.listing import list_inputs, printable, shard_key

SCHEMA = {
    "source": {
        "kind": Key(str, "dir", choices=("dir", "audio_dir"),
                    doc='"dir": every audio file under root ("audio_dir" is accepted as the same)'),
        "root": Key("existing_path", required=True, doc="folder searched recursively for audio files"),
        "labels": Key(str, "labels.csv", doc='CSV "path,label" under the root ("" = no labels; missing = none)'),
        "events": Key(str, "", doc='sound events: a DESED TSV (filename, onset, offset, event_label; relative '
                                   'to root when relative) whose events go to each segment\'s events.json '
                                   '("" = no event annotation; docs/audio.md)'),
        "extensions": Key(list, list(AUDIO_EXTENSIONS), doc="file endings read as audio (case-insensitive)"),
    },
    "stages": {
        "audio": {
            "sample_rate": Key(int, 16000, doc="target rate in Hz (soxr HQ resampling)"),
            "store_waveform": Key(bool, False, doc="also store the resampled segment as 16-bit audio.flac"),
        },
        "segments": {
            "segment_s": Key(float, 10.0, doc="segment length in seconds"),
            "last": Key(str, "pad", choices=("pad", "drop"),
                        doc="final partial segment: zero padded, or dropped (listed as rejected)"),
            "min_tail_s": Key(float, 1.0, doc='with last = "pad": a partial segment with less audio than this is '
                                              "dropped (listed as rejected), so no segment is one frame of audio "
                                              "and padding (distillkit's choice, docs/audio.md)"),
        },
        "logmel": {
            "n_fft": Key(int, 1024),
            "win_length": Key(int, 1024),
            "hop_length": Key(int, 160),
            "n_mels": Key(int, 64),
            "fmin": Key(float, 60.0),
            "fmax": Key(float, 7800.0),
            "top_db": Key(float, 80.0),
            "mel_scale": Key(str, "slaney", choices=("slaney", "htk"),
                             doc='"slaney": librosa\'s Slaney mel with area normalisation and zero padding '
                                 '(distillkit\'s default); "htk": ATST\'s front end, torchaudio MelSpectrogram + '
                                 "AmplitudeToDB (HTK mel, no normalisation, reflect padding; docs/audio.md)"),
            "backend": Key(str, "librosa", choices=("librosa", "torch"),
                           doc="librosa (reference) or torch (batched across files; CPU or CUDA)"),
            "device": Key(str, "auto", choices=DEVICES,
                          doc='torch backend: "auto" (a GPU worker, else CUDA where the shard is built, else CPU)'),
            "batch": Key(int, 32, doc="segments per torch batch"),
        },
    },
    "output": {
        "files_per_shard": Key(int, 16, doc="audio files per shard task (a shard holds all their segments)"),
    },
}

META_KEYS = ("source", "start_s", "duration_s", "sample_rate", "n_fft", "win_length", "hop_length", "n_mels",
             "fmin", "fmax")


def logmel_config(m: Manifest) -> LogMelConfig:
    """The front-end settings of a manifest.

    Args:
        m: a validated audio manifest.
    """
    lm = m.data["stages"]["logmel"]
    return LogMelConfig(sample_rate=m.get("stages.audio.sample_rate"), n_fft=lm["n_fft"],
                        win_length=lm["win_length"], hop_length=lm["hop_length"], n_mels=lm["n_mels"],
                        fmin=lm["fmin"], fmax=lm["fmax"], top_db=lm["top_db"], mel_scale=lm["mel_scale"])


@dataclass
class Segment:
    """One segment before its spectrogram: key, source, padded waveform and the fields but log-mel."""

    key: str
    source: str
    wave: np.ndarray
    fields: dict[str, bytes]


class AudioPipeline(Pipeline):
    name = "audio"
    units = ("segments", "files")
    stat_units = {  # stats names them (Pipeline.stat_units)
        "seconds": "seconds of audio",
        "labelled_segments": "segments with a label.txt",
        "padded_segments": "segments shorter than the segment length (padded)",
        "over_range_segments": "segments with samples beyond [-1, 1] (kept unscaled)",
        "event_segments": "segments with an events.json (source.events set)",
        "events:.*": "events of this label in segments (one cut by a segment boundary counts in each)",
        "logmel_mean": "dB (log-mel, over all bins of audio)",
        "logmel_std": "dB (log-mel, over all bins of audio)",
    }
    schema = SCHEMA
    source_key = "source.root"
    demo = Demo(synth="audio", manifest="demo-audio", size="demo")

    # ---- manifest and plan (client) ------------------------------------------------------
    def check_manifest(self, m: Manifest) -> None:
        check_output_outside(m, "source.root")
        try:
            logmel_config(m).check()
        except ValueError as exc:
            raise ManifestError(m.path, "stages.logmel", str(exc)) from None
        if m.get("stages.segments.segment_s") <= 0:
            raise ManifestError(m.path, "stages.segments.segment_s", "must be > 0")
        if m.get("stages.segments.min_tail_s") < 0:
            raise ManifestError(m.path, "stages.segments.min_tail_s", "must be >= 0 seconds")
        if m.get("output.files_per_shard") < 1:
            raise ManifestError(m.path, "output.files_per_shard", "must be >= 1")
        if m.get("stages.logmel.batch") < 1:
            raise ManifestError(m.path, "stages.logmel.batch", "must be >= 1")
        exts = m.get("source.extensions")
        if not exts or not all(isinstance(e, str) and e.startswith(".") for e in exts):
            raise ManifestError(m.path, "source.extensions", 'must be a non-empty list such as [".wav", ".flac"]')

    def plan(self, m: Manifest) -> tuple[list[SampleRef], list[dict[str, str]]]:
        root = Path(m.get("source.root"))
        labels: dict[str, tuple[str, str | None]] = {}
        csv_path = root / m.get("source.labels") if m.get("source.labels") else None
        if csv_path is not None and csv_path.is_file():
            try:
                labels = read_label_rows(csv_path)
            except ValueError as exc:
                raise ManifestError(m.path, "source.labels", str(exc)) from None
        try:
            listing = list_inputs(root, tuple(m.get("source.extensions")))
        except OSError as exc:  # the root itself: a file, or no permission to list it
            why = printable(f"cannot list {root}: {exc.strerror or exc}")
            raise ManifestError(m.path, "source.root", why) from None
        events = self._events(m, root, [f.rel for f in listing.files])
        refs, rejected, seen = [], [u.rejection() for u in listing.unusable], {}
        for f in listing.files:
            key = shard_key(f.rel)  # set1/clip_000.wav -> set1_clip_000_wav (sensors.listing)
            if key in seen:  # e.g. "a b.wav" and "a_b.wav": keys must be unique
                rejected.append({"source": f.shown, "stage": "plan",
                                 "reason": f"{printable(f.path)}: shard key {key!r} collides with {seen[key]}"})
                continue
            seen[key] = f.shown
            label, group = labels.get(f.rel, (None, None))
            # the payload's path keeps the name's bytes (PEP 383) to open it; the source is printable (index.json)
            # "events" only with source.events set: a plan without it (its fingerprint, its shards) is unchanged
            refs.append(SampleRef(key, f.shown, {"files": [f.path], "label": label}
                                  | ({"group": group} if group else {})
                                  | ({"events": events.get(f.rel, [])} if events is not None else {})))
        if labels and refs and not any(r.payload["label"] is not None for r in refs):
            # paths relative to another folder: every file would go unlabelled, found only at evaluation
            raise ManifestError(m.path, "source.labels", f"{csv_path}: none of its {len(labels)} paths (e.g. "
                                f"{next(iter(labels))!r}) names one of the {len(refs)} audio files under {root} "
                                f"(e.g. {refs[0].source!r}); paths must be relative to source.root")
        return refs, rejected

    @staticmethod
    def _events(m: Manifest, root: Path, files: list[str]) -> dict[str, list[list[Any]]] | None:
        """``rel -> [[onset, offset, label], ...]`` from ``source.events`` (lists: the payload is JSON for the
        plan's fingerprint, so an edited TSV rebuilds the shards it changes); None when the key is unset."""
        if not m.get("source.events"):
            return None
        path = root / m.get("source.events")  # an absolute path stays itself
        if not path.is_file():
            raise ManifestError(m.path, "source.events", f"{path}: no such file (a path relative to source.root "
                                                         "when relative)")
        try:
            rows = read_events(path, known=set(files))
        except EventsError as exc:
            raise ManifestError(m.path, "source.events", str(exc)) from None
        return {rel: [list(e) for e in evs] for rel, evs in rows.items()}

    def refs_per_shard(self, m: Manifest) -> int:
        return m.get("output.files_per_shard")

    # ---- build (worker) --------------------------------------------------------------------
    def segments(self, ref: SampleRef, m: Manifest) -> Iterator[Segment | Rejection]:
        """One file's segments (waveform and every field but the log-mel), and its dropped tail.

        Args:
            ref: the file's ref.
            m: the manifest.
        """
        cfg = logmel_config(m)
        rate = cfg.sample_rate
        path = ref.payload["files"][0]
        shown = printable(path)  # for messages: index.json holds printable text (sensors.listing)
        try:
            audio = read_audio(path, rate)
        except AudioReadError as exc:
            raise Rejected("read", str(exc)) from None
        seg_len = int(round(m.get("stages.segments.segment_s") * rate))
        last = m.get("stages.segments.last")
        min_tail_s = m.get("stages.segments.min_tail_s")
        bounds = segment_bounds(len(audio.samples), seg_len, last, int(round(min_tail_s * rate)))
        if not bounds:
            why = (f"stages.segments.last = \"{last}\"" if last == "drop" else
                   f"less than stages.segments.min_tail_s = {min_tail_s:g} s")
            raise Rejected("segment", f"{shown}: {audio.duration_s:.3f} s is shorter than one "
                                      f"{seg_len / rate:g} s segment ({why})")
        store = m.get("stages.audio.store_waveform")
        label = ref.payload.get("label")
        for i, (start, end) in enumerate(bounds):
            wave = cut_segment(audio.samples, start, end)
            n_valid = min(end, len(audio.samples)) - start
            # float files scaled like integer PCM (peaks in the thousands) pass through unscaled: say so
            peak = float(np.abs(wave[:n_valid]).max(initial=0.0))
            meta = {"source": ref.source, "start_s": start / rate, "duration_s": n_valid / rate, "peak": round(peak, 6),
                    "sample_rate": rate, **cfg.meta(), "segment": i, "segment_s": seg_len / rate,
                    "source_sample_rate": audio.source_rate, "source_channels": audio.source_channels,
                    "decoder": audio.decoder} | ({"group": ref.payload["group"]} if "group" in ref.payload else {})
            fields = {"meta.json": json_bytes(meta)}
            if store:
                fields["audio.flac"] = flac_bytes(wave[:n_valid], rate)
            if label is not None:
                fields["label.txt"] = str(label).encode("utf-8")
            if "events" in ref.payload:  # clipped to the audio the segment holds, not its padding
                fields["events.json"] = json_bytes(clip_events(ref.payload["events"], start / rate, n_valid / rate))
            yield Segment(f"{ref.key}_{i:04d}", f"{ref.source}@{start / rate:g}s", wave, fields)
        tail_start = len(bounds) * seg_len
        if tail_start < len(audio.samples):  # a tail "pad" kept would put tail_start past the end
            why = ("stages.segments.last = \"drop\"" if last == "drop" else
                   f"shorter than stages.segments.min_tail_s = {min_tail_s:g} s")
            yield Rejection(f"{ref.source}@{tail_start / rate:g}s", "segment",
                            f"{shown}: final partial segment of {(len(audio.samples) - tail_start) / rate:.3f} s "
                            f"dropped ({why})")

    def samples(self, ref: SampleRef, m: Manifest) -> Iterable[Built]:
        cfg = logmel_config(m)
        lm = m.data["stages"]["logmel"]
        for seg in self.segments(ref, m):
            if isinstance(seg, Rejection):
                yield seg
                continue
            device = resolve_device(lm["device"]) if lm["backend"] == "torch" else "cpu"
            spec = logmel(seg.wave[None], cfg, lm["backend"], device)[0]
            yield _finish(seg, spec)

    def torch_stages(self, m: Manifest) -> dict[str, str]:
        lm = m.data["stages"]["logmel"]
        return {"logmel": lm["device"]} if lm["backend"] == "torch" else {}

    def logmel_batch(self, waves: np.ndarray, cfg: LogMelConfig, device: str) -> np.ndarray:
        """The torch log-mel stage (``pipelines.placement``): (B, S) waves -> (B, n_mels, T) float32."""
        return logmel(waves, cfg, "torch", device)

    def build_refs(self, refs: list[SampleRef], m: Manifest, raise_errors: bool = False) -> Iterator[Built]:
        lm = m.data["stages"]["logmel"]
        if lm["backend"] != "torch":
            yield from super().build_refs(refs, m, raise_errors)
            return
        # The torch path earns its keep on batches: segments of several files go through one STFT.
        cfg = logmel_config(m)
        pending: list[Segment | Rejection] = []

        def flush() -> Iterator[Built]:
            segs = [s for s in pending if isinstance(s, Segment)]
            specs = run_stage(m, "logmel", "logmel_batch", np.stack([s.wave for s in segs]), cfg,
                              device=lm["device"]) if segs else []
            it = iter(specs)
            for item in pending:
                yield _finish(item, next(it)) if isinstance(item, Segment) else item
            pending.clear()

        for ref in refs:
            for item in guarded(ref, lambda ref=ref: self.segments(ref, m), raise_errors):
                pending.append(item)
                if sum(isinstance(x, Segment) for x in pending) >= lm["batch"]:
                    yield from flush()
        yield from flush()

    # ---- schema, statistics, picture -------------------------------------------------------
    def fields(self, sample: SampleView) -> dict[str, FieldSpec]:
        return {
            "logmel.npy": FieldSpec("float16 (n_mels, T) log-mel power in dB (ref 1.0, top_db 80)",
                                    check=_check_logmel),
            "meta.json": FieldSpec("source, start_s, duration_s, sample_rate and the front-end settings",
                                   check=_check_meta),
            "audio.flac": FieldSpec("resampled mono segment, 16-bit FLAC", required=False, check=_check_flac),
            "label.txt": FieldSpec("class name from labels.csv (UTF-8)", required=False, check=_check_label),
            "events.json": FieldSpec("sound events of source.events in the segment: [{onset, offset, event_label}], "
                                     "seconds from the segment start, clipped to it, sorted (docs/audio.md)",
                                     required=False, check=_check_events),
        }

    def sample_stats(self, sample: SampleView) -> dict[str, float]:
        spec = sample["logmel.npy"]
        meta = sample["meta.json"]
        n = valid_frames(int(round(meta["duration_s"] * meta["sample_rate"])), _cfg_of(meta))
        x = spec[:, :n].astype(np.float64)
        return {"samples": 1.0, "seconds": float(meta["duration_s"]),
                "padded": float(meta["duration_s"] < meta.get("segment_s", meta["duration_s"])),
                "labelled": float("label.txt" in sample), "bins": float(x.size), "db_sum": float(x.sum()),
                "db_sqsum": float((x**2).sum()), "over_range": float(meta.get("peak", 0.0) > 1.0),
                **_event_counts(sample)}

    def finalize_stats(self, totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("bins", 0.0)
        if not n:
            return {}
        mean = totals["db_sum"] / n
        return {"samples": totals["samples"], "seconds": totals["seconds"], "padded_segments": totals["padded"],
                "labelled_segments": totals["labelled"], "over_range_segments": totals.get("over_range", 0.0),
                "logmel_mean": mean,
                "logmel_std": float(np.sqrt(max(totals["db_sqsum"] / n - mean**2, 0.0)))} | {
                    k: v for k, v in totals.items() if k == "event_segments" or k.startswith("events:")}

    def render(self, sample: SampleView) -> Any:
        from distillkit.pipelines.render_audio import render_audio

        return render_audio(sample)

    def show_preference(self) -> tuple[Any, float]:
        """A segment that is mostly signal (``render_audio.signal_fraction``): the first segment of the demo
        data is often a short file padded to the segment length, three quarters zero in the picture."""
        from distillkit.pipelines.render_audio import MOSTLY_SIGNAL, signal_fraction

        return signal_fraction, MOSTLY_SIGNAL


def _finish(seg: Segment, spec: np.ndarray) -> Sample:
    return Sample(seg.key, {**seg.fields, "logmel.npy": npy_bytes(spec.astype(np.float16))}, seg.source)


def _cfg_of(meta: dict[str, Any]) -> LogMelConfig:
    return LogMelConfig(sample_rate=meta["sample_rate"], n_fft=meta["n_fft"], win_length=meta["win_length"],
                        hop_length=meta["hop_length"], n_mels=meta["n_mels"], fmin=meta["fmin"], fmax=meta["fmax"],
                        mel_scale=meta.get("mel_scale", "slaney"))


def _check_meta(meta: Any, sample: SampleView) -> None:
    if not isinstance(meta, dict):
        raise ValueError("expected an object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"missing {missing}")
    if not 0 < meta["duration_s"] <= meta.get("segment_s", meta["duration_s"]) + 1e-9:
        raise ValueError(f"duration_s {meta['duration_s']} outside (0, segment_s]")


def _check_logmel(spec: np.ndarray, sample: SampleView) -> None:
    from distillkit.pipelines.schema import expect_array

    expect_array(spec, "float16", 2)
    meta = sample["meta.json"]
    if spec.shape[0] != meta["n_mels"]:
        raise ValueError(f"{spec.shape[0]} mel bands, meta.json says {meta['n_mels']}")
    if "segment_s" in meta:
        frames = _cfg_of(meta).frames(int(round(meta["segment_s"] * meta["sample_rate"])))
        if spec.shape[1] != frames:
            raise ValueError(f"{spec.shape[1]} frames, a {meta['segment_s']} s segment has {frames}")
    if not np.isfinite(spec).all():
        raise ValueError("non-finite values")


def _check_flac(data: bytes, sample: SampleView) -> None:
    if not data.startswith(b"fLaC"):
        raise ValueError("not a FLAC stream")


def _event_counts(sample: SampleView) -> dict[str, float]:
    """``event_segments`` and ``events:<label>`` (events per label, an event cut by a segment boundary counted in
    each segment) of a segment with ``events.json``; nothing without it, so statistics of a build without
    ``source.events`` are unchanged."""
    if "events.json" not in sample:
        return {}
    counts: dict[str, float] = {"event_segments": 1.0}
    for e in sample["events.json"]:
        counts[f"events:{e['event_label']}"] = counts.get(f"events:{e['event_label']}", 0.0) + 1.0
    return counts


def _check_events(events: Any, sample: SampleView) -> None:
    check_segment_events(events, sample["meta.json"]["duration_s"])


def _check_label(data: bytes, sample: SampleView) -> None:
    if not data.decode("utf-8").strip():
        raise ValueError("empty label")
