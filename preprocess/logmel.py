"""Log-mel spectrograms: segmentation of a waveform and two paths to the same numbers.

Two front ends (``LogMelConfig.mel_scale``):

- ``"slaney"`` (the default, distillkit's): librosa's defaults, the Slaney mel scale with Slaney (area)
  filter normalisation and zero-padded centred frames.
- ``"htk"``: ATST's, torchaudio's ``MelSpectrogram(16000, f_min=60, f_max=7800, hop_length=160,
  win_length=1024, n_fft=1024, n_mels=64)`` + ``AmplitudeToDB(stype="power", top_db=80)``
  (Audio-WestlakeU/audiossl audiossl/methods/atst/transform.py:14-16): HTK mel scale
  (``2595 log10(1 + f / 700)``), no filter normalisation (torchaudio's ``norm=None``), reflect-padded centred
  frames (torchaudio's ``pad_mode="reflect"``). Equal to torchaudio within 0.05 dB
  (tests/test_audio_logmel.py); use it to reuse ATST checkpoints or constants such as its min/max scaling.

Both are computed by either path:

- ``logmel_librosa`` is the reference: ``librosa.stft`` (centred frames, the front end's padding,
  periodic Hann window, power 2), librosa's mel filterbank of the front end, then
  ``librosa.power_to_db(ref=1.0, amin=1e-10, top_db=80)`` (torchaudio's ``AmplitudeToDB`` is the same formula:
  ``10 log10(max(power, 1e-10))`` clipped at the maximum minus ``top_db``).
- ``logmel_torch`` computes a batch of equal-length segments with ``torch.stft`` and the mel
  filterbank of :func:`mel_filterbank` (librosa's, computed here to float32 rounding, so a GPU worker
  needs no librosa), on CPU or CUDA. It agrees with the reference within 0.05 dB on every bin above the ``top_db`` floor
  (tests/test_audio_logmel.py).

Units: waveforms are float32 in [-1, 1] at ``sample_rate`` Hz; spectrograms are ``(n_mels, T)``
float32 dB of power (ref 1.0), ``T = 1 + N // hop_length`` frames for N samples. ``top_db`` clips
each *segment* (each call of the reference, each batch item of the torch path) at its own maximum
minus 80 dB, as ``power_to_db`` does over the array it is given; silence has power 0 and sits at
``10 log10(amin) = -100`` dB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LogMelConfig:
    """Front-end settings; the default sizes are ATST's (16 kHz, 1024-point FFT, 10 ms hop, 64 mels from 60 to
    7800 Hz: Audio-WestlakeU/audiossl audiossl/methods/atst/transform.py:14-15); the default mel scale, filter
    normalisation and padding are librosa's Slaney defaults, distillkit's front end; ``mel_scale="htk"`` is ATST's
    (torchaudio's HTK mel, no filter normalisation, reflect padding; docs/audio.md).

    Attributes:
        sample_rate: Hz.
        n_fft: FFT size in samples.
        win_length: window length in samples (<= n_fft; centred in the frame, zero padded).
        hop_length: frame step in samples (160 = 10 ms at 16 kHz).
        n_mels: mel bands.
        fmin: lowest band edge in Hz.
        fmax: highest band edge in Hz.
        top_db: dynamic range kept below each segment's maximum.
        amin: power floor before the log (librosa's default).
        mel_scale: ``"slaney"`` (librosa's Slaney scale and norm, zero padding: distillkit's default) or
            ``"htk"`` (torchaudio's HTK scale, no norm, reflect padding: ATST's front end).
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 60.0
    fmax: float = 7800.0
    top_db: float = 80.0
    amin: float = 1e-10
    mel_scale: str = "slaney"

    @property
    def pad_mode(self) -> str:
        """Padding of the centred frames: zeros (librosa's ``pad_mode="constant"``) or, for ATST's front end,
        torchaudio's ``Spectrogram`` default ``"reflect"``."""
        return "reflect" if self.mel_scale == "htk" else "constant"

    def check(self) -> None:
        """Raise ``ValueError`` for settings that cannot make a spectrogram."""
        if self.mel_scale not in ("slaney", "htk"):
            raise ValueError(f"mel_scale must be 'slaney' (librosa) or 'htk' (ATST's torchaudio), got "
                             f"{self.mel_scale!r}")
        if self.n_fft < 2 or self.n_fft % 2:
            raise ValueError(f"n_fft must be even (centred frames: the frame count assumes it), got {self.n_fft}")
        if not 0 < self.win_length <= self.n_fft:
            raise ValueError(f"win_length must be in 1..n_fft ({self.n_fft}), got {self.win_length}")
        if self.hop_length < 1 or self.n_mels < 1:
            raise ValueError("hop_length and n_mels must be >= 1")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got {self.fmin}, {self.fmax}, "
                             f"{self.sample_rate}")

    def meta(self) -> dict[str, Any]:
        """The fields ``meta.json`` records (docs/reading.md)."""
        d = asdict(self)
        out = {k: d[k] for k in ("n_fft", "win_length", "hop_length", "n_mels", "fmin", "fmax")}
        # recorded only when not the default, so shards built before the option keep their bytes; a missing
        # mel_scale reads as "slaney"
        if self.mel_scale != "slaney":
            out["mel_scale"] = self.mel_scale
        return out

    def frames(self, n_samples: int) -> int:
        """Frames of a centred STFT of ``n_samples`` samples.

        Args:
            n_samples: waveform length.
        """
        return 1 + n_samples // self.hop_length


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    linear = f / (200.0 / 3)
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / logstep, linear)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * (200.0 / 3))


