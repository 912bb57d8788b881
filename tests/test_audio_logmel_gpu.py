"""The torch log-mel path on CUDA against the same path on CPU (which tests/test_audio_logmel.py checks against
librosa): runnable where librosa is not installed, as on the GPU device machine. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from distillkit.preprocess.logmel import LogMelConfig, logmel
from distillkit.sensors.synth.audio import CLASSES, render_clip

pytestmark = pytest.mark.gpu


def test_cuda_torch_path_agrees_with_cpu_torch_path():
    rng = np.random.default_rng(3)
    n = 16000 * 4
    waves = [render_clip(c, n / 16000, 16000, 1, rng)[:, 0].astype(np.float32) for c in CLASSES]
    waves += [rng.uniform(-1, 1, n).astype(np.float32), np.zeros(n, np.float32)]
    batch = np.stack(waves)
    cfg = LogMelConfig()
    cpu = logmel(batch, cfg, backend="torch", device="cpu")
    gpu = logmel(batch, cfg, backend="torch", device="cuda")
    assert gpu.shape == cpu.shape == (len(waves), cfg.n_mels, cfg.frames(n))
    assert np.abs(gpu - cpu).max() < 0.01  # dB; cuFFT and the CPU FFT round differently
    assert (gpu[-1] == 10 * np.log10(cfg.amin)).all()  # silence sits at the amin floor on both
