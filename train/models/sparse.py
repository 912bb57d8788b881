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

``SparseUNet(PAPER)`` is the layout of SLidR's released 3D network (Res16UNet34C); ``SparseUNet(SMALL)``
is a 3-level net for CPU runs. ``forward(..., return_trunk=True)`` gives the features before the 1x1 head.
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
        # a multiply-and-sum, not ``@``: CUDA has no int64 matrix-vector product (addmv), which the H200 run
        # of bench/device_check.sh found (docs/benchmarks.md)
        stride = torch.stack([dims[2] * dims[3], dims[3], torch.ones_like(dims[3])])
        delta = (_OFFSETS3.to(dev) * stride).sum(1)
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
        # unbind, not w[k]: each w[k] would backpropagate a zero-filled full-size weight gradient, 27 of
        # them per conv, which dominated the paper net's backward (27 x 37.8M floats per step).
        for w_k, (src, dst) in zip(self.weight.to(x.dtype).unbind(0), kmap.pairs, strict=True):
            if dst.numel():
                out.index_add_(0, dst, (x[src] @ w_k).to(out.dtype))
        return out if self.bias is None else out + self.bias.to(x.dtype)


class DownConv(nn.Module):
    """Sparse 2x2x2 stride-2 convolution: out[parent] = sum over children x[child] @ W[child offset].

    Same sites and kernel region as MinkowskiEngine's kernel-2 stride-2 convolution: ME's even kernels
    span offsets [0, 2)^3 from the output site floor(coord / 2) * 2, i.e. exactly the 8 children.
    ``minkowski_init`` draws W ~ U(+-1/sqrt(8 * cin)) as ``MinkowskiConvolution.reset_parameters``;
    the default (normal, std 1/sqrt(8 * cin)) is kept for the small net's seeded runs.
    """

    def __init__(self, cin: int, cout: int, minkowski_init: bool = False):
        super().__init__()
        if minkowski_init:
            bound = 1.0 / math.sqrt(8 * cin)
            self.weight = nn.Parameter(torch.empty(8, cin, cout).uniform_(-bound, bound))
        else:
            self.weight = nn.Parameter(torch.randn(8, cin, cout) / math.sqrt(8 * cin))

    def forward(self, x: Tensor, n_parent: int, inv: Tensor, off_id: Tensor) -> Tensor:
        out = _accumulator(x, n_parent, self.weight.shape[2])
        for k, w_k in enumerate(self.weight.to(x.dtype).unbind(0)):  # unbind: see SubMConv3d.forward
            sel = torch.nonzero(off_id == k).squeeze(1)
            if sel.numel():
                out.index_add_(0, inv[sel], (x[sel] @ w_k).to(out.dtype))
        return out


