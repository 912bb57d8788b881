"""ATST-Clip's views of a log-mel segment: two random crops in the loader, then random-resized-crop
and mixup on whole batches on the training device.

In the loader (CPU, per sample, numpy): ``two_crops`` cuts two random ``crop`` -frame windows out of
the frames that hold audio (``meta.json`` ``duration_s``; the zero padding of a last segment is left
out). A clip shorter than the crop is tiled cyclically from a random offset, so each view is filled
with sound rather than padding (ATST's loader pads short clips; tiling keeps the two views different).

On the device (batched torch, ``B`` clips x 2 views, dB in, normalised out), in this order:

- normalisation with the dataset mean/std of ``index.json``;
- ``log_mixup_exp``: each view is mixed with another clip of the batch,
  ``log((1 - lam) exp(x) + lam exp(y))`` on the normalised log-mel with ``lam = alpha * U(0, 1)``
  (BYOL-A's log-mixup-exp, as ATST uses; ATST draws the partner from a 2000-clip memory bank per
  loader worker, here it is a random other clip of the same batch, which needs no per-worker state);
- ``random_resized_crop``: BYOL-A's RandomResizeCrop: the view sits in the middle of a virtual
  canvas ``virtual_scale`` times its size (zeros outside, i.e. the dataset mean after
  normalisation); a box of ``scale`` x the view size in each axis, at a random place on the
  canvas, is resized back to the view size with bicubic interpolation (one ``grid_sample`` for the
  whole batch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.preprocess.logmel import valid_frames


def crop_frames(crop_s: float, sample_rate: int, hop_length: int) -> int:
    """Frames of a ``crop_s`` crop, rounded down to a multiple of 4 (the patch width).

    Args:
        crop_s: crop length in seconds.
        sample_rate: Hz.
        hop_length: samples per frame.
    """
    return max(4, int(crop_s * sample_rate / hop_length) // 4 * 4)


def audio_frames(spec: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """The frames of a stored segment that hold audio (padding left out), float32 (n_mels, n).

    Args:
        spec: (n_mels, T) stored log-mel.
        meta: its ``meta.json``.
    """
    from distillkit.pipelines.audio import _cfg_of  # the one reading of meta.json's front-end keys

    n = valid_frames(int(round(meta["duration_s"] * meta["sample_rate"])), _cfg_of(meta))
    return np.asarray(spec[:, : min(n, spec.shape[1])], dtype=np.float32)


def window(frames: np.ndarray, start: int, length: int) -> np.ndarray:
    """``length`` frames from ``start``, wrapping around cyclically when the clip is shorter.

    Args:
        frames: (n_mels, n) log-mel.
        start: first frame.
        length: frames wanted.
    """
    n = frames.shape[1]
    if start + length <= n:
        return frames[:, start:start + length]
    idx = (start + np.arange(length)) % n
    return frames[:, idx]


def two_crops(frames: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Two random windows of ``length`` frames: (2, n_mels, length) float32.

    Args:
        frames: (n_mels, n) log-mel of the audio part of a segment.
        length: crop length in frames.
        rng: the sample's generator (``train.streaming.sample_rngs``).
    """
    n = frames.shape[1]
    hi = n - length if n >= length else n - 1
    starts = rng.integers(0, hi + 1, size=2)
    return np.stack([window(frames, int(s), length) for s in starts]).astype(np.float32)


def log_mixup_exp(x: Tensor, alpha: float, generator: torch.Generator | None = None) -> Tensor:
    """BYOL-A's log-mixup-exp: mix every item with a random other item of the batch,
    ``log((1 - lam) exp(x) + lam exp(y))``, on *normalised* log-mel (as BYOL-A and ATST do).

    On normalised values (about N(0, 1)) the mix stays dominated by the item itself; mixing the
    physical powers of dB values instead would let a partner 20 dB louder drown the item out, and the
    two views of a clip would no longer share their content.

    Args:
        x: (B, ...) normalised log-mel.
        alpha: the largest mixing weight (ATST: 0.4); 0 returns ``x``.
        generator: optional generator on ``x``'s device (default: the global one).
    """
    if alpha <= 0 or x.shape[0] < 2:
        return x
    B = x.shape[0]
    shape = (B,) + (1,) * (x.ndim - 1)
    lam = alpha * torch.rand(shape, device=x.device, generator=generator)
    # A partner other than itself: shift by 1..B-1 in the batch order.
    offset = torch.randint(1, B, (B,), device=x.device, generator=generator)
    partner = x[(torch.arange(B, device=x.device) + offset) % B]
    xf, pf = x.float(), partner.float()
    # logaddexp form of log((1 - lam) e^x + lam e^y): no overflow whatever the values.
    mixed = torch.logaddexp(torch.log1p(-lam) + xf, torch.log(lam.clamp_min(1e-12)) + pf)
    return mixed.to(x.dtype)


def random_resized_crop(x: Tensor, virtual_scale: float = 1.5, scale: tuple[float, float] = (0.6, 1.5),
                        generator: torch.Generator | None = None) -> Tensor:
    """BYOL-A RandomResizeCrop of a batch of (normalised) spectrograms, bicubic.

    Args:
        x: (B, C, F, T) spectrograms, normalised so that 0 is the neutral value outside.
        virtual_scale: the canvas is ``virtual_scale`` x the input in time (1.0 in frequency, BYOL-A's
            ``virtual_crop_scale=(1.0, 1.5)``).
        scale: range of the crop box relative to the input size, per axis, drawn independently.
        generator: optional generator on ``x``'s device.
    """
    B, _, Fq, T = x.shape
    dev = x.device
    u = torch.rand(B, 4, device=dev, generator=generator)
    lo, hi = scale
    # Box size relative to the input (capped at the canvas), centre anywhere it fits on the canvas.
    canvas = torch.tensor([1.0, virtual_scale], device=dev)
    size = torch.minimum(lo + (hi - lo) * u[:, :2], canvas)  # (B, 2): [freq, time]
    centre = (u[:, 2:] - 0.5) * (canvas - size)  # relative to the canvas centre, in input units
    # affine_grid maps output [-1, 1] to input [-1, 1]: x_in = size * x_out + 2 * centre
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = size[:, 1]
    theta[:, 0, 2] = 2 * centre[:, 1]
    theta[:, 1, 1] = size[:, 0]
    theta[:, 1, 2] = 2 * centre[:, 0]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="zeros", align_corners=False).to(x.dtype)


def collate_views(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack the loader's items: ``{"views": (B, 2, n_mels, crop) float32 dB}``.

    Args:
        items: ``{"views": (2, n_mels, crop) array}`` per clip.
    """
    return {"views": torch.from_numpy(np.stack([it["views"] for it in items]))}
