"""The device a torch stage runs on, from the ``auto | cpu | cuda`` a manifest or caller asks for."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(requested: str) -> str:
    """``"cpu"`` or ``"cuda"`` for a requested device in this process.

    Args:
        requested: ``"auto"`` (CUDA when this process sees a device, else the CPU), ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: ``requested`` is not one of :data:`DEVICES`.
        RuntimeError: ``"cuda"`` was asked for and this process sees no CUDA device.
    """
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise RuntimeError("device = \"cuda\" but this process sees no CUDA device")
    return "cpu"
