"""Fused CUDA kernel (Triton) for one SLIC round: assignment plus per-block partial seed sums.

NOT YET RUN ON A GPU: written for the H100 check (tests/test_gpu_superpixels.py compares it with the plain
torch path); this machine has neither a GPU nor Triton. Without Triton, :func:`triton_available` is False and
:func:`distillkit.preprocess.slic_torch.slic_torch` runs its plain torch path on CUDA instead.

One program per (block of ``sy x sx`` pixels, image). All pixels of a block share one candidate list
(:func:`distillkit.preprocess.slic_torch.candidates`: the seeds whose window overlaps the block, in
increasing seed order), so the program loads each candidate's position, colour and window as scalars and
keeps, per pixel, the best distance and the slot that gave it: the same arithmetic, in the same order, as
``slic_torch.assign_torch``. It then sums ``[1, y, x, q0, q1, q2]`` of its pixels per winning slot into
``LANES`` int64 lanes (the last lane for pixels no window covers) with in-program reductions; the host makes
the seed sums from them with an integer ``index_add_``. Integer sums are exact in any order (atomic int64
adds would be too; the reductions were chosen to keep one write per lane, not for exactness). The launch
disables FMA contraction so the distances round as the torch path's separate operations do. Checked in
Triton's interpreter (TRITON_INTERPRET=1, Triton 3.9 on CPU): labels and sums equal to the torch path
round by round, uncovered pixels included; compiled for sm_90 without error.
"""

from __future__ import annotations

import torch

from distillkit.preprocess.slic_torch import Grid, Seeds, candidates, seed_tables

try:  # Triton ships with CUDA builds of torch; CPU builds (this machine) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

BLOCK = 1024


