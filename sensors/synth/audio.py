"""``distillkit synth audio OUT``: a folder tree of labelled sound files in native formats.

:func:`make_audio` writes::

    OUT/set1/clip_NNN.{wav,flac}           files of five sound classes, nested folders, mixed formats
    OUT/set2/part_K/clip_NNN.{wav,flac}
    OUT/labels.csv                         path,label (path relative to OUT)

Each file draws its class and its parameters at random: sample rate (16, 22.05, 44.1 or 48 kHz),
mono or stereo (the second channel a scaled, slightly delayed copy plus its own noise, never an
inverted one, so the mix-down keeps the sound), WAV (16-bit or float) or FLAC (16 or 24-bit), a
length from well under to well over a 10 s segment, a gain, and background noise at 10-30 dB SNR.
The classes differ in spectro-temporal structure (what a log-mel front end and a patch encoder
should tell apart), not in level:

- ``harmonic``: a harmonic tone (f0 110-520 Hz, 3-8 partials with random roll-off) with vibrato
  (4-7 Hz, 0.5-3 %) under slow note onsets;
- ``chirp``: repeated sweeps, up or down, linear or exponential, 0.3-1.2 s each, 250-6000 Hz;
- ``noise_burst``: coloured-noise bursts (spectral slope from blue to brown) of 80-400 ms with gaps;
- ``clicks``: click trains (4-30 clicks/s) of short decaying resonances (1-5 kHz);
- ``am_tone``: a steady carrier (300-3000 Hz) amplitude-modulated at 2-14 Hz, depth 0.5-1.

:func:`write_bad_audio` writes the inputs the bad-input tests use (empty file, corrupt header, text
under an audio extension, silence, NaN samples, 1-channel 8 kHz, 6-channel 96 kHz). Everything derives
from ``seed``; the same seed gives byte-identical files. "small" (20 files, about 2.5 min of audio) takes
a second or two; "medium" (80 files) a few seconds; "demo" (150 files of exactly 10 s, 25 min of audio,
``distillkit demo``'s data) about ten.

Size "events" writes recordings with annotated sound events instead (:func:`make_event_audio`)::

    OUT/set{1,2}/rec_NNN.wav               16 kHz mono, events of EVENT_CLASSES over faint noise
    OUT/events.tsv                         filename, onset, offset, event_label (DESED; sensors/events.py)

Six recordings of 5 s (30 s in all), onsets and offsets on the 10 ms grid of a 160-sample hop at 16 kHz,
events of one or several classes, some overlapping; the last recording has no event (no row in the TSV).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CLASSES: tuple[str, ...] = ("harmonic", "chirp", "noise_burst", "clicks", "am_tone")
RATES: tuple[int, ...] = (16000, 22050, 44100, 48000)
SIZES: dict[str, tuple[int, float, float]] = {  # files per class, shortest and longest file in seconds
    "small": (4, 2.5, 13.0),
    "medium": (16, 2.5, 16.0),
    # The demo's (pipelines/audio.py): every file exactly one 10 s segment of the demo manifest, so no
    # segment is a zero-padded tail (a 0.5 s tail kept by `last = "pad"` is one sound repeated over a whole
    # training crop and a whole probe example), and every segment is its own file, so the probe's split by
    # file puts independent segments on the test side (75 with the demo probe's half of the files).
    "demo": (30, 10.0, 10.0),
    # make_event_audio's: (recordings, shortest, longest); every recording holds events of several classes
    "events": (6, 5.0, 5.0),
}
EVENT_CLASSES: tuple[str, ...] = ("tone_low", "tone_high", "noise_burst", "chirp_up")
EVENT_RATE = 16000
EVENT_GRID_S = 0.01  # a 160-sample log-mel hop at 16 kHz: the frame-level evaluation's grid


def _envelope(n: int, rate: int, rng: np.random.Generator, attack_s: float = 0.01) -> np.ndarray:
    a = max(1, int(attack_s * rate))
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[-a:] = np.minimum(env[-a:], np.linspace(1, 0, a))
    return env


def harmonic(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Harmonic tone with vibrato and note onsets every 0.4-1.5 s (float64, peak ~1)."""
    t = np.arange(n) / rate
    f0 = rng.uniform(110, 520)
    vib = 1 + rng.uniform(0.005, 0.03) * np.sin(2 * np.pi * rng.uniform(4, 7) * t + rng.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(f0 * vib) / rate
    rolloff = rng.uniform(0.5, 1.5)
    y = np.zeros(n)
    for k in range(1, int(rng.integers(3, 9)) + 1):
        if k * f0 * 1.03 < rate / 2:
            y += np.sin(k * phase + rng.uniform(0, 6.3)) / k**rolloff
    note = rng.uniform(0.4, 1.5)
    y *= 0.6 + 0.4 * np.exp(-((t % note) / (note * rng.uniform(0.2, 0.6))))
    return y / (np.abs(y).max() + 1e-9)


def chirp(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Repeated frequency sweeps with short gaps."""
    period = rng.uniform(0.3, 1.2)
    lo, hi = rng.uniform(250, 900), rng.uniform(2500, min(6000, rate / 2 * 0.9))
    up, expo = rng.random() < 0.5, rng.random() < 0.5
    tt = (np.arange(n) / rate) % period
    frac = np.clip(tt / (0.85 * period), 0, 1)
    frac = frac if up else 1 - frac
    f = lo * (hi / lo) ** frac if expo else lo + (hi - lo) * frac
    y = np.sin(2 * np.pi * np.cumsum(f) / rate)
    return y * (tt < 0.85 * period) * np.minimum(1, np.minimum(tt, 0.85 * period - tt) / 0.01 + 0.0)


def noise_burst(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Coloured-noise bursts: white noise shaped to a 1/f^beta power spectrum, gated."""
    beta = rng.uniform(-1.0, 2.0)  # -1 blue, 0 white, 1 pink, 2 brown
    spec = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spec *= 1 / np.maximum(f, 20.0) ** (beta / 2)
    y = np.fft.irfft(spec, n)
    y /= np.abs(y).max() + 1e-9
    gate = np.zeros(n)
    pos = int(rng.uniform(0, 0.2) * rate)
    while pos < n:
        length = int(rng.uniform(0.08, 0.4) * rate)
        gate[pos:pos + length] = np.hanning(length)[: len(gate[pos:pos + length])] if length > 1 else 1.0
        pos += length + int(rng.uniform(0.05, 0.5) * rate)
    return y * gate


def clicks(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A click train: decaying resonances at a jittered rate."""
    per_s = rng.uniform(4, 30)
    freq, decay = rng.uniform(1000, min(5000, rate / 2 * 0.8)), rng.uniform(0.002, 0.01)
    m = int(6 * decay * rate)
    kernel = np.sin(2 * np.pi * freq * np.arange(m) / rate) * np.exp(-np.arange(m) / (decay * rate))
    impulses = np.zeros(n)
    pos = rng.uniform(0, 1 / per_s)
    while pos * rate < n:
        impulses[int(pos * rate)] = rng.uniform(0.6, 1.0)
        pos += (1 / per_s) * rng.uniform(0.85, 1.15)
    y = np.convolve(impulses, kernel)[:n]
    return y / (np.abs(y).max() + 1e-9)


def am_tone(n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A steady carrier, amplitude-modulated."""
    t = np.arange(n) / rate
    carrier = np.sin(2 * np.pi * rng.uniform(300, 3000) * t + rng.uniform(0, 6.3))
    depth = rng.uniform(0.5, 1.0)
    mod = 1 - depth * 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(2, 14) * t + rng.uniform(0, 6.3)))
    return carrier * mod


GENERATORS = {"harmonic": harmonic, "chirp": chirp, "noise_burst": noise_burst, "clicks": clicks, "am_tone": am_tone}


def render_clip(label: str, seconds: float, rate: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``label``: (N, channels) float64 in [-1, 1].

    Args:
        label: a name of ``CLASSES``.
        seconds: duration.
        rate: sample rate in Hz.
        channels: 1 or 2.
        rng: the generator every random choice comes from.
    """
    n = int(round(seconds * rate))
    y = GENERATORS[label](n, rate, rng) * _envelope(n, rate, rng)
    snr_db = rng.uniform(10, 30)
    noise_rms = np.sqrt(np.mean(y**2) + 1e-12) / 10 ** (snr_db / 20)
    gain = rng.uniform(0.1, 0.8)
    chans = []
    for c in range(channels):
        delay = int(rng.integers(0, int(0.002 * rate) + 1)) if c else 0
        yc = np.concatenate([np.zeros(delay), y[: n - delay]]) * (rng.uniform(0.6, 1.0) if c else 1.0)
        chans.append(yc + rng.normal(0, noise_rms, n))
    out = np.stack(chans, axis=1)
    return np.clip(out / (np.abs(out).max() + 1e-9) * gain, -1, 1)


def _write(path: Path, data: np.ndarray, rate: int, rng: np.random.Generator) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".wav":
        subtype = "PCM_16" if rng.random() < 0.7 else "FLOAT"
        sf.write(str(path), data.astype(np.float32), rate, format="WAV", subtype=subtype)
    else:
        sf.write(str(path), data.astype(np.float32), rate, format="FLAC",
                 subtype="PCM_16" if rng.random() < 0.5 else "PCM_24")


def make_audio(out: Path, seed: int = 0, size: str = "small") -> Path:
    """Write the labelled synthetic tree (see the module docstring) under ``out``; returns ``out``.

    Args:
        out: output folder (created).
        seed: every random choice derives from it.
        size: ``"small"`` (4 files per class), ``"medium"`` (16 per class), ``"demo"`` (30 per class, each
            exactly 10 s long) or ``"events"`` (:func:`make_event_audio`).

    Raises:
        ValueError: unknown ``size``.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} ({' | '.join(SIZES)})")
    if size == "events":
        return make_event_audio(out, seed)
    per_class, shortest, longest = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [c for c in CLASSES for _ in range(per_class)]
    order = rng.permutation(len(labels))  # classes interleaved over folders and file numbers
    rows = []
    for i, j in enumerate(order):
        label = labels[j]
        folder = "set1" if i % 2 == 0 else f"set2/part_{i % 3}"
        ext = ".flac" if rng.random() < 0.5 else ".wav"
        rel = f"{folder}/clip_{i:03d}{ext}"
        rate = int(rng.choice(RATES))
        channels = 1 if rng.random() < 0.6 else 2
        seconds = float(rng.uniform(shortest, longest))
        _write(out / rel, render_clip(label, seconds, rate, channels, rng), rate, rng)
        rows.append((rel, label))
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "label"])
        w.writerows(sorted(rows))
    return out


