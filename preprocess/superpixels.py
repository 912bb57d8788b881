"""SLIC superpixels at full image resolution (SLidR's parameters by default), on the CPU with scikit-image
(the reference) or batched in torch on CUDA or the CPU (:mod:`distillkit.preprocess.slic_torch`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distillkit.preprocess.devices import DEVICES, resolve_device

SLIDR_SLIC = {"n_segments": 150, "compactness": 6.0, "sigma": 3.0}
BACKENDS = ("skimage", "torch")


def slic_superpixels(
    image: np.ndarray,
    n_segments: int = 150,
    compactness: float = 6.0,
    sigma: float = 3.0,
    backend: str = "skimage",
    *,
    max_num_iter: int = 10,
    convert2lab: bool = True,
    enforce_connectivity: bool = True,
    min_size_factor: float = 0.5,
    max_size_factor: float = 3.0,
    device: str = "auto",
) -> np.ndarray:
    """Superpixel labels of an RGB image.

    ``backend="skimage"`` runs ``skimage.segmentation.slic`` with ``start_label=0`` (the reference SLidR
    used); ``backend="torch"`` runs the same algorithm in torch (:func:`slic_superpixels_batch` for many
    images at once, which is what makes a GPU pay). The two agree in quality, not bit for bit
    (docs/superpixels.md).

    Args:
        image: (H, W, 3) uint8 RGB.
        n_segments: approximate number of superpixels (skimage's seed grid).
        compactness: colour/space balance (skimage's meaning: higher = squarer).
        sigma: Gaussian pre-smoothing in pixels.
        backend: ``"skimage"`` or ``"torch"``.
        max_num_iter: k-means rounds.
        convert2lab: cluster in CIE Lab rather than RGB.
        enforce_connectivity: make every superpixel 4-connected.
        min_size_factor: merge segments smaller than this fraction of ``H*W / n_seeds``.
        max_size_factor: cut connected pieces larger than this multiple of ``H*W / n_seeds``.
        device: torch backend only: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.

    Returns:
        (H, W) int32 labels, contiguous from 0 (0..S-1).
    """
    _check_image(image)
    return slic_superpixels_batch([image], n_segments, compactness, sigma, backend, max_num_iter=max_num_iter,
                                  convert2lab=convert2lab, enforce_connectivity=enforce_connectivity,
                                  min_size_factor=min_size_factor, max_size_factor=max_size_factor,
                                  device=device)[0]


def slic_superpixels_batch(
    images: np.ndarray | Sequence[np.ndarray],
    n_segments: int = 150,
    compactness: float = 6.0,
    sigma: float = 3.0,
    backend: str = "skimage",
    *,
    max_num_iter: int = 10,
    convert2lab: bool = True,
    enforce_connectivity: bool = True,
    min_size_factor: float = 0.5,
    max_size_factor: float = 3.0,
    device: str = "auto",
) -> list[np.ndarray]:
    """Superpixel labels of several RGB images; the torch backend processes same-sized images as one batch.

    Args:
        images: (B, H, W, 3) uint8 array or a sequence of (H, W, 3) uint8 arrays (sizes may differ).
        n_segments, compactness, sigma, backend, max_num_iter, convert2lab, enforce_connectivity,
            min_size_factor, max_size_factor, device: as :func:`slic_superpixels`.

    Returns:
        One (H, W) int32 label map per image, each contiguous from 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"superpixel backend must be one of {BACKENDS}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"superpixel device must be one of {DEVICES}, got {device!r}")
    images = list(images)
    for im in images:
        _check_image(im)
    params = dict(n_segments=n_segments, compactness=compactness, max_num_iter=max_num_iter, sigma=sigma,
                  convert2lab=convert2lab, min_size_factor=min_size_factor, max_size_factor=max_size_factor)
    if backend == "skimage":
        from skimage.segmentation import slic

        return [relabel_contiguous(slic(im, start_label=0, enforce_connectivity=enforce_connectivity, **params))
                for im in images]
    import torch

    from distillkit.preprocess.slic_torch import slic_torch

    dev = torch_device(device)
    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape[:2], []).append(i)
    for idx in by_size.values():
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).to(dev)
        labels = slic_torch(batch, enforce_connectivity_=enforce_connectivity, **params).cpu().numpy()
        for j, i in enumerate(idx):
            out[i] = labels[j]
    return out  # type: ignore[return-value]


def torch_device(device: str):
    """The torch device for ``device`` (``"auto"``: CUDA when available, else the CPU); see
    :func:`distillkit.preprocess.devices.resolve_device`."""
    import torch

    return torch.device(resolve_device(device))


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")


def relabel_contiguous(labels: np.ndarray) -> np.ndarray:
    """Map the labels present to 0..S-1 in increasing order (a lookup table, not np.unique:
    labels are small integers and the image has millions of pixels)."""
    labels = np.asarray(labels)
    if labels.min() < 0:
        raise ValueError("labels must be non-negative")
    present = np.bincount(labels.ravel()) > 0
    lut = np.cumsum(present) - 1
    return lut[labels].astype(np.int32)
