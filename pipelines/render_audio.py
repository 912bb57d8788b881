"""What ``distillkit show`` draws for an audio sample: the log-mel spectrogram on time (s) and
frequency (Hz, mel-spaced) axes, the padded tail shaded, and the waveform above it when the
shard stores ``audio.flac``. ``signal_fraction`` is how ``show`` picks an audio sample worth looking at
(``pipelines.inspect``): a segment that is mostly zero padding or quiet says little about the data."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView

# A frame counts as signal when its loudest mel band is within this many dB of the segment's loudest value:
# the gaps of a gated noise burst sit 40-60 dB below its bursts, a steady tone stays within 20 dB.
SIGNAL_RANGE_DB = 40.0
# The power floor of the stored spectrogram (10 log10(amin), amin = 1e-10): a segment whose loudest value is
# at most a little above it is digital silence and holds no signal at all.
SILENCE_DB = -90.0
# ``show`` draws the first sample with at least this fraction of signal ("mostly signal").
MOSTLY_SIGNAL = 0.8


def signal_fraction(sample: SampleView) -> float:
    """The fraction of the segment's frames that hold signal: not zero padding past the end of the audio,
    and within ``SIGNAL_RANGE_DB`` of the segment's loudest value (0 for digital silence).

    Args:
        sample: a decoded audio sample (``logmel.npy``, ``meta.json``).
    """
    spec = np.asarray(sample["logmel.npy"], dtype=np.float32)
    meta = sample["meta.json"]
    if spec.size == 0:
        return 0.0
    loudest = float(spec.max())
    if loudest <= SILENCE_DB:
        return 0.0
    # Frames whose centre lies in the real audio, and in the whole segment (the pipeline's valid_frames):
    # the stored spectrogram has one more frame, centred on the segment's end, which sees half padding.
    def frames(seconds: float) -> int:
        return max(1, math.ceil(round(seconds * meta["sample_rate"]) / meta["hop_length"]))

    total = min(spec.shape[1], frames(meta.get("segment_s", meta["duration_s"])))
    peaks = spec[:, :min(frames(meta["duration_s"]), total)].max(axis=0)
    return float((peaks >= loudest - SIGNAL_RANGE_DB).sum() / total)


def render_audio(sample: SampleView) -> Any:
    """A matplotlib figure of one audio sample: waveform (when stored) above the log-mel spectrogram.

    Args:
        sample: a decoded audio sample (``logmel.npy``, ``meta.json``, optional ``audio.flac``,
            ``label.txt``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import librosa.display
    import matplotlib.pyplot as plt

    spec = np.asarray(sample["logmel.npy"], dtype=np.float32)
    meta = sample["meta.json"]
    wave = "audio.flac" in sample
    fig, axes = plt.subplots(2 if wave else 1, 1, figsize=(10, 6.0 if wave else 4.3), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 3]} if wave else None, sharex=wave,
                             layout="constrained")
    ax = axes[-1, 0]
    rate = meta["sample_rate"]
    img = librosa.display.specshow(spec, sr=rate, hop_length=meta["hop_length"], x_axis="s",
                                   y_axis="mel", fmin=meta["fmin"], fmax=meta["fmax"], ax=ax, cmap="magma")
    hop_ms = 1000.0 * meta["hop_length"] / rate
    what = (f"log-mel spectrogram: {meta['n_mels']} frequency bands on the mel (pitch-like) scale, "
            f"one column per {hop_ms:g} ms")
    ax.set_xlabel("time since segment start (s)")
    ax.set_ylabel("frequency (Hz, mel scale)")
    segment_s = meta.get("segment_s", meta["duration_s"])
    if meta["duration_s"] < segment_s:
        ax.axvspan(meta["duration_s"], segment_s, color="white", alpha=0.25, lw=0)
        what += (f"\ngrey from {meta['duration_s']:.2f} s: zero padding (the file ends before the "
                 f"{segment_s:g} s segment does)")
        if segment_s - meta["duration_s"] >= 0.15 * segment_s:  # a label only where it fits inside the band
            ax.text(meta["duration_s"], ax.get_ylim()[1] * 0.9, " padding", color="white", va="top", fontsize=8,
                    clip_on=True)
    ax.set_title(what, fontsize=9)
    fig.colorbar(img, ax=axes[:, 0].tolist(), format="%+.0f dB", pad=0.01, label="mel-band power (dB)")
    label = sample["label.txt"].decode("utf-8") if "label.txt" in sample else "none (unlabelled)"
    start = meta["start_s"]
    source = f"source {meta['source_sample_rate'] / 1000:g} kHz" if "source_sample_rate" in meta else "source"
    if "source_channels" in meta:
        source += f", {meta['source_channels']} channel{'s' if meta['source_channels'] != 1 else ''}"
    fig.suptitle(f"{meta['source']} from {start:.2f} to {start + meta['duration_s']:.2f} s, label: {label}\n"
                 f"one {segment_s:g} s training segment ({source}, resampled to {rate / 1000:g} kHz mono); "
                 f"signal in {signal_fraction(sample):.0%} of it (not padding, within {SIGNAL_RANGE_DB:g} dB "
                 "of its loudest moment)", fontsize=10)
    if wave:
        import soundfile as sf

        y, sr = sf.read(io.BytesIO(sample.raw["audio.flac"]), dtype="float32")
        top = axes[0, 0]
        top.plot(np.arange(len(y)) / sr, y, lw=0.4, color="tab:blue")
        top.set_ylabel("amplitude\n(1 = full scale)")
        top.set_title("waveform", fontsize=9)
        top.tick_params(labelbottom=True)
    return fig
