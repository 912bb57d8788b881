"""Audio files: find them under a root, read their labels, decode, mix down and resample.

Decisions (docs/audio.md):

- **Decoding** goes through soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, MP3 with libsndfile >= 1.1),
  which reads every sample exactly and fast; what libsndfile cannot open falls back to
  ``librosa.load(sr=None, mono=False)`` (audioread/ffmpeg where installed). Samples come out as
  float32 in [-1, 1] for integer formats; float formats are passed through unchanged.
- **Mix-down** is the mean of the channels (librosa's ``to_mono``), so a 6-channel file keeps its level;
  soundfile's output is mixed a block at a time, so a long multichannel file is never held whole.
- **Resampling** is soxr at quality "HQ", exactly librosa's default ``res_type="soxr_hq"``: one
  band-limited, high-quality resampler for every rate (8 kHz is upsampled: the band above 4 kHz
  stays empty, and that is recorded, not invented). All of it in float32.
- **Bad input** raises ``AudioReadError`` with a one-line reason naming the file: empty file,
  undecodable header or content, no samples, non-finite (NaN/inf) samples. Silence is valid audio.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillkit.messages import one_line
from distillkit.sensors.listing import list_inputs, printable

AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".ogg", ".mp3")
RESAMPLE_QUALITY = "HQ"  # soxr quality of librosa's default res_type "soxr_hq"


class AudioReadError(ValueError):
    """A file that cannot be used as audio; the message names the file and the reason."""

    def __init__(self, message: str) -> None:
        # a name that is not valid UTF-8 is shown with \xNN escapes: the reason is written to index.json
        super().__init__(printable(message))


@dataclass(frozen=True)
class Audio:
    """A decoded, mixed-down, resampled recording.

    Attributes:
        samples: (N,) float32 mono waveform at ``sample_rate``.
        sample_rate: rate of ``samples`` in Hz (the target rate).
        source_rate: the file's own rate in Hz.
        source_channels: the file's channel count before the mix-down.
        decoder: ``"soundfile"`` or ``"librosa"`` (the fallback).
    """

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int
    decoder: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def list_audio(root: Path | str, extensions: tuple[str, ...] | list[str] = AUDIO_EXTENSIONS) -> list[str]:
    """Every readable audio file under ``root`` (recursively), as POSIX paths relative to it, sorted: the files of
    ``sensors.listing.list_inputs`` (for the benchmarks in ``bench/``; the audio pipeline's plan calls
    ``list_inputs`` itself and lists its ``unusable`` entries as rejected).

    Args:
        root: the source folder.
        extensions: file name endings that count as audio (case-insensitive, with the dot).
    """
    return [f.rel for f in list_inputs(root, extensions).files]


def read_labels(path: Path | str) -> dict[str, str]:
    """``path,label`` rows of a labels CSV (header required; paths relative to the source root).

    Args:
        path: the CSV file (UTF-8, with or without a byte-order mark as spreadsheets write it).

    Raises:
        ValueError: no ``path`` and ``label`` columns, an empty label, or a path listed twice
            with different labels (the message names the file and the line).
    """
    return {rel: label for rel, (label, _) in read_label_rows(path).items()}


def read_label_rows(path: Path | str) -> dict[str, tuple[str, str | None]]:
    """``path -> (label, group)`` of a labels CSV; ``group`` is the optional column that ties files cut from one
    recording together (ESC-50's clip id, VoxCeleb's video), so the evaluation never splits them; None without it.

    Args:
        path: the CSV file.

    Raises:
        ValueError: as :func:`read_labels`.
    """
    path = Path(path)
    labels: dict[str, str] = {}
    groups: dict[str, str | None] = {}
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: needs a header with 'path' and 'label' columns, got {reader.fieldnames}")
        for row in reader:
            rel = Path(row["path"].strip()).as_posix()
            label = (row["label"] or "").strip()
            if not label:
                raise ValueError(f"{path}:{reader.line_num}: empty label for {rel}")
            if labels.get(rel, label) != label:
                raise ValueError(f"{path}:{reader.line_num}: {rel} listed with labels {labels[rel]!r} and {label!r}")
            labels[rel] = label
            groups[rel] = (row.get("group") or "").strip() or None
    return {rel: (labels[rel], groups[rel]) for rel in labels}


BLOCK_FRAMES = 1 << 16
"""Frames soundfile decodes at a time: a long multichannel file is never held whole, only its mono mix."""


def _mix_down(block: np.ndarray) -> np.ndarray:
    """``(b, C)`` -> ``(b,)`` float32: the channels summed in order and divided by C, the arithmetic of
    ``np.mean(x, axis=0, dtype=np.float32)`` on ``(C, N)`` (librosa's ``to_mono``), so a file mixed
    a block at a time is bit-equal to one mixed whole."""
    acc = block[:, 0].astype(np.float32, copy=True)
    for c in range(1, block.shape[1]):
        acc += block[:, c]
    if block.shape[1] > 1:
        acc /= block.shape[1]
    return acc


def _read_soundfile(path: Path) -> tuple[np.ndarray, int, int, int]:
    """Decode with soundfile and mix down a block at a time: (mono float32, rate, channels, non-finite count).

    Memory is the mono mix plus one block; decoding the file whole and transposing it held twice the
    decoded (channels x frames) array, 2 GB for an hour of 48 kHz stereo."""
    import soundfile as sf

    # bytes: soundfile encodes a str path as strict UTF-8, which fails for a name that is not (sensors.listing)
    with sf.SoundFile(os.fsencode(path)) as f:
        rate, channels, frames = int(f.samplerate), int(f.channels), max(int(f.frames), 0)
        out = np.empty(frames, np.float32)  # a corrupt header's billions of frames fail here: MemoryError
        pos, bad, extra = 0, 0, []
        while True:
            block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                break
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
            mono = _mix_down(block)
            n = min(len(mono), frames - pos)
            out[pos : pos + n] = mono[:n]
            pos += n
            if n < len(mono):  # more frames than the header said
                extra.append(mono[n:])
    if extra:
        out = np.concatenate([out, *extra])
    elif pos < frames:  # fewer (a truncated file): keep what was read
        out = out[:pos].copy()
    return out, rate, channels, bad


def _read_librosa(path: Path, first_reason: str) -> tuple[np.ndarray, int]:
    """Formats libsndfile lacks (e.g. MP3 before 1.1, AAC in an .mp3 misnomer): audioread/ffmpeg,
    ``(C, N)`` float32 at the file's rate."""
    import warnings

    import librosa

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns about the fallback itself; the reason is ours
            # a str path: librosa tries audioread only for str and Path (a name that is not valid UTF-8 gets no
            # further than soundfile here: such a file must be one libsndfile reads)
            data, rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise AudioReadError(f"{path}: not decodable audio (soundfile: {first_reason}; "
                             f"librosa: {type(exc).__name__}{': ' + reason if reason else ''})") from None
    return np.atleast_2d(np.asarray(data, dtype=np.float32)), int(rate)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Mean over channels: ``(C, N)`` -> ``(N,)`` float32 (librosa's ``to_mono``).

    Args:
        samples: (C, N) or (N,) waveform.
    """
    x = np.asarray(samples, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=0, dtype=np.float32)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling with soxr "HQ" (= ``librosa.resample(res_type="soxr_hq")``), float32.

    Args:
        samples: (N,) float32 waveform.
        source_rate: its rate in Hz.
        target_rate: the wanted rate in Hz.
    """
    x = np.ascontiguousarray(samples, dtype=np.float32)
    if source_rate == target_rate:
        return x
    import soxr

    return np.ascontiguousarray(soxr.resample(x, source_rate, target_rate, quality=RESAMPLE_QUALITY),
                                dtype=np.float32)


def read_audio(path: Path | str, target_rate: int = 16000) -> Audio:
    """Decode, check, mix down to mono and resample one file.

    Args:
        path: the audio file.
        target_rate: output rate in Hz.

    Raises:
        AudioReadError: empty or undecodable file, no samples, or NaN/inf samples (a decoder
            would carry them into every spectrogram frame they touch; no repair is guessed).
    """
    import soundfile as sf

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AudioReadError(f"{path}: cannot stat ({exc.strerror or exc})") from None
    if size == 0:
        raise AudioReadError(f"{path}: empty file (0 bytes)")
    try:
        mono, rate, channels, bad = _read_soundfile(path)
        decoder = "soundfile"
    except MemoryError:  # a corrupt header claiming billions of frames
        raise AudioReadError(f"{path}: header claims more audio than memory holds (corrupt?)") from None
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as first:
        reason = one_line(first)
        data, rate = _read_librosa(path, reason.split("': ", 1)[-1])  # libsndfile repeats the path
        channels, decoder = int(data.shape[0]), "librosa"
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        mono = to_mono(data)
        del data
    if len(mono) == 0:
        raise AudioReadError(f"{path}: no audio samples ({channels} channel(s), {rate} Hz)")
    if rate <= 0:
        raise AudioReadError(f"{path}: invalid sample rate {rate}")
    if bad:
        raise AudioReadError(f"{path}: {bad} non-finite (NaN/inf) sample(s)")
    n_source = len(mono)
    mono = resample(mono, rate, target_rate)
    if len(mono) == 0:  # a handful of samples at a higher rate resamples to nothing
        raise AudioReadError(f"{path}: no samples left after resampling {n_source} sample(s) from {rate} "
                             f"to {target_rate} Hz")
    return Audio(mono, int(target_rate), rate, channels, decoder)


def flac_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC of a mono float32 waveform (clipped to [-1, 1]), for the optional ``audio.flac``.

    Args:
        samples: (N,) float32 waveform.
        sample_rate: its rate in Hz.
    """
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()
