"""What ``distillkit show`` draws for an audio sample: the log-mel spectrogram on time (s) and
frequency (Hz, mel-spaced) axes, the padded tail shaded, and the waveform above it when the
shard stores ``audio.flac``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from distillkit.pipelines.codecs import SampleView


def render_audio(sample: SampleView) -> Any:
    """A matplotlib figure of one audio sample.

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
    fig, axes = plt.subplots(2 if wave else 1, 1, figsize=(9, 5.5 if wave else 3.8), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 3]} if wave else None, sharex=wave)
    ax = axes[-1, 0]
    img = librosa.display.specshow(spec, sr=meta["sample_rate"], hop_length=meta["hop_length"], x_axis="s",
                                   y_axis="mel", fmin=meta["fmin"], fmax=meta["fmax"], ax=ax, cmap="magma")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frequency (Hz)")
    if meta["duration_s"] < meta.get("segment_s", meta["duration_s"]):
        ax.axvspan(meta["duration_s"], meta["segment_s"], color="white", alpha=0.25, lw=0)
        ax.text(meta["duration_s"], ax.get_ylim()[1] * 0.9, " padding", color="white", va="top", fontsize=8)
    fig.colorbar(img, ax=axes[:, 0].tolist(), format="%+.0f dB", pad=0.01)
    label = sample["label.txt"].decode("utf-8") if "label.txt" in sample else "unlabelled"
    title = (f"{meta['source']} @ {meta['start_s']:.1f} s ({meta['duration_s']:.2f} s of audio), {label}; "
             f"{meta['n_mels']} mels, hop {meta['hop_length']}")
    if wave:
        import soundfile as sf

        y, sr = sf.read(io.BytesIO(sample.raw["audio.flac"]), dtype="float32")
        top = axes[0, 0]
        top.plot(np.arange(len(y)) / sr, y, lw=0.4, color="tab:blue")
        top.set_ylabel("amplitude")
        top.set_title(title, fontsize=9)
    else:
        ax.set_title(title, fontsize=9)
    return fig
