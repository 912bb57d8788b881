"""A sparse-convolution point backbone in pure PyTorch (CPU and CUDA, no MinkowskiEngine/spconv).

Points are voxelised in cylindrical coordinates exactly as SLidR does (reference/slidr.md §3):
``(rho / 0.1, atan2(y, x) in degrees / 1, z / 0.1)`` floored, first point per voxel, voxels
ordered by first occurrence. The network works on integer voxel coordinates ``(V, 4)`` =
``[batch, a, b, c]`` (int64) and features ``(V, C)``.

Submanifold 3x3x3 convolution: coordinates are hashed into unique int64 keys, sorted once, and
the 27 neighbour keys are found with ``torch.searchsorted``; each offset contributes
``out[dst] += x[src] @ W[offset]`` through ``index_add_``. Output sites == input sites, so the
result equals a dense ``Conv3d(padding=1)`` evaluated at the active sites of a zero-filled grid.
Strided 2x2x2 down-convolution maps a voxel to ``coord // 2`` (its child offset selects one of 8
weights); the transposed up-convolution reuses the same child->parent map in reverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- voxelisation


def cylindrical_voxelize(
    xyz: Tensor, rho_res: float = 0.1, phi_res_deg: float = 1.0, z_res: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise points (N, >=3) float in metres into cylindrical voxels.

    Returns ``coords`` (V, 3) int64 voxel coordinates ordered by first occurrence,
    ``index`` (V,) int64 the first point of each voxel (MinkowskiEngine CPU ``return_index``
    semantics) and ``inverse`` (N,) int64 point -> voxel.
    """
    x, y, z = xyz[:, 0].double(), xyz[:, 1].double(), xyz[:, 2].double()
    rho = torch.sqrt(x * x + y * y)
    phi = torch.atan2(y, x) * (180.0 / math.pi)
    q = torch.stack([rho / rho_res, phi / phi_res_deg, z / z_res], dim=1).floor().long()
    return unique_first(q)


