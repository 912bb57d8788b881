"""COMODO's released IMU student: the pretrained time-series foundation model Mantis-8M, one series per channel.

The released trainer distils into ``Mantis8M`` from the ``mantis-tsfm`` package (Breezelled/COMODO
comodo/utils/model_util.py:3 imports it; comodo/train.py:227 builds it through ``create_pipeline``,
model_util.py:531-534, and wraps it in ``IMUStudentMLP``, train.py:235-242). This module rebuilds that
student with the package's own architecture, so released weights load unchanged:

- **Input.** The raw (B, 6, T) IMU window, no standardisation in front: the released collate only stacks the
  windows (comodo/utils/collate_util.py:61-73) and Mantis scales every series by its own mean and std inside
  (mantis-tsfm mantis/architecture/version1.py:64-65).
- **Length.** A window whose length is not 512 is linearly interpolated to 512 samples, ``align_corners=False``,
  after a cast to float32 (model_util.py:27-34, applied at 351-353).
- **Channels.** Each channel is encoded alone as a (B, 1, 512) series and the six 256-d CLS outputs are
  concatenated in channel order into (B, 1536) (model_util.py:355-367). The channels go through the encoder one
  after the other, as released, rather than as one (6B, 1, 512) batch: same arithmetic, and the transformer's
  dropout draws its random numbers in the released order.
- **Head.** Linear(1536, 2048) -> BatchNorm1d(2048) -> GELU -> Linear(2048, 128) (model_util.py:18-24, built at
  332-337 with in_dim ``hidden_dim * 6`` at 320-321; hidden 2048 and output 128 are train.py:59-60's defaults).
  The release returns the head's output unnormalised (model_util.py:420-423) and normalises it in the loss
  (comodo/loss.py:35); ``forward`` here returns it L2-normalised, the contract of distillkit's ``ImuStudent``,
  and ``embed`` the unnormalised output.
- **Evaluation features.** ``features`` is the concatenation before the head, what the released SVM sees after
  ``remove_projection_layer`` (comodo/unsupervised_rep_test.py:64, model_util.py:420).

Attribute names follow the release (``imu_student``, ``mlp``), so a state dict saved by the released trainer
(``torch.save(imu_student.state_dict(), ...)``, train.py:435-438) loads strictly into ``MantisStudent``.

Weights never come from the network: ``load_mantis_encoder`` reads a local folder as the package's
``save_pretrained`` writes it (``config.json`` + ``model.safetensors``) or a weights file, and loads it
strictly. (The package's own ``from_pretrained`` goes through huggingface_hub, which may download and loads
with ``strict=False``, huggingface_hub/hub_mixin.py ``_load_as_safetensor``: a renamed key would leave part of
the encoder silently random.) mantis-tsfm 0.1.0, the release's pin (requirements.txt:42), and 1.1.0 compute
Mantis8M identically: the two versions' ``TokenGeneratorUnit``, ``ViTUnit``, positional encoding and
convolution/encoder files differ only by a class rename and 1.1.0's optional ``return_layer`` (unused here).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.checkpoint_file import CheckpointError, load_weights
from distillkit.messages import one_line

MANTIS_LENGTH = 512  # model_util.py:30 (size=512); Mantis8M's seq_len default, version1.py:308
CHANNELS = 6  # model_util.py:321 (hidden_dim * 6): the released head is sized for the six IMU channels
HEAD_HIDDEN = 2048  # train.py:59 --mlp_hidden_dim
OUT_DIM = 128  # train.py:60 --mlp_output_dim

# Files ``save_pretrained`` may write, newest format first (huggingface_hub writes model.safetensors; older
# releases of it wrote pytorch_model.bin).
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _mantis_class() -> type[nn.Module]:
    try:
        from mantis.architecture import Mantis8M
    except ImportError as err:  # one line, with the fix
        raise ImportError("the Mantis student needs the mantis-tsfm package: pip install mantis-tsfm") from err
    return Mantis8M


def resize_like_release(x: Tensor) -> Tensor:
    """(B, C, T) -> (B, C, 512) float32 by linear interpolation, ``align_corners=False``; unchanged when T is
    already 512 (model_util.py:27-34, called only when ``seq_len != 512`` at 352-353)."""
    x = x.float()
    if x.shape[-1] != MANTIS_LENGTH:
        x = F.interpolate(x, size=MANTIS_LENGTH, mode="linear", align_corners=False)
    return x


def released_head(in_dim: int, hidden: int = HEAD_HIDDEN, out_dim: int = OUT_DIM) -> nn.Sequential:
    """The released ``MLP``: Linear -> BatchNorm1d -> GELU -> Linear (model_util.py:18-24). Its indices
    (0, 1, 3) match the release's keys ``mlp.0``, ``mlp.1``, ``mlp.3``."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _read_state(path: Path) -> dict[str, Tensor]:
    """The state dict in a ``.safetensors`` or torch weights file (``weights_only``; verified against its digest
    when distillkit wrote it, ``checkpoint_file.load_weights``).

    Raises:
        CheckpointError: one line naming the file: unreadable, corrupted, or no state dict of tensors.
    """
    def refused(reason: str, corrupted: bool = False) -> CheckpointError:
        return CheckpointError(path, reason, corrupted, message=f"Mantis checkpoint {path}: {reason}")

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = load_weights(path, map_location="cpu")
    except CheckpointError as err:
        if err.corrupted:  # it is a torch file, only not the one that was saved
            raise refused(err.reason, corrupted=True) from None
        raise refused(f"not a safetensors or torch state dict ({err.reason})") from None
    except Exception as err:  # noqa: BLE001 - safetensors' errors for a truncated or foreign file: one line too
        raise refused(f"not a safetensors or torch state dict ({one_line(err)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise refused("not a state dict of tensors")
    return state


def _mantis_config(folder: Path) -> dict[str, Any]:
    """``config.json`` as save_pretrained writes it (the constructor's arguments), restricted to Mantis8M's."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():  # a folder of weights alone: the constructor's defaults are Mantis-8M's
        return {}
    cfg = json.loads(cfg_file.read_text())
    params = set(inspect.signature(_mantis_class().__init__).parameters) - {"self", "device"}
    # MantisV1's config may select another output than the CLS token; Mantis8M (the released student) has none
    if cfg.get("output_token", "cls_token") != "cls_token" or cfg.get("return_transf_layer", -1) != -1:
        raise ValueError(f"Mantis checkpoint {folder}: config.json selects output_token="
                         f"{cfg.get('output_token')!r} / return_transf_layer={cfg.get('return_transf_layer')}; "
                         "the released student uses the last layer's CLS token")
    return {k: v for k, v in cfg.items() if k in params}


def read_mantis_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(Mantis8M constructor arguments, state dict) from a local folder or weights file; never the network.

    Args:
        path: a folder written by ``Mantis8M.save_pretrained`` (``config.json`` + ``model.safetensors`` or
            ``pytorch_model.bin``), or a ``.safetensors`` / torch file holding a state dict: Mantis8M's own keys,
            or the released trainer's whole student (``imu_student.*`` and ``mlp.*``, train.py:435-438).

    Raises:
        FileNotFoundError: ``path`` does not exist, or the folder holds no weights file.
        ValueError: the file is not a state dict.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"Mantis checkpoint {p}: no such file or folder (give a folder written by "
                                "save_pretrained or a .safetensors/.pt weights file; nothing is downloaded)")
    if p.is_dir():
        for name in _FOLDER_WEIGHTS:
            if (p / name).is_file():
                return _mantis_config(p), _read_state(p / name)
        raise FileNotFoundError(f"Mantis checkpoint {p}: folder holds none of {', '.join(_FOLDER_WEIGHTS)}")
    return {}, _read_state(p)


def _encoder_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # MantisV1 (mantis-tsfm >= 1.0) names the transformer ``transf_unit``; Mantis8M, the released student,
    # ``vit_unit`` (version1.py:163-173 renames the other way when MantisV1 loads old weights)
    return {("vit_unit." + k[len("transf_unit."):] if k.startswith("transf_unit.") else k): v
            for k, v in state.items()}


def _strict_load(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches: torch's message spans many lines
        first = str(err).strip().splitlines()[-1].strip()
        raise ValueError(f"Mantis checkpoint {where}: weights do not fit the architecture ({first})") from None
    if missing or unexpected:
        raise ValueError(f"Mantis checkpoint {where}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")


def new_mantis_encoder(**config: Any) -> nn.Module:
    """A randomly initialised Mantis8M on the CPU (``config``: its constructor's arguments; defaults: Mantis-8M,
    version1.py:308-310). Its unused pre-training projector ``prj`` is frozen, see ``MantisStudent``."""
    encoder = _mantis_class()(**{**config, "device": "cpu"})
    for p in encoder.prj.parameters():
        p.requires_grad_(False)
    return encoder


def load_mantis_encoder(path: str | Path) -> nn.Module:
    """Mantis8M with the weights of ``path`` (see ``read_mantis_checkpoint``), loaded strictly, on the CPU.

    Args:
        path: a save_pretrained folder or a weights file of Mantis8M alone.
    """
    config, state = read_mantis_checkpoint(path)
    if any(k.startswith("imu_student.") for k in state):
        raise ValueError(f"Mantis checkpoint {path}: holds a whole released student (imu_student.*, mlp.*); "
                         "load it with MantisStudent.from_checkpoint")
    encoder = new_mantis_encoder(**config)
    _strict_load(encoder, _encoder_keys(state), str(path))
    return encoder


class MantisStudent(nn.Module):
    """(B, 6, T) raw IMU -> features (B, 6 * 256) and unit embeddings (B, 128), as the released student.

    Args:
        encoder: a Mantis8M (``new_mantis_encoder`` / ``load_mantis_encoder``); None builds a random one.
        channels: IMU channels (the released head is sized for 6, model_util.py:321).
        head_hidden, out_dim: the head's sizes (released defaults 2048 and 128, train.py:59-60).
    """

    def __init__(self, encoder: nn.Module | None = None, channels: int = CHANNELS, head_hidden: int = HEAD_HIDDEN,
                 out_dim: int = OUT_DIM):
        super().__init__()
        self.channels = channels
        self.imu_student = encoder if encoder is not None else new_mantis_encoder()
        if getattr(self.imu_student, "pre_training", False):
            raise ValueError("Mantis encoder built with pre_training=True returns its projector's output; the "
                             "released student uses the CLS token (model_util.py:362, version1.py:350-353)")
        # ``prj`` only runs when pre_training is True, so it never has a gradient: AdamW leaves it untouched as in
        # the release, and freezing it keeps DistributedDataParallel from waiting for its gradients.
        for p in self.imu_student.prj.parameters():
            p.requires_grad_(False)
        self.feature_dim = channels * int(self.imu_student.hidden_dim)
        self.mlp = released_head(self.feature_dim, head_hidden, out_dim)

    @classmethod
    def from_checkpoint(cls, path: str | Path, channels: int = CHANNELS, head_hidden: int = HEAD_HIDDEN,
                        out_dim: int = OUT_DIM) -> MantisStudent:
        """The student with pretrained encoder weights from ``path`` (head freshly initialised, as the release
        builds it after loading Mantis, train.py:227-242); or, when ``path`` holds a whole released student
        (``imu_student.*`` + ``mlp.*``, train.py:435-438), encoder and head both from it.

        Args:
            path: see ``read_mantis_checkpoint``.
            channels, head_hidden, out_dim: as the constructor.
        """
        config, state = read_mantis_checkpoint(path)
        if any(k.startswith("imu_student.") for k in state):
            enc_state = {k[len("imu_student."):]: v for k, v in state.items() if k.startswith("imu_student.")}
            student = cls(new_mantis_encoder(**config), channels, head_hidden, out_dim)
            _strict_load(student, {**{"imu_student." + k: v for k, v in _encoder_keys(enc_state).items()},
                                   **{k: v for k, v in state.items() if not k.startswith("imu_student.")}},
                         str(path))
            return student
        encoder = new_mantis_encoder(**config)
        _strict_load(encoder, _encoder_keys(state), str(path))
        return cls(encoder, channels, head_hidden, out_dim)

    def features(self, x: Tensor) -> Tensor:
        """(B, C, T) raw IMU -> (B, C * 256): each channel's CLS embedding, concatenated in channel order."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"Mantis student expects (batch, {self.channels}, time) IMU windows, got "
                             f"{tuple(x.shape)}")
        x = resize_like_release(x)
        return torch.cat([self.imu_student(x[:, c:c + 1, :]) for c in range(self.channels)], dim=1)

    def embed(self, x: Tensor) -> Tensor:
        """(B, C, T) -> (B, out_dim) head output, unnormalised (the released ``IMUStudentMLP.forward``)."""
        return self.mlp(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T) -> (B, out_dim) unit embeddings (the release normalises them in its loss, loss.py:35)."""
        return F.normalize(self.embed(x), dim=1)