def triton_available() -> bool:
    """Whether the fused kernel can run: Triton imports and a CUDA device is present."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    # Integer arguments equal to 1 would otherwise be specialised into compile-time constants.
    @triton.jit(do_not_specialize=["H", "W", "HW", "K1", "C", "NBY", "NBX", "SY", "SX"])
    def _slic_round_kernel(q_ptr, seed_ptr, win_ptr, cand_ptr, lab_ptr, exc_ptr, part_ptr,
                           H, W, HW, K1, C, NBY, NBX, SY, SX, inv_scale, sw,
                           LANES_: tl.constexpr, BLOCK_: tl.constexpr, NEED_SUMS: tl.constexpr):
        bx = tl.program_id(0)
        by = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hw = b * 0 + HW  # int64
        npx = SY * SX
        blk = (b * NBY + by) * NBX + bx
        cbase = cand_ptr + blk * C
        lanes = tl.arange(0, LANES_)
        acc_n = tl.zeros([LANES_], dtype=tl.int64)
        acc_y = tl.zeros([LANES_], dtype=tl.int64)
        acc_x = tl.zeros([LANES_], dtype=tl.int64)
        acc_0 = tl.zeros([LANES_], dtype=tl.int64)
        acc_1 = tl.zeros([LANES_], dtype=tl.int64)
        acc_2 = tl.zeros([LANES_], dtype=tl.int64)
        for start in range(0, npx, BLOCK_):
            i = start + tl.arange(0, BLOCK_)
            r = i // SX
            c = i - r * SX
            y = by * SY + r
            x = bx * SX + c
            m = (i < npx) & (y < H) & (x < W)
            pix = y.to(tl.int64) * W + x
            q0 = tl.load(q_ptr + (b * 3 + 0) * hw + pix, mask=m, other=0)
            q1 = tl.load(q_ptr + (b * 3 + 1) * hw + pix, mask=m, other=0)
            q2 = tl.load(q_ptr + (b * 3 + 2) * hw + pix, mask=m, other=0)
            f0 = q0.to(tl.float32) * inv_scale
            f1 = q1.to(tl.float32) * inv_scale
            f2 = q2.to(tl.float32) * inv_scale
            yf = y.to(tl.float32)
            xf = x.to(tl.float32)
            best = tl.full([BLOCK_], float("inf"), tl.float32)
            best_j = tl.full([BLOCK_], -1, tl.int32)
            for j in range(0, C):
                k = tl.load(cbase + j)
                s = seed_ptr + (b * K1 + k) * 5
                cy = tl.load(s)
                cx = tl.load(s + 1)
                c0 = tl.load(s + 2)
                c1 = tl.load(s + 3)
                c2 = tl.load(s + 4)
                wp = win_ptr + (b * K1 + k) * 4
                ylo = tl.load(wp)
                yhi = tl.load(wp + 1)
                xlo = tl.load(wp + 2)
                xhi = tl.load(wp + 3)
                inw = (y >= ylo) & (y < yhi) & (x >= xlo) & (x < xhi)
                dy = cy - yf
                dx = cx - xf
                d = (dy * dy + dx * dx) * sw
                t0 = f0 - c0
                t1 = f1 - c1
                t2 = f2 - c2
                d = d + (t0 * t0 + t1 * t1 + t2 * t2)
                upd = inw & (d < best)
                best = tl.where(upd, d, best)
                best_j = tl.where(upd, j, best_j)
            exc = best_j < 0
            prev = tl.load(lab_ptr + b * hw + pix, mask=m, other=0)
            new = tl.load(cbase + tl.maximum(best_j, 0), mask=m, other=0).to(tl.int32)
            tl.store(lab_ptr + b * hw + pix, tl.where(exc, prev, new), mask=m)
            tl.store(exc_ptr + b * hw + pix, exc.to(tl.int8), mask=m)
            if NEED_SUMS:
                slot = tl.where(exc, LANES_ - 1, best_j)
                slot = tl.where(m, slot, LANES_)  # matches no lane: padding pixels count nowhere
                y64 = y.to(tl.int64)
                x64 = x.to(tl.int64)
                for o in range(0, C + 1):  # the C candidate slots, then the uncovered pixels' lane
                    lane_id = tl.where(o == C, LANES_ - 1, o)
                    sel = slot == lane_id
                    lane = lanes == lane_id
                    acc_n = tl.where(lane, acc_n + tl.sum(sel.to(tl.int64), axis=0), acc_n)
                    acc_y = tl.where(lane, acc_y + tl.sum(tl.where(sel, y64, 0), axis=0), acc_y)
                    acc_x = tl.where(lane, acc_x + tl.sum(tl.where(sel, x64, 0), axis=0), acc_x)
                    acc_0 = tl.where(lane, acc_0 + tl.sum(tl.where(sel, q0.to(tl.int64), 0), axis=0), acc_0)
                    acc_1 = tl.where(lane, acc_1 + tl.sum(tl.where(sel, q1.to(tl.int64), 0), axis=0), acc_1)
                    acc_2 = tl.where(lane, acc_2 + tl.sum(tl.where(sel, q2.to(tl.int64), 0), axis=0), acc_2)
        if NEED_SUMS:
            p = part_ptr + (blk * LANES_ + lanes) * 6
            tl.store(p, acc_n)
            tl.store(p + 1, acc_y)
            tl.store(p + 2, acc_x)
            tl.store(p + 3, acc_0)
            tl.store(p + 4, acc_1)
            tl.store(p + 5, acc_2)


def assign_and_sum(q: torch.Tensor, qbits: int, seeds: Seeds, grid: Grid, labels: torch.Tensor,
                   need_sums: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SLIC round on CUDA with the fused kernel.

    Args:
        q: (B, 3, H, W) int32 fixed-point colours; the kernel's features are ``float32(q) * 2**-qbits``,
            the same values the torch path computes.
        qbits: Q, the fractional bits of ``q``.
        seeds: current seeds.
        grid: the seed grid.
        labels: (B, H, W) int32 labels of the previous round; overwritten in place.
        need_sums: also return the seed sums (not needed after the last round).

    Returns:
        labels (B, H, W) int32 and, if ``need_sums``, exact seed sums (B, K, 6) int64
        ``[n, sum y, sum x, sum q0, sum q1, sum q2]``.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed: use the plain torch path (use_triton=False)")
    b, _, h, w = q.shape
    dev = q.device
    k_n = grid.n
    cand = candidates(seeds, grid).contiguous()  # (B, nby, nbx, C), K = padding
    c = cand.shape[-1]
    lanes = triton.next_power_of_2(c + 1)
    data, win = seed_tables(seeds, grid)
    labels = labels.contiguous()
    exc = torch.empty(b, h, w, dtype=torch.int8, device=dev)
    part = torch.empty(b, grid.nby, grid.nbx, lanes, 6, dtype=torch.int64, device=dev) if need_sums else \
        torch.empty(1, dtype=torch.int64, device=dev)
    _slic_round_kernel[(grid.nbx, grid.nby, b)](
        q.contiguous(), data, win, cand, labels, exc, part,
        h, w, h * w, k_n + 1, c, grid.nby, grid.nbx, grid.sy, grid.sx, 2.0**-qbits, 1.0 / (grid.step * grid.step),
        # no fused multiply-adds: the plain torch path rounds every product and sum, so must the kernel for
        # the labels to be equal bit for bit (Triton contracts a*b+c into one FMA by default)
        LANES_=lanes, BLOCK_=BLOCK, NEED_SUMS=need_sums, num_warps=8, enable_fp_fusion=False)
    if not need_sums:
        return labels, None
    return labels, combine_partial_sums(part, cand, exc, labels, q, k_n)


def combine_partial_sums(part: torch.Tensor, cand: torch.Tensor, exc: torch.Tensor, labels: torch.Tensor,
                         q: torch.Tensor, k_n: int) -> torch.Tensor:
    """Seed sums from the kernel's per-block partial sums (plain torch, any device).

    Args:
        part: (B, nby, nbx, LANES, 6) int64 partial sums per candidate slot; lane LANES-1 holds the pixels
            no window covered.
        cand: (B, nby, nbx, C) int64 candidate seeds per block (``k_n`` = padding).
        exc: (B, H, W) int8, 1 where no window covered the pixel.
        labels: (B, H, W) int32 labels after the round.
        q: (B, 3, H, W) int32 fixed-point colours.
        k_n: seeds per image (K).

    Returns:
        (B, K, 6) int64 ``[n, sum y, sum x, sum q0, sum q1, sum q2]``: what ``index_add_`` over all pixels by
        label gives, exactly.
    """
    b, h, w = labels.shape
    dev = labels.device
    c = cand.shape[-1]
    lanes = part.shape[-2]
    src = part[..., :c, :].reshape(-1, 6)
    tgt = (cand + (torch.arange(b, device=dev) * (k_n + 1)).view(b, 1, 1, 1)).reshape(-1)
    sums = torch.zeros(b * (k_n + 1), 6, dtype=torch.int64, device=dev).index_add_(0, tgt, src)
    sums = sums.view(b, k_n + 1, 6)[:, :k_n].reshape(-1, 6)  # drop the padding seed (it never wins)
    if int(part[..., lanes - 1, 0].sum()) > 0:  # pixels no window covered kept their label: add them by label
        sel = exc.reshape(-1).bool()
        flat = torch.nonzero(sel).squeeze(1)
        img, pix = flat // (h * w), flat % (h * w)
        rows = torch.stack([torch.ones_like(pix), pix // w, pix % w,
                            *(q.reshape(b, 3, -1)[img, ch, pix].long() for ch in range(3))], 1)
        sums.index_add_(0, labels.reshape(-1)[sel].long() + img * k_n, rows)
    return sums.view(b, k_n, 6)