class UpConv(nn.Module):
    """Transposed 2x2x2 stride-2 convolution back onto the known child sites.

    Each child receives x[parent] @ W[child offset], as ME's ``MinkowskiConvolutionTranspose`` with
    kernel 2, stride 2 and no new coordinates (outputs land on the encoder's existing sites).
    ``minkowski_init`` draws W ~ U(+-1/sqrt(8 * cout)) (ME's transposed ``reset_parameters``).
    """

    def __init__(self, cin: int, cout: int, minkowski_init: bool = False):
        super().__init__()
        if minkowski_init:
            bound = 1.0 / math.sqrt(8 * cout)
            self.weight = nn.Parameter(torch.empty(8, cin, cout).uniform_(-bound, bound))
        else:
            self.weight = nn.Parameter(torch.randn(8, cin, cout) / math.sqrt(cin))

    def forward(self, x: Tensor, inv: Tensor, off_id: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        # One matmul for all 8 offsets, then pick each child's offset column block.
        y = (x @ w.permute(1, 0, 2).reshape(w.shape[1], -1)).view(x.shape[0], 8, w.shape[2])
        return y[inv, off_id]


class ResBlock(nn.Module):
    """Two submanifold convs with BN+ReLU and an identity (or 1x1) shortcut: (V, cin) -> (V, cout).

    ``shortcut_bn_momentum`` None: the 1x1 shortcut (only when cin != cout) is a bare projection (the
    small net). A float: it is a 1x1 conv followed by BatchNorm with that momentum, as the
    ``downsample`` of the released BasicBlock. A 1x1 sparse conv is a per-voxel matmul, so
    ``nn.Linear(bias=False)`` is that conv (its default init is ME's U(+-1/sqrt(cin)) too).
    """

    def __init__(self, cin: int, cout: int, bn_momentum: float, shortcut_bn_momentum: float | None = None):
        super().__init__()
        self.c1, self.b1 = SubMConv3d(cin, cout), nn.BatchNorm1d(cout, momentum=bn_momentum)
        self.c2, self.b2 = SubMConv3d(cout, cout), nn.BatchNorm1d(cout, momentum=bn_momentum)
        self.short = nn.Linear(cin, cout, bias=False) if cin != cout else None
        self.short_bn = (
            nn.BatchNorm1d(cout, momentum=shortcut_bn_momentum)
            if self.short is not None and shortcut_bn_momentum is not None
            else None
        )

    def forward(self, x: Tensor, kmap: KernelMap) -> Tensor:
        h = F.relu(self.b1(self.c1(x, kmap)))
        h = self.b2(self.c2(h, kmap))
        if self.short is not None:
            x = self.short(x)
            if self.short_bn is not None:
                x = self.short_bn(x)
        return F.relu(h + x)


@dataclass(frozen=True)
class SparseUNetConfig:
    """Layout of :class:`SparseUNet`. Level 0 is the input resolution, level l is stride 2**l.

    in_dim: input feature size per voxel. channels[l]: width of the encoder output at level l
    (channels[0] is the stem's 3x3x3 conv width). blocks[l]: ResBlocks of the encoder at level l
    (0 is allowed at level 0: the stem output is then the level-0 skip). out_dim: width of the
    L2-normalised output. bn_momentum: torch ``BatchNorm1d`` momentum (ME's MinkowskiBatchNorm hands its
    ``momentum`` to the same torch module, so the value means the same thing).

    The remaining fields default to the small net; the paper preset sets them to SLidR's release.
    dec_channels: decoder width per upsampling step, deepest first (None: mirror ``channels``).
    dec_blocks: ResBlocks per decoder step (None: one ResBlock stored directly as ``dec[i]``, the small
    net's state-dict keys ``dec.{i}.c1...``; a tuple: ``dec[i]`` is a ModuleList of that many blocks).
    down_keeps_width: False: each stride-2 conv changes the width to channels[l]. True: it keeps the
    previous width and the level's first ResBlock changes it (Res16UNet's ``conv{l}p*s2`` + ``block{l}``).
    shortcut_bn: ResBlock 1x1 shortcuts get a BatchNorm (momentum ``bn_momentum``).
    block_bn_momentum: momentum of the BatchNorms inside ResBlocks (None: ``bn_momentum``).
    minkowski_init: initialise the stride-2 and transposed convs as MinkowskiEngine does.
    """

    in_dim: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (1, 1, 1)
    out_dim: int = 64
    bn_momentum: float = 0.05
    dec_channels: tuple[int, ...] | None = None
    dec_blocks: tuple[int, ...] | None = None
    down_keeps_width: bool = False
    shortcut_bn: bool = False
    block_bn_momentum: float | None = None
    minkowski_init: bool = False

    def __post_init__(self) -> None:
        n = len(self.channels)
        if n < 1 or len(self.blocks) != n:
            raise ValueError(f"channels {self.channels} and blocks {self.blocks} need one entry per level")
        for name in ("dec_channels", "dec_blocks"):
            v = getattr(self, name)
            if v is not None and len(v) != n - 1:
                raise ValueError(f"{name} {v} needs one entry per upsampling step ({n - 1})")
        if self.dec_blocks is not None and min(self.dec_blocks, default=1) < 1:
            raise ValueError(f"dec_blocks {self.dec_blocks}: each decoder step needs a block after the concat")
        for lvl in range(1, n):
            if self.down_keeps_width and self.blocks[lvl] == 0 and self.channels[lvl] != self.channels[lvl - 1]:
                raise ValueError(f"level {lvl} has no block to change the width to channels[{lvl}]")


SMALL = SparseUNetConfig()
# SLidR's released 3D network, valeoai/SLidR model/res16unet.py Res16UNet34C (MinkowskiEngine 0.5.4,
# in_channels 1, out_channels 64 = model_n_out, kernel_size 3, bn_momentum 0.05, normalize_features):
# INIT_DIM 32 -> channels[0]; PLANES[:4] (32, 64, 128, 256) -> channels[1:]; LAYERS (2, 3, 4, 6, 2, 2, 2, 2)
# -> blocks[1:] and dec_blocks; PLANES[4:] (256, 128, 96, 96) -> dec_channels; final 1x1 conv 96 -> 64
# with bias -> head. Released ``Res16UNetBase._make_layer`` passes bn_momentum to the shortcut's BN but
# not to the BasicBlocks, whose BNs keep BasicBlockBase's default 0.1: block_bn_momentum reproduces that.
PAPER = SparseUNetConfig(
    channels=(32, 32, 64, 128, 256),
    blocks=(0, 2, 3, 4, 6),
    dec_channels=(256, 128, 96, 96),
    dec_blocks=(2, 2, 2, 2),
    down_keeps_width=True,
    shortcut_bn=True,
    block_bn_momentum=0.1,
    minkowski_init=True,
)


class SparseUNet(nn.Module):
    """Encoder-decoder on sparse voxels; output (V, out_dim) L2-normalised features per input voxel.

    Encoder: stem 3x3x3 conv + BN + ReLU, then per level l >= 1 a 2x2x2 stride-2 conv + BN + ReLU and
    ``blocks[l]`` ResBlocks. Decoder, deepest first: 2x2x2 transposed conv + BN + ReLU onto level l-1,
    concatenation ``[upsampled, skip]`` (the order of the released ``me.cat(out, skip)``), ResBlocks.
    Head: 1x1 conv with bias, then per-voxel L2 normalisation.

    ``SparseUNet(PAPER)`` is SLidR's Res16UNet34C (37,849,184 parameters, pinned by a test against a
    table of the released layers); ``SparseUNet(SMALL)`` is a 3-level net for CPU runs.

    Features before the head: ``forward(coords, feats, return_trunk=True)`` or ``trunk(coords, feats)``
    return (V, trunk_dim) (96 for PAPER, 16 for SMALL), the last decoder block's post-ReLU output that the
    linear probe reads; ``project(trunk)`` applies the head and normalisation, so
    ``forward(c, f) == project(trunk(c, f))`` and one pass can give both.
    """

    def __init__(self, cfg: SparseUNetConfig = SMALL):
        super().__init__()
        self.cfg = cfg
        ch, nb, mom = cfg.channels, cfg.blocks, cfg.bn_momentum
        block_mom = mom if cfg.block_bn_momentum is None else cfg.block_bn_momentum
        short_mom = mom if cfg.shortcut_bn else None

        def res_blocks(cin: int, cout: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, block_mom, short_mom) for i in range(n))

        # Construction order is part of the small net's seeded init: keep it.
        self.stem = SubMConv3d(cfg.in_dim, ch[0])
        self.stem_bn = nn.BatchNorm1d(ch[0], momentum=mom)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        self.down_bn = nn.ModuleList()
        for lvl, c in enumerate(ch):
            c_in = ch[lvl - 1] if lvl else ch[0]  # width entering this level
            c_down = c_in if cfg.down_keeps_width else c  # width after the stride-2 conv
            if lvl:
                self.down.append(DownConv(c_in, c_down, cfg.minkowski_init))
                self.down_bn.append(nn.BatchNorm1d(c_down, momentum=mom))
            self.enc.append(res_blocks(c_down, c, nb[lvl]))
        self.up = nn.ModuleList()
        self.up_bn = nn.ModuleList()
        self.dec = nn.ModuleList()
        width = ch[-1]
        for i, lvl in enumerate(range(len(ch) - 1, 0, -1)):
            skip = ch[lvl - 1]
            c = skip if cfg.dec_channels is None else cfg.dec_channels[i]
            self.up.append(UpConv(width, c, cfg.minkowski_init))
            self.up_bn.append(nn.BatchNorm1d(c, momentum=mom))
            if cfg.dec_blocks is None:
                self.dec.append(ResBlock(c + skip, c, block_mom, short_mom))
            else:
                self.dec.append(res_blocks(c + skip, c, cfg.dec_blocks[i]))
            width = c
        self.trunk_dim = width
        self.head = nn.Linear(width, cfg.out_dim)  # the 1x1 projection head (ME's ``final``, with bias)

    def trunk(self, coords: Tensor, feats: Tensor) -> Tensor:
        """coords (V, 4) int64 [batch, a, b, c]; feats (V, in_dim) float -> (V, trunk_dim) features
        before the 1x1 head (post-ReLU, not normalised), one row per input voxel in input order."""
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
            x = torch.cat([x, skips[lvl - 1]], dim=1)
            dec = self.dec[i]
            for b in dec if isinstance(dec, nn.ModuleList) else (dec,):
                x = b(x, maps[lvl - 1])
        return x

    def project(self, trunk: Tensor) -> Tensor:
        """(V, trunk_dim) trunk features -> (V, out_dim) unit vectors (1x1 head, then L2 per row)."""
        return F.normalize(self.head(trunk), dim=1)

    def forward(self, coords: Tensor, feats: Tensor, return_trunk: bool = False) -> Tensor:
        """coords (V, 4) int64 [batch, a, b, c]; feats (V, in_dim) float -> (V, out_dim) unit vectors,
        or with ``return_trunk`` the (V, trunk_dim) features before the head (as :meth:`trunk`; through
        ``forward`` so that wrappers such as DDP or ``torch.compile`` see the call)."""
        x = self.trunk(coords, feats)
        return x if return_trunk else self.project(x)
