"""ResNet naming/stride, MoCo loading, sparse conv == dense Conv3d, voxelisation semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillkit.train.models.resnet import FrozenTeacher, ResNet, load_moco_v2
from distillkit.train.models.sparse import (
    DownConv,
    KernelMap,
    SparseUNet,
    SubMConv3d,
    _down_map,
    cylindrical_voxelize,
    unique_first,
)


def test_resnet50_torchvision_key_names():
    keys = set(ResNet().state_dict())
    for k in [
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.weight",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.bias",
        "layer3.5.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert k in keys
    assert sum(p.numel() for p in ResNet().parameters()) == 25_557_032  # torchvision resnet50


def test_dilated_output_stride_4():
    net = ResNet((1, 1, 1, 1), 8, replace_stride_with_dilation=(True, True, True)).eval()
    with torch.no_grad():
        assert net.forward_features(torch.rand(1, 3, 224, 416)).shape == (1, 256, 56, 104)
    full = ResNet(replace_stride_with_dilation=(True, True, True))
    assert full.out_channels == 2048 and full.layer4[0].conv2.dilation == (4, 4)


def test_load_moco_v2_and_frozen_teacher(tmp_path, caplog):
    src = ResNet((1, 1, 1, 1), 8)
    sd = {f"module.encoder_q.{k}": v for k, v in src.state_dict().items() if not k.startswith("fc")}
    sd["module.encoder_q.fc.0.weight"] = torch.zeros(3, 3)  # MoCo v2 MLP head: dropped
    torch.save({"state_dict": sd, "epoch": 800}, tmp_path / "moco.pt")
    dst = ResNet((1, 1, 1, 1), 8)
    assert load_moco_v2(dst, tmp_path / "moco.pt")
    torch.testing.assert_close(dst.layer4[0].conv3.weight, src.layer4[0].conv3.weight)
    assert not load_moco_v2(ResNet((1, 1, 1, 1), 8), None)
    assert "RANDOMLY INITIALISED" in caplog.text
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        load_moco_v2(ResNet((1, 1, 1, 1), 8), tmp_path / "typo.pt")  # never a silent random teacher
    t = FrozenTeacher(dst).train()
    assert not t.net.training and not any(p.requires_grad for p in t.parameters())


def _random_sparse(seed, n=60, size=6, batches=2):
    g = torch.Generator().manual_seed(seed)
    pts = torch.stack(
        [torch.randint(0, batches, (n,), generator=g)]
        + [torch.randint(-2, size - 2, (n,), generator=g) for _ in range(3)],
        1,
    )
    coords = torch.unique(pts, dim=0)
    return coords, g


def _densify(coords, feats, lo, size, batches):
    dense = torch.zeros(batches, feats.shape[1], size, size, size, dtype=feats.dtype)
    c = coords[:, 1:] - lo
    dense[coords[:, 0], :, c[:, 0], c[:, 1], c[:, 2]] = feats
    return dense


def test_submanifold_conv_equals_dense_conv3d():
    coords, g = _random_sparse(0)
    cin, cout = 3, 5
    x = torch.randn(len(coords), cin, generator=g, dtype=torch.float64)
    conv = SubMConv3d(cin, cout).double()
    out = conv(x, KernelMap(coords))
    w = conv.weight.view(3, 3, 3, cin, cout).permute(4, 3, 0, 1, 2)  # (Cout, Cin, 3, 3, 3)
    lo = -2
    dense_out = F.conv3d(_densify(coords, x, lo, 6, 2), w, padding=1)
    c = coords[:, 1:] - lo
    ref = dense_out[coords[:, 0], :, c[:, 0], c[:, 1], c[:, 2]]
    torch.testing.assert_close(out, ref)


def test_down_conv_equals_dense_stride2_conv():
    coords, g = _random_sparse(1)
    x = torch.randn(len(coords), 2, generator=g, dtype=torch.float64)
    conv = DownConv(2, 4).double()
    parent, inv, off = _down_map(coords)
    out = conv(x, len(parent), inv, off)
    w = conv.weight.view(2, 2, 2, 2, 4).permute(4, 3, 0, 1, 2)
    dense_out = F.conv3d(
        _densify(coords, x, -2, 6, 2), w, stride=2
    )  # -2 is even: same 2x2x2 cells as floor(c/2)
    pc = parent[:, 1:] + 1  # dense cell o covers c + 2 in {2o, 2o + 1}, i.e. floor(c / 2) = o - 1
    torch.testing.assert_close(out, dense_out[parent[:, 0], :, pc[:, 0], pc[:, 1], pc[:, 2]])


def test_unique_first_and_cylindrical_voxelize():
    q = torch.tensor([[5, 0], [1, 1], [5, 0], [0, 0], [1, 1], [2, 2]])
    uniq, first, inv = unique_first(q)
    assert uniq.tolist() == [[5, 0], [1, 1], [0, 0], [2, 2]]
    assert first.tolist() == [0, 1, 3, 5] and inv.tolist() == [0, 1, 0, 2, 1, 3]
    xyz = torch.tensor([[1.05, 0.0, 0.05], [1.01, 0.001, 0.01], [0.0, 2.0, -0.05], [-1.0, -0.0001, 0.3]])
    coords, first, inv = cylindrical_voxelize(xyz)
    assert coords.tolist() == [[10, 0, 0], [20, 90, -1], [10, -180, 3]]
    assert first.tolist() == [0, 2, 3] and inv.tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("spread", [50, 2**40])  # packed int64 keys, and the fallback for huge ranges
def test_unique_first_matches_first_occurrence_dict(spread):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (2000, 4), generator=g) * torch.tensor([1, 1, spread, 1])
    uniq, first, inv = unique_first(q)
    seen: dict[tuple, int] = {}
    for i, row in enumerate(map(tuple, q.tolist())):
        seen.setdefault(row, i)
    assert uniq.tolist() == [list(r) for r in seen] and first.tolist() == list(seen.values())
    assert torch.equal(uniq[inv], q)


def test_sparse_unet_shapes_and_grad():
    xyz = torch.randn(3000, 3) * 8
    coords, first, inv = cylindrical_voxelize(xyz)
    c = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    net = SparseUNet()
    y = net(c, torch.rand(len(coords), 1))
    assert y.shape == (len(coords), 64)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(len(coords)))
    y[:, 0].sum().backward()
    assert net.stem.weight.grad.abs().sum() > 0
