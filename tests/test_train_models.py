"""ResNet naming/stride, MoCo loading, sparse conv == dense Conv3d, voxelisation semantics, Res16UNet34C layout."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from distillkit.train.models.resnet import FrozenTeacher, ResNet, load_moco_v2
from distillkit.train.models.sparse import (
    PAPER,
    SMALL,
    DownConv,
    KernelMap,
    ResBlock,
    SparseUNet,
    SparseUNetConfig,
    SubMConv3d,
    UpConv,
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


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: on a shared 2-core box, 2 OpenMP threads make each small index_add_ spin
    (measured 25 ms vs 0.09 ms per call under load), which would turn the timing below into a load test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sparse_unet_shapes_and_grad(one_thread):
    xyz = torch.randn(3000, 3) * 8
    coords, first, inv = cylindrical_voxelize(xyz)
    c = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1)
    net = SparseUNet()
    y = net(c, torch.rand(len(coords), 1))
    assert y.shape == (len(coords), 64)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(len(coords)))
    y[:, 0].sum().backward()
    assert net.stem.weight.grad.abs().sum() > 0


# valeoai/SLidR model/res16unet.py Res16UNet34C(in_channels=1, out_channels=64, D=3), written out by hand from
# the released code (INIT_DIM 32, PLANES (32, 64, 128, 256, 256, 128, 96, 96), LAYERS (2, 3, 4, 6, 2, 2, 2, 2),
# BasicBlock with a 1x1 conv + BN ``downsample`` when inplanes != planes), not from distillkit's module.
# Convolutions: (released modules, kind, kernel_volume, cin, cout, bias, how many); a MinkowskiConvolution has
# kernel_volume * cin * cout weights (+ cout bias).
RES16UNET34C_CONVS = [
    ("conv0p1s1", "conv", 27, 1, 32, False, 1),
    ("conv1p1s2", "conv", 8, 32, 32, False, 1),
    ("block1.{0,1}.conv{1,2}", "conv", 27, 32, 32, False, 4),
    ("conv2p2s2", "conv", 8, 32, 32, False, 1),
    ("block2.0.conv1", "conv", 27, 32, 64, False, 1),
    ("block2.0.downsample.0", "conv", 1, 32, 64, False, 1),
    ("block2.0.conv2, block2.{1,2}.conv{1,2}", "conv", 27, 64, 64, False, 5),
    ("conv3p4s2", "conv", 8, 64, 64, False, 1),
    ("block3.0.conv1", "conv", 27, 64, 128, False, 1),
    ("block3.0.downsample.0", "conv", 1, 64, 128, False, 1),
    ("block3.0.conv2, block3.{1,2,3}.conv{1,2}", "conv", 27, 128, 128, False, 7),
    ("conv4p8s2", "conv", 8, 128, 128, False, 1),
    ("block4.0.conv1", "conv", 27, 128, 256, False, 1),
    ("block4.0.downsample.0", "conv", 1, 128, 256, False, 1),
    ("block4.0.conv2, block4.{1..5}.conv{1,2}", "conv", 27, 256, 256, False, 11),
    ("convtr4p16s2", "convtr", 8, 256, 256, False, 1),
    ("block5.0.conv1 (cat 256 + block3 128)", "conv", 27, 384, 256, False, 1),
    ("block5.0.downsample.0", "conv", 1, 384, 256, False, 1),
    ("block5.0.conv2, block5.1.conv{1,2}", "conv", 27, 256, 256, False, 3),
    ("convtr5p8s2", "convtr", 8, 256, 128, False, 1),
    ("block6.0.conv1 (cat 128 + block2 64)", "conv", 27, 192, 128, False, 1),
    ("block6.0.downsample.0", "conv", 1, 192, 128, False, 1),
    ("block6.0.conv2, block6.1.conv{1,2}", "conv", 27, 128, 128, False, 3),
    ("convtr6p4s2", "convtr", 8, 128, 96, False, 1),
    ("block7.0.conv1 (cat 96 + block1 32)", "conv", 27, 128, 96, False, 1),
    ("block7.0.downsample.0", "conv", 1, 128, 96, False, 1),
    ("block7.0.conv2, block7.1.conv{1,2}", "conv", 27, 96, 96, False, 3),
    ("convtr7p2s2", "convtr", 8, 96, 96, False, 1),
    ("block8.0.conv1 (cat 96 + conv0p1s1 32)", "conv", 27, 128, 96, False, 1),
    ("block8.0.downsample.0", "conv", 1, 128, 96, False, 1),
    ("block8.0.conv2, block8.1.conv{1,2}", "conv", 27, 96, 96, False, 3),
    ("final", "conv", 1, 96, 64, True, 1),
]
# MinkowskiBatchNorm layers: (released modules, channels, how many, momentum); 2 * channels trainable each.
# _make_layer hands bn_momentum (0.05) to the downsample BN only; BasicBlock norm1/norm2 keep their default 0.1.
RES16UNET34C_BNS = [
    ("bn0, bn1, bn2", 32, 3, 0.05),
    ("block1.*.norm{1,2}", 32, 4, 0.1),
    ("bn3", 64, 1, 0.05),
    ("block2.*.norm{1,2}", 64, 6, 0.1),
    ("block2.0.downsample.1", 64, 1, 0.05),
    ("bn4", 128, 1, 0.05),
    ("block3.*.norm{1,2}", 128, 8, 0.1),
    ("block3.0.downsample.1", 128, 1, 0.05),
    ("block4.*.norm{1,2}", 256, 12, 0.1),
    ("block4.0.downsample.1", 256, 1, 0.05),
    ("bntr4", 256, 1, 0.05),
    ("block5.*.norm{1,2}", 256, 4, 0.1),
    ("block5.0.downsample.1", 256, 1, 0.05),
    ("bntr5", 128, 1, 0.05),
    ("block6.*.norm{1,2}", 128, 4, 0.1),
    ("block6.0.downsample.1", 128, 1, 0.05),
    ("bntr6, bntr7", 96, 2, 0.05),
    ("block{7,8}.*.norm{1,2}", 96, 8, 0.1),
    ("block{7,8}.0.downsample.1", 96, 2, 0.05),
]


def _released_param_count() -> int:
    convs = sum(n * (kv * cin * cout + (cout if bias else 0)) for _, _, kv, cin, cout, bias, n in RES16UNET34C_CONVS)
    return convs + sum(n * 2 * c for _, c, n, _ in RES16UNET34C_BNS)


RES16UNET34C_PARAMS = 37_849_184  # = _released_param_count(), pinned so a table edit cannot go unnoticed


def test_paper_parameter_count_equals_released_res16unet34c():
    assert _released_param_count() == RES16UNET34C_PARAMS
    net = SparseUNet(PAPER)
    assert sum(p.numel() for p in net.parameters()) == RES16UNET34C_PARAMS
    # Layer by layer, not just the total: the same multiset of conv weights (kernel_volume, cin, cout),
    # biases and BN (width, momentum).
    want_convs = Counter()
    for _, _, kv, cin, cout, bias, n in RES16UNET34C_CONVS:
        want_convs[(kv, cin, cout, bias)] += n
    got_convs = Counter()
    for m in net.modules():
        if isinstance(m, (SubMConv3d, DownConv, UpConv)):
            got_convs[(*m.weight.shape, getattr(m, "bias", None) is not None)] += 1
        elif isinstance(m, torch.nn.Linear):  # a 1x1 sparse conv is a per-voxel matmul
            got_convs[(1, m.in_features, m.out_features, m.bias is not None)] += 1
    assert got_convs == want_convs
    want_bns = Counter()
    for _, c, n, mom in RES16UNET34C_BNS:
        want_bns[(c, mom)] += n
    got_bns = Counter((m.num_features, m.momentum) for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d))
    assert got_bns == want_bns
    print(f"SparseUNet(PAPER) = Res16UNet34C: {RES16UNET34C_PARAMS:,} parameters")


def test_paper_stage_structure_as_released():
    net = SparseUNet(PAPER)
    assert [len(stage) for stage in net.enc] == [0, 2, 3, 4, 6]  # stem only at full resolution, LAYERS[:4]
    assert [len(stage) for stage in net.dec] == [2, 2, 2, 2]  # LAYERS[4:]
    assert all(isinstance(b, ResBlock) for stage in [*net.enc, *net.dec] for b in stage)
    # stride-2 convs keep the width (inplanes -> inplanes); the stage's first block widens.
    assert [tuple(d.weight.shape) for d in net.down] == [(8, 32, 32), (8, 32, 32), (8, 64, 64), (8, 128, 128)]
    assert [tuple(u.weight.shape) for u in net.up] == [(8, 256, 256), (8, 256, 128), (8, 128, 96), (8, 96, 96)]
    # decoder input = [upsampled, skip]: PLANES[4+i] + (block3, block2, block1, stem) widths
    dec_in = [(27, 384, 256), (27, 192, 128), (27, 128, 96), (27, 128, 96)]
    assert [tuple(stage[0].c1.weight.shape) for stage in net.dec] == dec_in
    assert [s[0].short_bn is not None for s in net.enc[1:]] == [False, True, True, True]
    assert net.trunk_dim == 96 and net.head.in_features == 96 and net.head.out_features == 64
    assert net.head.bias is not None


def _cloud(n: int, span: int, batches: int, seed: int) -> torch.Tensor:
    """(V, 4) unique int64 voxels [batch, a, b, c] in a span^3 box (deep levels keep > 1 voxel for BN)."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, batches, (n, 1), generator=g)
    pts = torch.cat([batch, torch.randint(-span, span, (n, 3), generator=g)], 1)
    return torch.unique(pts, dim=0)