def _hz_to_mel_htk(f: np.ndarray) -> np.ndarray:
    """HTK's mel scale (torchaudio's default ``mel_scale="htk"``, ATST's): ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(cfg: LogMelConfig) -> np.ndarray:
    """(n_mels, 1 + n_fft // 2) float32 mel filterbank of ``cfg.mel_scale``, computed here (float64, then
    float32) so the torch path needs no librosa on a GPU worker: ``"slaney"`` is ``librosa.filters.mel``'s
    defaults (Slaney scale, Slaney area normalisation; tests/test_audio_logmel.py checks it against librosa's),
    ``"htk"`` torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")`` (triangles of peak 1, ATST's).

    Args:
        cfg: front-end settings.
    """
    freqs = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate)
    to_mel, to_hz = (_hz_to_mel_htk, _mel_to_hz_htk) if cfg.mel_scale == "htk" else (_hz_to_mel, _mel_to_hz)
    mel_f = to_hz(np.linspace(to_mel(cfg.fmin), to_mel(cfg.fmax), cfg.n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper))
    if cfg.mel_scale != "htk":  # Slaney area normalisation; torchaudio's norm=None leaves peak-1 triangles
        fb = fb * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    fb = fb.astype(np.float32)
    fb.setflags(write=False)
    return fb


def segment_bounds(n_samples: int, segment: int, last: str = "pad", min_tail: int = 0) -> list[tuple[int, int]]:
    """Non-overlapping segments ``[start, end)`` of a waveform (end may pass ``n_samples``: padding).

    A partial segment (the tail after the last full one, or a whole file shorter than one segment) is kept
    with ``last="pad"`` only when it holds at least ``min_tail`` samples of audio: otherwise a 10.003 s file
    cut into 10 s segments would give a second segment with one frame of audio, repeated 600 times in both
    training views and counted as a labelled example at evaluation. Such a tail is dropped, not end-aligned:
    an end-aligned last segment would repeat almost all of the previous one (3 ms apart for 10.003 s), a
    near-duplicate example; ATST never cuts files at all (its loader random-crops whole clips,
    Audio-WestlakeU/audiossl audiossl/transforms/common.py:63-74), so neither choice is "the release's".

    Args:
        n_samples: waveform length.
        segment: segment length in samples.
        last: ``"pad"`` keeps a final partial segment (zero padded later), ``"drop"`` leaves it out.
        min_tail: fewest audio samples a partial segment needs to be kept with ``"pad"`` (0: any).
    """
    if segment < 1:
        raise ValueError("segment length must be >= 1 sample")
    if last not in ("pad", "drop"):
        raise ValueError(f"last must be 'pad' or 'drop', got {last!r}")
    if min_tail < 0:
        raise ValueError(f"min_tail must be >= 0 samples, got {min_tail}")
    full = n_samples // segment
    bounds = [(i * segment, (i + 1) * segment) for i in range(full)]
    tail = n_samples % segment
    if last == "pad" and tail and tail >= min_tail:
        bounds.append((full * segment, (full + 1) * segment))
    return bounds


def cut_segment(samples: np.ndarray, start: int, end: int) -> np.ndarray:
    """``samples[start:end]`` zero padded to ``end - start`` samples (float32).

    Args:
        samples: (N,) waveform.
        start: first sample.
        end: one past the last sample (may exceed N).
    """
    out = np.zeros(end - start, dtype=np.float32)
    part = samples[start:end]
    out[: len(part)] = part
    return out


def power_to_db(power: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """librosa's ``power_to_db(ref=1.0)`` with ``cfg.amin`` and ``cfg.top_db``, float32.

    The same formula (``10 log10(max(power, amin))``, clipped at the maximum minus ``top_db``) evaluated
    in float64 and rounded to float32 at the end. Why: numpy's float32 ``log10`` runs other code per CPU
    (its AVX-512 and AVX2 loops against the C library's), whose last bits differ, and one float32 ulp
    crossed a float16 rounding boundary of ``logmel.npy`` in 19 of 26 demo segments when numpy's SIMD
    loops were disabled. A float64 ulp almost never survives the rounding to float32 and then float16
    (about 2**-42 per value; docs/decisions.md "Determinism").

    Args:
        power: (n_mels, T) mel power.
        cfg: front-end settings.
    """
    db = 10.0 * np.log10(np.maximum(np.asarray(power, dtype=np.float64), cfg.amin))
    if cfg.top_db is not None:
        db = np.maximum(db, db.max() - cfg.top_db)
    return db.astype(np.float32)


def logmel_librosa(samples: np.ndarray, cfg: LogMelConfig = LogMelConfig()) -> np.ndarray:
    """Reference log-mel of one waveform: (N,) float32 -> (n_mels, 1 + N // hop) float32 dB.

    Args:
        samples: (N,) float32 waveform at ``cfg.sample_rate``.
        cfg: front-end settings.
    """
    import librosa

    y = np.ascontiguousarray(samples, dtype=np.float32)
    stft = librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                        window="hann", center=True, pad_mode=cfg.pad_mode)
    # re^2 + im^2 rather than |z|^2: numpy's SIMD complex abs (hypot) rounds differently per CPU
    # on tiny magnitudes; squares and a sum are correctly rounded everywhere.
    power = stft.real * stft.real + stft.imag * stft.imag
    mel = mel_power(_librosa_filterbank(cfg), power)
    return power_to_db(mel, cfg)


def mel_power(fb: np.ndarray, power: np.ndarray) -> np.ndarray:
    """``fb @ power`` without BLAS: each band's non-zero bins added in increasing frequency order.

    Why not ``@``: BLAS kernels are chosen per CPU and sum in different orders, so an AVX2 and an AVX-512
    machine wrote logmel.npy bytes that differed in their last bits (OpenBLAS ``Prescott`` against
    ``Haswell`` kernels changed 14 of 26 demo segments). Elementwise multiply and add are correctly rounded
    everywhere, so a fixed order gives the same bits on every machine (docs/decisions.md "Determinism").
    A mel band is non-zero over a few dozen bins at most, so this costs a few passes over the output.

    Args:
        fb: (n_mels, n_bins) float32 filterbank (triangles: one contiguous non-zero run per band).
        power: (n_bins, T) float32 power spectrogram.

    Returns:
        (n_mels, T) float32 mel power.
    """
    n_mels, n_bins = fb.shape
    nonzero = fb != 0
    lo = nonzero.argmax(axis=1)
    hi = n_bins - nonzero[:, ::-1].argmax(axis=1)
    hi[~nonzero.any(axis=1)] = lo[~nonzero.any(axis=1)]  # an empty band (fmax beyond the bins) stays 0
    out = np.zeros((n_mels, power.shape[1]), dtype=np.result_type(fb, power))
    rows = np.arange(n_mels)
    for j in range(int((hi - lo).max(initial=0))):
        k = np.minimum(lo + j, n_bins - 1)
        w = np.where(lo + j < hi, fb[rows, k], 0).astype(out.dtype)
        out += w[:, None] * power[k, :]
    return out


@lru_cache(maxsize=8)
def _librosa_filterbank(cfg: LogMelConfig) -> np.ndarray:
    """The reference path's filterbank: librosa's own (``mel_filterbank`` equals it to float32 rounding); for
    ``mel_scale="htk"`` librosa's ``htk=True, norm=None``, the filterbank torchaudio builds for ATST."""
    import librosa

    htk = cfg.mel_scale == "htk"
    fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax,
                             htk=htk, norm=None if htk else "slaney")
    fb.setflags(write=False)
    return fb


def logmel_torch(samples: Any, cfg: LogMelConfig = LogMelConfig(), device: str | None = None) -> Any:
    """Batched log-mel in torch: (B, N) float32 -> (B, n_mels, 1 + N // hop) float32 dB.

    The same operations as the reference: centred frames padded as ``cfg.pad_mode``, periodic Hann window of
    ``win_length`` centred in ``n_fft``, |STFT|^2, the front end's mel filterbank, then
    ``10 log10(max(mel, amin))`` clipped at each item's maximum minus ``top_db``. The STFT runs in
    float32 (float64 on CPU would be needlessly slow and float32 already meets 0.05 dB).

    Args:
        samples: (B, N) or (N,) waveform, a numpy array or a torch tensor.
        cfg: front-end settings.
        device: ``"cpu"``, ``"cuda"`` ...; None keeps a tensor's device (numpy: CPU).

    Returns:
        A torch tensor on ``device``; (n_mels, T) for a 1-d input.
    """
    import torch

    x = torch.as_tensor(samples)
    if device is not None:
        x = x.to(device)
    x = x.float()
    single = x.ndim == 1
    if single:
        x = x[None]
    window = torch.hann_window(cfg.win_length, periodic=True, device=x.device, dtype=torch.float32)
    stft = torch.stft(x, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
                      center=True, pad_mode=cfg.pad_mode, return_complex=True)
    power = stft.real.square() + stft.imag.square()
    fb = torch.from_numpy(np.array(mel_filterbank(cfg))).to(x.device)
    mel = torch.matmul(fb, power)
    db = 10.0 * torch.log10(mel.clamp_min(cfg.amin))
    if cfg.top_db is not None:
        floor = db.amax(dim=(-2, -1), keepdim=True) - cfg.top_db
        db = torch.maximum(db, floor)
    return db[0] if single else db


def logmel(samples: np.ndarray, cfg: LogMelConfig = LogMelConfig(), backend: str = "librosa",
           device: str = "cpu") -> np.ndarray:
    """Log-mel of a batch of equal-length segments by either path: (B, N) -> (B, n_mels, T) float32.

    Args:
        samples: (B, N) float32 waveforms.
        cfg: front-end settings.
        backend: ``"librosa"`` (reference, one segment at a time) or ``"torch"`` (batched).
        device: torch device of the torch path.
    """
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (B, N) waveforms, got shape {x.shape}")
    if backend == "librosa":
        return np.stack([logmel_librosa(s, cfg) for s in x]) if len(x) else np.zeros(
            (0, cfg.n_mels, cfg.frames(x.shape[1])), np.float32)
    if backend == "torch":
        import torch

        with torch.no_grad():
            return logmel_torch(x, cfg, device).cpu().numpy()
    raise ValueError(f"unknown log-mel backend {backend!r} (librosa | torch)")


def valid_frames(n_valid_samples: int, cfg: LogMelConfig) -> int:
    """Frames whose centre lies within the first ``n_valid_samples`` (the rest see only padding).

    Args:
        n_valid_samples: real (not padded) samples of a segment.
        cfg: front-end settings.
    """
    return max(1, math.ceil(n_valid_samples / cfg.hop_length))
