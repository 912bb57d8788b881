"""ResNet (Bottleneck) in pure torch with torchvision's module and state-dict key names.

Keys match torchvision's ``resnet50`` (``conv1``, ``bn1``, ``layer1..4``, ``layerX.Y.conv1/bn1/
conv2/bn2/conv3/bn3/downsample.0/1``, ``fc``) so MoCo v2 / torchvision checkpoints load directly.
``replace_stride_with_dilation=(True, True, True)`` gives output stride 4: a (B, 3, 224, 416)
input yields (B, 2048, 56, 104) features (SLidR's frozen teacher, reference/slidr.md §4).
Depth and width are configurable so CPU tests can use a tiny network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from distillkit.checkpoint_file import CheckpointError, load_weights

log = logging.getLogger(__name__)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 with expansion 4, torchvision layout (stride on conv2)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + idt)


class ResNet(nn.Module):
    """Bottleneck ResNet; ``forward_features`` returns the layer4 map (B, 32*width, H/s, W/s)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        width: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        num_classes: int = 1000,
    ):
        super().__init__()
        self.inplanes, self.dilation = width, 1
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(width * 4, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(width * 8, layers[3], 2, replace_stride_with_dilation[2])
        self.out_channels = width * 8 * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.out_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        prev_dilation = self.dilation
        if dilate:  # torchvision semantics: keep resolution, grow dilation instead
            self.dilation *= stride
            stride = 1
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        mods = [Bottleneck(self.inplanes, planes, stride, down, prev_dilation)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.forward_features(x)), 1))


def load_moco_v2(model: ResNet, path: Path | str | None) -> bool:
    """Load MoCo v2 ``encoder_q`` weights (keys ``module.encoder_q.*``, fc dropped) from a local file.

    Returns True when weights were loaded. ``path=None`` keeps the random initialisation and
    says so in a warning; a path that is not a file raises, so a typo never silently trains
    against a random teacher. Always ``weights_only=True``: a checkpoint never executes code; a file
    that is no readable torch file, or distillkit's own with contents that differ from its digest, is
    refused in one line (``checkpoint_file.load_weights``; MoCo's file carries no digest and loads as is).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: unreadable, corrupted, or not a state dict.
        ValueError: its keys do not fit ResNet-50.
    """
    if path is None:
        log.warning("no teacher checkpoint: using a RANDOMLY INITIALISED image teacher")
        return False
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: teacher checkpoint not found")
    ckpt = load_weights(path, map_location="cpu")
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict):
        raise CheckpointError(path, f"not a ResNet state dict (it holds a {type(sd).__name__})")
    pref = "module.encoder_q."
    clean = {k[len(pref) :]: v for k, v in sd.items() if k.startswith(pref) and not k.startswith(pref + "fc")}
    if not clean:  # a plain torchvision-style state dict
        clean = {k: v for k, v in sd.items() if not k.startswith("fc")}
    missing, unexpected = model.load_state_dict(clean, strict=False)
    missing = [k for k in missing if not k.startswith("fc")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: teacher checkpoint mismatch, missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    log.info("loaded MoCo v2 teacher weights from %s", path)
    return True


class FrozenTeacher(nn.Module):
    """ImageNet-normalising, frozen (no grad, always eval) dilated ResNet feature extractor.

    Input (B, 3, H, W) float in [0, 1]; output (B, out_channels, H/4, W/4) with full dilation.
    """

    def __init__(self, net: ResNet):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.net.eval()  # frozen BN statistics, whatever the caller asks
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_features((x - self.mean) / self.std)