def test_paper_forward_trunk_and_grad_on_small_cloud(one_thread):
    torch.manual_seed(0)
    net = SparseUNet(PAPER)
    coords = _cloud(300, 24, 2, seed=3)
    feats = torch.rand(len(coords), 1)
    t0 = time.perf_counter()
    trunk = net.trunk(coords, feats)
    y = net.project(trunk)
    (y[:, :8] * torch.randn(len(coords), 8)).sum().backward()
    elapsed = time.perf_counter() - t0
    assert trunk.shape == (len(coords), 96) and (trunk >= 0).all()  # post-ReLU, before the head
    assert y.shape == (len(coords), 64)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(len(coords)))
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.stem.weight.grad.abs().sum() > 0 and net.enc[4][5].c2.weight.grad.abs().sum() > 0
    # ~0.7 s on one idle core; the bound catches e.g. a per-offset full-size weight gradient (27x the weights).
    assert elapsed < 8, f"paper forward+backward on {len(coords)} voxels took {elapsed:.1f}s on CPU"

    # Concatenation order as released ``me.cat(out, skip)``: upsampled channels first, then the encoder output
    # at that level (block3, block2, block1, then the stem's ``out_p1``, which has no blocks after it).
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):  # forward hook (module, args, output) keeps the output; pre-hook (module, args) the input
        return lambda mod, args, *out: seen.__setitem__(name, (out[0] if out else args[0]).detach())

    hooks = [net.stem_bn.register_forward_hook(keep("stem"))]
    hooks += [net.enc[lvl][-1].register_forward_hook(keep(f"enc{lvl}")) for lvl in (1, 2, 3)]
    hooks += [bn.register_forward_hook(keep(f"up{i}")) for i, bn in enumerate(net.up_bn)]
    hooks += [s[0].register_forward_pre_hook(keep(f"dec{i}")) for i, s in enumerate(net.dec)]
    with torch.no_grad():
        torch.testing.assert_close(net(coords, feats), y.detach())  # forward == project(trunk)
        torch.testing.assert_close(net(coords, feats, return_trunk=True), trunk.detach())
    for h in hooks:
        h.remove()
    for i, skip in enumerate(["enc3", "enc2", "enc1", "stem"]):
        up = F.relu(seen[f"up{i}"])
        ref_skip = F.relu(seen["stem"]) if skip == "stem" else seen[skip]
        torch.testing.assert_close(seen[f"dec{i}"], torch.cat([up, ref_skip], 1))


def test_small_trunk_and_unchanged_layout(one_thread):
    torch.manual_seed(0)
    net = SparseUNet(SMALL)
    assert sum(p.numel() for p in net.parameters()) == 439_984  # the small net and its checkpoints as before
    assert "dec.0.c1.weight" in net.state_dict() and not any("short_bn" in k for k in net.state_dict())
    coords = _cloud(200, 8, 2, seed=4)
    feats = torch.rand(len(coords), 1)
    with torch.no_grad():
        trunk = net.trunk(coords, feats)
        assert trunk.shape == (len(coords), net.trunk_dim) == (len(coords), 16)
        torch.testing.assert_close(net(coords, feats, return_trunk=True), trunk)
        torch.testing.assert_close(net(coords, feats), F.normalize(net.head(trunk), dim=1))


def test_config_rejects_inconsistent_layouts():
    with pytest.raises(ValueError, match="one entry per level"):
        SparseUNetConfig(channels=(16, 32), blocks=(1,))
    with pytest.raises(ValueError, match="dec_channels"):
        SparseUNetConfig(dec_channels=(16,))
    with pytest.raises(ValueError, match="no block to change the width"):
        SparseUNetConfig(channels=(16, 32), blocks=(1, 0), down_keeps_width=True)