def event_signal(label: str, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """One event of class ``label`` (a name of ``EVENT_CLASSES``), ``n`` samples, peak ~0.5, with 5 ms ramps so
    that its energy starts and ends at the annotated times (no click spreading over the neighbouring frames).

    The classes are told apart by their spectra, each in its own band of a 64-band log-mel: a steady tone low
    (300-500 Hz) or high (2-3 kHz), a noise burst, and an up-sweep spanning 600 Hz-5 kHz over the event.

    Args:
        label: the class.
        n: length in samples.
        rate: sample rate in Hz.
        rng: the generator of the event's parameters.
    """
    t = np.arange(n) / rate
    if label == "tone_low":
        y = np.sin(2 * np.pi * rng.uniform(300, 500) * t)
    elif label == "tone_high":
        y = np.sin(2 * np.pi * rng.uniform(2000, 3000) * t)
    elif label == "noise_burst":
        y = rng.normal(size=n)
        y /= np.abs(y).max() + 1e-9
    elif label == "chirp_up":
        f = 600 * (5000 / 600) ** (t / max(t[-1], 1e-9))
        y = np.sin(2 * np.pi * np.cumsum(f) / rate)
    else:
        raise ValueError(f"unknown event class {label!r} ({' | '.join(EVENT_CLASSES)})")
    ramp = min(int(0.005 * rate), n // 2)
    env = np.ones(n)
    if ramp:
        env[:ramp] = np.linspace(0, 1, ramp)
        env[n - ramp:] = np.linspace(1, 0, ramp)
    return 0.5 * y * env


def make_event_audio(out: Path, seed: int = 0) -> Path:
    """Write the recordings with known events and their ``events.tsv`` (the module docstring); returns ``out``.

    Each recording but the last draws 2-5 events of random classes (every class in at least two recordings),
    each 0.2-1.5 s long at a random onset, never overlapping one of its own class; onsets and offsets are
    multiples of ``EVENT_GRID_S``, so a frame-level evaluation on that hop has exact references. Events of
    different classes may overlap (DESED is polyphonic). The background is white noise 40 dB under an event,
    so silence is never digital zero.

    Args:
        out: output folder (created).
        seed: every random choice derives from it; the same seed gives byte-identical files.
    """
    import soundfile as sf

    n_rec, seconds, _ = SIZES["events"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rate, grid = EVENT_RATE, int(round(EVENT_GRID_S * EVENT_RATE))
    n = int(round(seconds * rate))
    rows: list[tuple[str, float, float, str]] = []
    for i in range(n_rec):
        rel = f"{'set1' if i % 2 == 0 else 'set2'}/rec_{i:03d}.wav"
        y = rng.normal(0, 0.005, n)
        if i < n_rec - 1:  # the last recording: no event, no row in the TSV
            # classes cycle over recordings so each occurs in several; the rest are drawn
            labels = [EVENT_CLASSES[i % len(EVENT_CLASSES)], EVENT_CLASSES[(i + 1) % len(EVENT_CLASSES)]]
            labels += list(rng.choice(EVENT_CLASSES, size=int(rng.integers(0, 4))))
            placed: list[tuple[int, int, str]] = []
            for label in map(str, labels):
                for _ in range(20):  # a few draws for a place; a class that finds none is left out
                    length = int(rng.integers(20, 151)) * grid  # 0.2-1.5 s
                    onset = int(rng.integers(0, (n - length) // grid + 1)) * grid
                    # one class never overlaps itself, nor follows itself within 0.1 s: DESED annotates such
                    # events as one, and an event-based metric could not tell which reference an output matches
                    if all(c != label or onset >= b + 10 * grid or onset + length + 10 * grid <= a
                           for a, b, c in placed):
                        break
                else:
                    continue
                placed.append((onset, onset + length, label))
                y[onset:onset + length] += event_signal(label, length, rate, rng)
                rows.append((rel, onset / rate, (onset + length) / rate, label))
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.clip(y, -1, 1).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    with (out / "events.tsv").open("w", newline="") as f:
        f.write("filename\tonset\toffset\tevent_label\n")
        for rel, onset, offset, label in sorted(rows):
            f.write(f"{rel}\t{onset:.2f}\t{offset:.2f}\t{label}\n")
    return out


# What the pipeline does with each bad input: "rejected" (listed in index.json with a reason naming
# the file) or "kept" (shards hold its segments).
BAD_INPUTS: dict[str, str] = {
    "bad/empty.wav": "rejected",
    "bad/corrupt_header.wav": "rejected",
    "bad/not_audio.flac": "rejected",
    "bad/nan_samples.wav": "rejected",
    "bad/silence.wav": "kept",
    "bad/mono_8k.wav": "kept",
    "bad/six_channel_96k.flac": "kept",
}


def write_bad_audio(out: Path, seed: int = 0) -> dict[str, str]:
    """Write the bad and unusual inputs of ``BAD_INPUTS`` under ``out``; returns ``BAD_INPUTS``.

    Args:
        out: the source root (files go to ``out/bad/``).
        seed: seeds the signal content.
    """
    import soundfile as sf

    out = Path(out)
    bad = out / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (bad / "empty.wav").write_bytes(b"")
    # A RIFF/WAVE preamble whose fmt chunk is garbage: libsndfile cannot parse the header.
    (bad / "corrupt_header.wav").write_bytes(b"RIFF\x24\x00\x01\x00WAVEfmt \x10\x00\x00\x00" + bytes(rng.integers(
        0, 256, 64, dtype=np.uint8)))
    (bad / "not_audio.flac").write_text("this is a text file, not FLAC\n" * 20)
    y = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 3) / 16000)
    y[1000:1010] = np.nan
    y[2000] = np.inf
    sf.write(str(bad / "nan_samples.wav"), y.astype(np.float32), 16000, subtype="FLOAT")
    sf.write(str(bad / "silence.wav"), np.zeros(16000 * 4, np.float32), 16000, subtype="PCM_16")
    sf.write(str(bad / "mono_8k.wav"), render_clip("harmonic", 3.0, 8000, 1, rng).astype(np.float32), 8000,
             subtype="PCM_16")
    six = np.concatenate([render_clip("am_tone", 2.0, 96000, 2, rng) for _ in range(3)], axis=1)
    sf.write(str(bad / "six_channel_96k.flac"), six.astype(np.float32), 96000, format="FLAC", subtype="PCM_24")
    return dict(BAD_INPUTS)
