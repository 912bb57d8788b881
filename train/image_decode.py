"""Deferred image decoding: JPEG bytes + crop boxes -> the training crops, on the training device.

SLidR needs six full-resolution JPEG decodes per sample (about 780 per second to keep one H100
busy with the paper's teacher). With ``decode_on_device`` the loader workers only choose the
crops (from the image sizes in ``cams.json``) and pass the JPEG bytes through; this module then
decodes them where the batch is: with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``)
when torchvision is importable and the device is CUDA, else with OpenCV on the CPU. Either way the
crop, the bilinear resize (no antialias) and the flip are the same torch operations as the
eager CPU path (``train.slidr_aug.crop_resize_image``), so both paths train the same model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.sensors.images import decode_rgb


@functools.cache
def nvjpeg_available() -> bool:
    """True when ``torchvision.io.decode_jpeg`` can decode on a CUDA device here."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision absent or built for another torch
        return False
    return True


def decode_jpegs(jpegs: list[bytes], device: torch.device | str) -> list[Tensor]:
    """JPEG bytes -> list of uint8 (3, H, W) tensors on ``device`` (nvJPEG on CUDA when available)."""
    device = torch.device(device)
    if device.type == "cuda" and nvjpeg_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return [torch.from_numpy(decode_rgb(b)).permute(2, 0, 1).to(device, non_blocking=True) for b in jpegs]


def decode_crops(
    jpegs: list[bytes], boxes: Tensor, flips: Tensor, crop: tuple[int, int], device: torch.device | str
) -> Tensor:
    """Decode, crop ``boxes`` (I, 4) ``[i, j, h, w]``, resize to ``crop`` and flip where ``flips``.

    Returns float32 (I, 3, crop_h, crop_w) in [0, 1] on ``device``.
    """
    images = decode_jpegs(jpegs, device)
    out = []
    for img, (i, j, h, w), flip in zip(images, boxes.tolist(), flips.tolist(), strict=True):
        region = img[:, i : i + h, j : j + w].float().div_(255)
        res = F.interpolate(region[None], size=crop, mode="bilinear", align_corners=False, antialias=False)[0]
        out.append(res.flip(-1) if flip else res)
    return torch.stack(out)
