"""The log-mel stage: the reference is librosa's own melspectrogram + power_to_db, and the batched
torch path agrees with it within 0.05 dB on every bin above the top_db floor."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from distillkit.preprocess.logmel import (
    LogMelConfig,
    cut_segment,
    logmel,
    logmel_librosa,
    segment_bounds,
    valid_frames,
)
from distillkit.sensors.synth.audio import CLASSES, render_clip

CFG = LogMelConfig()
N = 16000 * 4  # 4 s keeps the test short; framing is the same for 10 s


def librosa_reference(y: np.ndarray, cfg: LogMelConfig = CFG) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                         win_length=cfg.win_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    return librosa.power_to_db(mel, ref=1.0, top_db=cfg.top_db)


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    t = np.arange(N) / 16000
    out = {c: render_clip(c, N / 16000, 16000, 1, rng)[:, 0].astype(np.float32) for c in CLASSES}
    out["white_noise"] = rng.uniform(-1, 1, N).astype(np.float32)
    out["silence"] = np.zeros(N, np.float32)
    out["square_full_scale"] = np.where(np.sin(2 * np.pi * 441 * t) >= 0, 1.0, -1.0).astype(np.float32)
    return out


def test_reference_is_librosa_melspectrogram():
    """librosa's numbers, to float32 rounding: the mel sum is in a fixed order and the dB in float64 so the
    bytes are the same on every CPU (preprocess/logmel.py ``mel_power``, ``power_to_db``); librosa's own
    float32 BLAS product and log10 are the ones that move in their last bits."""
    y = signals()["chirp"]
    ours, ref = logmel_librosa(y, CFG), librosa_reference(y).astype(np.float32)
    assert np.abs(ours - ref).max() <= 8 * np.spacing(np.abs(ref).max())  # a few float32 ulps
    assert (ours.astype(np.float16) != ref.astype(np.float16)).mean() < 1e-3  # as stored: float16
    assert logmel_librosa(y, CFG).shape == (64, CFG.frames(N)) == (64, 1 + N // 160)


def test_torch_path_agrees_within_005_db():
    sig = signals()
    batch = np.stack(list(sig.values()))
    got = logmel(batch, CFG, backend="torch")
    assert got.shape == (len(sig), 64, CFG.frames(N)) and got.dtype == np.float32
    for (name, y), spec in zip(sig.items(), got, strict=True):
        ref = librosa_reference(y)
        above = ref > ref.max() - CFG.top_db  # bins above the -80 dB floor
        err = np.abs(spec - ref)
        if above.any():
            assert err[above].max() < 0.05, (name, float(err[above].max()))
        assert err.max() < 0.05, name  # floor bins too: both clip at the same level
    silence = got[list(sig).index("silence")]
    assert np.allclose(silence, 10 * np.log10(CFG.amin), atol=1e-4)  # power 0 -> amin floor, kept


def test_torch_path_batches_match_single_items():
    sig = signals()
    # a quiet item (half of it near-silent) beside a loud one: a batch-wide top_db floor would lift the
    # quiet item's near-silent bins to the loud item's max - 80 dB
    quiet = sig["white_noise"] * 1e-4
    quiet[: N // 2] *= 1e-3
    batch = np.stack([quiet, sig["square_full_scale"]])
    both = logmel(batch, CFG, backend="torch")
    one = logmel(batch[:1], CFG, backend="torch")
    # a batch-wide floor would cut the quiet item well above its own lowest bins
    assert one[0].min() < both[1].max() - CFG.top_db - 20
    assert np.abs(both[0] - one[0]).max() < 1e-3  # the top_db floor is per item, not per batch
    assert np.abs(both[1] - logmel(batch[1:], CFG, backend="torch")[0]).max() < 1e-3


@pytest.mark.parametrize("cfg", [CFG, LogMelConfig(n_fft=512, win_length=400, n_mels=80, fmin=0.0, fmax=8000.0),
                                 LogMelConfig(sample_rate=32000, n_fft=1024, n_mels=128, fmin=50.0, fmax=14000.0)])
def test_filterbank_is_librosas(cfg):
    from distillkit.preprocess.logmel import mel_filterbank

    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    ours = mel_filterbank(cfg)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_odd_n_fft_is_refused():
    with pytest.raises(ValueError, match="n_fft must be even"):
        LogMelConfig(n_fft=1023, win_length=1023).check()


def test_segments_pad_or_drop():
    assert segment_bounds(25, 10, "pad") == [(0, 10), (10, 20), (20, 30)]
    assert segment_bounds(25, 10, "drop") == [(0, 10), (10, 20)]
    assert segment_bounds(20, 10, "pad") == [(0, 10), (10, 20)]
    assert segment_bounds(4, 10, "drop") == []
    x = np.arange(1, 26, dtype=np.float32)
    seg = cut_segment(x, 20, 30)
    assert seg.tolist() == [21, 22, 23, 24, 25, 0, 0, 0, 0, 0]
    assert valid_frames(1600, CFG) == 10 and valid_frames(1601, CFG) == 11
    with pytest.raises(ValueError):
        segment_bounds(10, 10, "wrap")
    with pytest.raises(ValueError):
        logmel(x[None], CFG, backend="nnaudio")


@pytest.mark.gpu
def test_torch_path_on_cuda_agrees_within_005_db():
    sig = signals()
    batch = np.stack(list(sig.values()))
    got = logmel(batch, CFG, backend="torch", device="cuda")
    for (name, y), spec in zip(sig.items(), got, strict=True):
        ref = librosa_reference(y)
        above = ref > ref.max() - CFG.top_db
        assert np.abs(spec - ref)[above].max() < 0.05 if above.any() else True, name


def test_mel_power_is_the_filterbank_product_in_a_fixed_order():
    from distillkit.preprocess.logmel import mel_filterbank, mel_power

    fb = mel_filterbank(CFG)
    power = np.random.default_rng(0).random((fb.shape[1], 50)).astype(np.float32) ** 4
    got = mel_power(fb, power)
    assert got.dtype == np.float32 and got.shape == (CFG.n_mels, 50)
    np.testing.assert_allclose(got, fb @ power, rtol=2e-6)
    # the sum runs over each band's bins from low to high: reordering the bins changes the bits
    flipped = mel_power(fb[:, ::-1], power[::-1])
    assert not np.array_equal(flipped, got) and np.allclose(flipped, got, rtol=2e-6)
    empty = np.zeros((2, fb.shape[1]), np.float32)
    assert not mel_power(empty, power).any()  # a band without bins is 0, not the first bin
