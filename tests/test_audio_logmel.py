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


def test_min_tail_drops_short_tails():
    """A 10.003 s file in 10 s segments: the 3 ms tail (one frame of audio in a 1001-frame segment) is dropped
    at the default 1 s minimum; so are the demo's 0.49 s tails; a 1.5 s tail is kept."""
    rate, seg = 16000, 160000
    min_tail = 16000  # stages.segments.min_tail_s = 1.0
    assert segment_bounds(160048, seg, "pad", min_tail) == [(0, seg)]  # 10.003 s
    assert segment_bounds(160048, seg, "pad") == [(0, seg), (seg, 2 * seg)]  # the old behaviour: 3 ms kept
    assert segment_bounds(int(10.49 * rate), seg, "pad", min_tail) == [(0, seg)]
    assert segment_bounds(int(11.5 * rate), seg, "pad", min_tail) == [(0, seg), (seg, 2 * seg)]
    assert segment_bounds(int(0.49 * rate), seg, "pad", min_tail) == []  # a short file's only segment too
    assert segment_bounds(seg + min_tail, seg, "pad", min_tail) == [(0, seg), (seg, 2 * seg)]  # exactly 1 s
    with pytest.raises(ValueError, match="min_tail"):
        segment_bounds(10, 10, "pad", -1)


HTK = LogMelConfig(mel_scale="htk")


def atst_formula(y: np.ndarray) -> np.ndarray:
    """ATST's front end written out independently of preprocess.logmel: torchaudio's MelSpectrogram (reflect
    padded centred STFT, periodic Hann, power 2, HTK triangles of peak 1 on linspace(0, sr/2) bins) and
    AmplitudeToDB(stype="power", top_db=80) (10 log10(max(x, 1e-10)), clipped at the maximum minus 80)."""
    import torch

    x = torch.from_numpy(y).double()
    spec = torch.stft(x, 1024, hop_length=160, win_length=1024, window=torch.hann_window(1024, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    bins = torch.linspace(0, 8000, 513, dtype=torch.float64)
    mel = torch.linspace(2595 * np.log10(1 + 60 / 700), 2595 * np.log10(1 + 7800 / 700), 66, dtype=torch.float64)
    hz = 700 * (10 ** (mel / 2595) - 1)
    slopes = hz[None, :] - bins[:, None]  # (513, 66)
    down = -slopes[:, :-2] / (hz[1:-1] - hz[:-2])
    up = slopes[:, 2:] / (hz[2:] - hz[1:-1])
    fb = torch.clamp(torch.minimum(down, up), min=0)  # (513, 64)
    db = 10 * torch.log10(torch.clamp(fb.T @ spec, min=1e-10))
    return torch.maximum(db, db.max() - 80).numpy()


@pytest.mark.parametrize("backend", ["librosa", "torch"])
def test_htk_front_end_is_atst_formula(backend):
    """stages.logmel.mel_scale = "htk" equals ATST's torchaudio front end (formula above) within 0.05 dB above
    the floor, and is not the Slaney default (which differs by several dB: another scale and normalisation)."""
    sig = signals()
    for name in ("harmonic", "white_noise", "square_full_scale"):
        y = sig[name]
        want = atst_formula(y)
        got = logmel(y[None], HTK, backend=backend)[0]
        assert got.shape == want.shape == (64, 1 + N // 160)
        above = want > want.max() - 80 + 0.05
        assert np.abs(got - want)[above].max() <= 0.05, name
        assert np.abs(logmel(y[None], CFG, backend=backend)[0] - want).max() > 1.0, name


def test_htk_front_end_matches_torchaudio():
    """Against torchaudio itself where it imports beside this torch (run with a throwaway copy on PYTHONPATH)."""
    try:
        import torch
        import torchaudio
    except Exception as exc:  # not installed, or built for another torch: the formula test above stands in
        pytest.skip(f"torchaudio unavailable: {exc}")
    melspec = torchaudio.transforms.MelSpectrogram(16000, f_min=60, f_max=7800, hop_length=160, win_length=1024,
                                                   n_fft=1024, n_mels=64)
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80)
    for name, y in signals().items():
        if name == "silence":  # all at the floor: nothing above it to compare
            continue
        want = to_db(melspec(torch.from_numpy(y))).numpy()
        for backend in ("librosa", "torch"):
            got = logmel(y[None], HTK, backend=backend)[0]
            above = want > want.max() - 80 + 0.05
            assert np.abs(got - want)[above].max() <= 0.05, (name, backend)


def test_mel_scale_is_checked_and_recorded():
    with pytest.raises(ValueError, match="mel_scale"):
        LogMelConfig(mel_scale="mfcc").check()
    assert "mel_scale" not in CFG.meta() and HTK.meta()["mel_scale"] == "htk"