def unique_first(q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unique rows of ``q`` (N, D) int64, ordered by first occurrence, with first index and inverse."""
    n = q.shape[0]
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=q.device)
        return q[:0], e, e
    lo = q.min(0).values
    dims = q.max(0).values - lo + 1
    if float(dims.double().prod()) < 2**62:
        # One int64 key per row: a 1-D unique is ~10x faster than torch.unique(dim=0) on CPU,
        # which made voxelisation the loader's largest cost after image decoding.
        _, inv = torch.unique(_keys(q, lo, dims), return_inverse=True)
    else:  # coordinates too spread out to pack into one int64
        _, inv = torch.unique(q, dim=0, return_inverse=True)
    n_uniq = int(inv.max()) + 1
    first = torch.full((n_uniq,), n, dtype=torch.long, device=q.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=q.device), reduce="amin")
    order = torch.argsort(first)  # sorted-unique order -> first-occurrence order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=q.device)
    return q[first[order]], first[order], rank[inv]


# --------------------------------------------------------------------------- kernel maps


def _keys(coords: Tensor, lo: Tensor, dims: Tensor) -> Tensor:
    """Row-major int64 key of (V, 4) coords inside a box with origin ``lo`` and size ``dims``."""
    c = coords - lo
    k = c[:, 0]
    for d in range(1, coords.shape[1]):
        k = k * dims[d] + c[:, d]
    return k


_OFFSETS3 = torch.tensor([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])


class KernelMap:
    """Neighbour pairs of one coordinate set for 3x3x3 submanifold convolution (computed once per level)."""

    def __init__(self, coords: Tensor):
        dev = coords.device
        n = coords.shape[0]
        # Margin of 1 on each spatial side so every neighbour key stays inside the box (no collisions);
        # a neighbour's key is then the voxel's key plus a constant per offset, and all 27 x V
        # lookups are one searchsorted and one nonzero (few kernels, which a GPU needs).
        lo = coords.min(0).values - torch.tensor([0, 1, 1, 1], device=dev)
        dims = coords.max(0).values - lo + torch.tensor([1, 2, 2, 2], device=dev)
        keys = _keys(coords, lo, dims)
        delta = _OFFSETS3.to(dev) @ torch.stack([dims[2] * dims[3], dims[3], torch.ones_like(dims[3])])
        sorted_keys, perm = torch.sort(keys)
        nk = delta[:, None] + keys[None, :]  # (27, V)
        pos = torch.searchsorted(sorted_keys, nk).clamp_(max=max(n - 1, 0))
        k_idx, dst = torch.nonzero(sorted_keys[pos] == nk, as_tuple=True)  # ordered by offset, then voxel
        src = perm[pos[k_idx, dst]]
        counts = torch.bincount(k_idx, minlength=27).tolist()
        # per offset: (src, dst) voxel indices
        self.pairs: list[tuple[Tensor, Tensor]] = list(zip(src.split(counts), dst.split(counts), strict=True))


def _down_map(coords: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Child -> parent map for stride 2: parent coords (V', 4), parent index (V,), child offset in [0, 8)."""
    parent = coords.clone()
    parent[:, 1:] = torch.div(coords[:, 1:], 2, rounding_mode="floor")
    rem = coords[:, 1:] - 2 * parent[:, 1:]
    off_id = rem[:, 0] * 4 + rem[:, 1] * 2 + rem[:, 2]
    pc, _, inv = unique_first(parent)
    return pc, inv, off_id


# --------------------------------------------------------------------------- layers


def _accumulator(x: Tensor, rows: int, cols: int) -> Tensor:
    """Zeros to sum per-offset products into: at least float32, because under bf16 autocast the
    products come out in bf16 and summing up to 27 of them in bf16 loses precision."""
    return x.new_zeros(rows, cols, dtype=torch.promote_types(x.dtype, torch.float32))


class SubMConv3d(nn.Module):
    """Submanifold 3x3x3 sparse convolution; weight (27, Cin, Cout), offset order (dx, dy, dz) row-major."""

    def __init__(self, cin: int, cout: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(27, cin, cout))
        nn.init.kaiming_uniform_(self.weight.view(27 * cin, cout).T, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: Tensor, kmap: KernelMap) -> Tensor:
        out = _accumulator(x, x.shape[0], self.weight.shape[2])
        w = self.weight.to(x.dtype)
        for k, (src, dst) in enumerate(kmap.pairs):
            if dst.numel():
                out.index_add_(0, dst, (x[src] @ w[k]).to(out.dtype))
        return out if self.bias is None else out + self.bias.to(x.dtype)


class DownConv(nn.Module):
    """Sparse 2x2x2 stride-2 convolution: out[parent] = sum over children x[child] @ W[child offset]."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, cin, cout) / math.sqrt(8 * cin))

    def forward(self, x: Tensor, n_parent: int, inv: Tensor, off_id: Tensor) -> Tensor:
        out = _accumulator(x, n_parent, self.weight.shape[2])
        w = self.weight.to(x.dtype)
        for k in range(8):
            sel = torch.nonzero(off_id == k).squeeze(1)
            if sel.numel():
                out.index_add_(0, inv[sel], (x[sel] @ w[k]).to(out.dtype))
        return out


class UpConv(nn.Module):
    """Transposed 2x2x2 stride-2 convolution back onto the known child sites."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, cin, cout) / math.sqrt(cin))

    def forward(self, x: Tensor, inv: Tensor, off_id: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        # One matmul for all 8 offsets, then pick each child's offset column block.
        y = (x @ w.permute(1, 0, 2).reshape(w.shape[1], -1)).view(x.shape[0], 8, w.shape[2])
        return y[inv, off_id]


class ResBlock(nn.Module):
    """Two submanifold convs with BN+ReLU and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, bn_momentum: float):
        super().__init__()
        self.c1, self.b1 = SubMConv3d(cin, cout), nn.BatchNorm1d(cout, momentum=bn_momentum)
        self.c2, self.b2 = SubMConv3d(cout, cout), nn.BatchNorm1d(cout, momentum=bn_momentum)
        self.short = nn.Linear(cin, cout, bias=False) if cin != cout else None

    def forward(self, x: Tensor, kmap: KernelMap) -> Tensor:
        h = F.relu(self.b1(self.c1(x, kmap)))
        h = self.b2(self.c2(h, kmap))
        return F.relu(h + (x if self.short is None else self.short(x)))


@dataclass(frozen=True)
class SparseUNetConfig:
    """Channels per level and residual blocks per level; ``out_dim`` is the distillation feature size."""

    in_dim: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (1, 1, 1)
    out_dim: int = 64
    bn_momentum: float = 0.05


SMALL = SparseUNetConfig()
# MinkUNet-like (Res16UNet34C has 32..256 channels, 2-3-4-6 blocks); heavier, for GPU.
PAPER = SparseUNetConfig(channels=(32, 64, 128, 256, 256), blocks=(1, 2, 3, 4, 6))


class SparseUNet(nn.Module):
    """Encoder-decoder on sparse voxels; output (V, out_dim) L2-normalised features per input voxel."""

    def __init__(self, cfg: SparseUNetConfig = SMALL):
        super().__init__()
        self.cfg = cfg
        ch, nb = cfg.channels, cfg.blocks
        self.stem = SubMConv3d(cfg.in_dim, ch[0])
        self.stem_bn = nn.BatchNorm1d(ch[0], momentum=cfg.bn_momentum)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        self.down_bn = nn.ModuleList()
        for lvl, c in enumerate(ch):
            cin = ch[lvl - 1] if lvl else ch[0]
            if lvl:
                self.down.append(DownConv(cin, c))
                self.down_bn.append(nn.BatchNorm1d(c, momentum=cfg.bn_momentum))
            self.enc.append(nn.ModuleList(ResBlock(c, c, cfg.bn_momentum) for _ in range(nb[lvl])))
        self.up = nn.ModuleList()
        self.up_bn = nn.ModuleList()
        self.dec = nn.ModuleList()
        for lvl in range(len(ch) - 1, 0, -1):
            self.up.append(UpConv(ch[lvl], ch[lvl - 1]))
            self.up_bn.append(nn.BatchNorm1d(ch[lvl - 1], momentum=cfg.bn_momentum))
            self.dec.append(ResBlock(2 * ch[lvl - 1], ch[lvl - 1], cfg.bn_momentum))
        self.head = nn.Linear(ch[0], cfg.out_dim)  # the 1x1 projection head

    def forward(self, coords: Tensor, feats: Tensor) -> Tensor:
        """coords (V, 4) int64 [batch, a, b, c]; feats (V, in_dim) float -> (V, out_dim) unit vectors."""
        levels = [coords]
        maps = [KernelMap(coords)]
        downs = []
        for _ in range(1, len(self.cfg.channels)):
            pc, inv, off = _down_map(levels[-1])
            downs.append((inv, off))
            levels.append(pc)
            maps.append(KernelMap(pc))
        x = F.relu(self.stem_bn(self.stem(feats, maps[0])))
        skips = []
        for lvl, blocks in enumerate(self.enc):
            if lvl:
                x = self.down[lvl - 1](x, levels[lvl].shape[0], *downs[lvl - 1])
                x = F.relu(self.down_bn[lvl - 1](x))
            for b in blocks:
                x = b(x, maps[lvl])
            skips.append(x)
        for i, lvl in enumerate(range(len(self.cfg.channels) - 1, 0, -1)):
            x = F.relu(self.up_bn[i](self.up[i](x, *downs[lvl - 1])))
            x = self.dec[i](torch.cat([x, skips[lvl - 1]], dim=1), maps[lvl - 1])
        return F.normalize(self.head(x), dim=1)
