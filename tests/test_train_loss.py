"""superpixel_nce_loss against a dense one-hot reference written independently here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.train.slidr_loss import superpixel_nce_loss


def dense_reference(point_feats, image_feats, superpixels, pairing_images, temperature=0.07):
    """Loop/one-hot version of SLidR's loss_superpixels_average (slot = image * 150 + label)."""
    n_img, c, h, w = image_feats.shape
    n_slots = n_img * 150
    k_rows, q_rows = [], []
    for slot in range(n_slots):
        img, label = divmod(slot, 150)
        in_pairs = torch.tensor(
            [int(p[0]) == img and int(superpixels[img, p[1], p[2]]) == label for p in pairing_images],
            dtype=torch.bool,
        )
        if not in_pairs.any():
            continue
        pix = (superpixels[img] == label).float()  # dense one-hot over the image
        k_rows.append(point_feats[in_pairs].mean(0))
        q_rows.append((image_feats[img] * pix).sum((1, 2)) / pix.sum())
    k, q = torch.stack(k_rows), torch.stack(q_rows)
    return F.cross_entropy(k @ q.T / temperature, torch.arange(len(k)))


def _inputs(seed=0, n_img=3, h=12, w=20, n_pairs=150, n_labels=7, c=8):
    g = torch.Generator().manual_seed(seed)
    sp = torch.randint(0, n_labels, (n_img, h, w), generator=g)
    pairs = torch.stack(
        [
            torch.randint(0, n_img, (n_pairs,), generator=g),
            torch.randint(0, h, (n_pairs,), generator=g),
            torch.randint(0, w, (n_pairs,), generator=g),
        ],
        1,
    )
    pf = F.normalize(torch.randn(n_pairs, c, generator=g), dim=1)
    imf = F.normalize(torch.randn(n_img, c, h, w, generator=g), dim=1)
    return pf, imf, sp, pairs


def test_matches_dense_reference():
    for seed in range(3):
        pf, imf, sp, pairs = _inputs(seed)
        got = superpixel_nce_loss(pf, imf, sp, pairs)
        torch.testing.assert_close(got, dense_reference(pf, imf, sp, pairs), rtol=1e-5, atol=1e-5)


def test_empty_superpixels_dropped_and_sparse_pairs():
    pf, imf, sp, pairs = _inputs(5, n_pairs=6, n_labels=30)  # most superpixels get no point
    torch.testing.assert_close(superpixel_nce_loss(pf, imf, sp, pairs), dense_reference(pf, imf, sp, pairs))


def test_gradient_flows_to_both_sides():
    pf, imf, sp, pairs = _inputs(1)
    pf.requires_grad_(True)
    imf.requires_grad_(True)
    superpixel_nce_loss(pf, imf, sp, pairs).backward()
    assert pf.grad.abs().sum() > 0 and imf.grad.abs().sum() > 0
    assert torch.isfinite(pf.grad).all()


def test_aligned_features_give_lower_loss():
    pf, imf, sp, pairs = _inputs(2, c=32, n_labels=5)
    # 3D features equal to their pixel's 2D feature should beat random ones.
    aligned = imf[pairs[:, 0], :, pairs[:, 1], pairs[:, 2]]
    assert superpixel_nce_loss(aligned, imf, sp, pairs) < superpixel_nce_loss(pf, imf, sp, pairs)


def test_bf16_inputs_are_pooled_in_float32():
    """Under bf16 autocast (CUDA training) the pooled sums and logits stay float32: on aligned features,
    where sums grow linearly with superpixel size, bf16 pooling was off by ~4e-3; float32 is ~1e-6."""
    torch.manual_seed(0)
    n_img, h, w, n_sp, c, p = 6, 56, 104, 30, 64, 4000
    sp = torch.randint(0, n_sp, (n_img, h // 8, w // 8)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    base = F.normalize(torch.randn(n_img, n_sp, c), dim=2) + 3.0  # a shared offset: no cancellation in sums
    img_feats = base[torch.arange(n_img)[:, None, None], sp].permute(0, 3, 1, 2)
    img_feats = F.normalize(img_feats + 0.05 * torch.randn(n_img, c, h, w), dim=1)
    pairs = torch.stack([torch.randint(0, n_img, (p,)), torch.randint(0, h, (p,)), torch.randint(0, w, (p,))], 1)
    pt_feats = F.normalize(base[pairs[:, 0], sp[pairs[:, 0], pairs[:, 1], pairs[:, 2]]] + 0.05 * torch.randn(p, c),
                           dim=1)
    ref = superpixel_nce_loss(pt_feats, img_feats, sp, pairs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = superpixel_nce_loss(pt_feats.bfloat16(), img_feats.bfloat16(), sp, pairs)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-4
