"""SLidR's superpixel-pooled InfoNCE loss (reference/slidr.md §4, ``loss_superpixels_average``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def superpixel_nce_loss(
    point_feats: Tensor,
    image_feats: Tensor,
    superpixels: Tensor,
    pairing_images: Tensor,
    temperature: float = 0.07,
) -> Tensor:
    """Contrast superpixel-pooled 3D features against superpixel-pooled 2D features.

    point_feats (P, C): 3D feature of the voxel of each pair; image_feats (I, C, H, W): 2D features
    at crop resolution; superpixels (I, H, W) int labels; pairing_images (P, 3) long [image, row, col].
    Superpixel ids are offset per image (slot = image * S + label, S = max label + 1). k_s = mean of
    the 3D features of the pairs landing in s, q_s = mean of the 2D features of all pixels of s; no
    re-normalisation; superpixels without points are dropped; CE((k q^T) / T, arange), points -> pixels.
    Sums use ``index_add_`` (O(P + I*H*W)), never a dense one-hot matrix.
    """
    # Pool in float32 whatever autocast produced: a superpixel sums hundreds to thousands of pixels,
    # and bf16 accumulation (8-bit mantissa) would round most of the later additions away.
    point_feats, image_feats = point_feats.float(), image_feats.float()
    n_img, c, h, w = image_feats.shape
    sp = superpixels.long()
    s = int(sp.max()) + 1
    slots = n_img * s
    pix_slot = (sp + torch.arange(n_img, device=sp.device).view(-1, 1, 1) * s).reshape(-1)
    q_sum = image_feats.new_zeros(slots, c).index_add_(
        0, pix_slot, image_feats.permute(0, 2, 3, 1).reshape(-1, c)
    )
    q_cnt = torch.bincount(pix_slot, minlength=slots)
    img, row, col = pairing_images.unbind(1)
    pair_slot = img * s + sp[img, row, col]
    k_sum = point_feats.new_zeros(slots, point_feats.shape[1]).index_add_(0, pair_slot, point_feats)
    k_cnt = torch.bincount(pair_slot, minlength=slots)
    keep = torch.nonzero(k_cnt > 0).squeeze(1)
    k = k_sum[keep] / k_cnt[keep, None].to(k_sum.dtype)
    q = q_sum[keep] / q_cnt[keep, None].to(q_sum.dtype)
    with torch.autocast(k.device.type, enabled=False):  # float32 logits: 1/T = 14 magnifies bf16 rounding
        logits = (k @ q.T) / temperature
        return F.cross_entropy(logits, torch.arange(len(keep), device=logits.device))
