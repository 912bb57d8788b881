"""The released per-pixel query-mixture loss (train.uniseg.query_mixture*) against plain loops."""

from __future__ import annotations

import math

import torch

from distillkit.train.uniseg import query_mixture, query_mixture_loss


def loop_mixture(tokens, queries, q_logits, q_valid, temp):
    """Per view and token: softmax over the valid queries of cos / temp, then the weighted sum of logits."""
    N, T, _ = tokens.shape
    out = torch.zeros(N, T, q_logits.shape[-1], dtype=torch.float64)
    for n in range(N):
        idx = [r for r in range(queries.shape[1]) if q_valid[n, r]]
        for t in range(T):
            if not idx:
                continue
            a = tokens[n, t].double()
            cos = [float(a @ queries[n, r].double() / (a.norm() * queries[n, r].double().norm())) for r in idx]
            e = [math.exp(c / temp) for c in cos]
            for w, r in zip(e, idx, strict=True):
                out[n, t] += w / sum(e) * q_logits[n, r].double()
    return out


def bilinear_border(img, y, x):
    """img (h, w, K) sampled at pixel-centre coordinates (y, x), clamped to the border (no grid_sample)."""
    h, w = img.shape[:2]
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = y - y0, x - x0
    return ((1 - fy) * (1 - fx) * img[y0, x0] + (1 - fy) * fx * img[y0, x1]
            + fy * (1 - fx) * img[y1, x0] + fy * fx * img[y1, x1])


def loop_loss(s_map, t_map, boxes, center, t_temp, s_temp):
    B, V, hs, ws, K = s_map.shape
    h, w = t_map.shape[1:3]
    losses = []
    for b in range(B):
        q_img = torch.softmax((t_map[b].double() - center[0].double()) / t_temp, -1)  # centred, sharpened first
        for v in range(V):
            if not s_map[b, v].abs().max() > 0:
                continue
            y0, x0, y1, x1 = boxes[b, v].tolist()
            for i in range(hs):
                for j in range(ws):
                    fy, fx = y0 + (i + 0.5) / hs * (y1 - y0), x0 + (j + 0.5) / ws * (x1 - x0)  # in [0, 1]
                    q = bilinear_border(q_img, fy * h - 0.5, fx * w - 0.5)
                    logp = torch.log_softmax(s_map[b, v, i, j].double() / s_temp, -1)
                    losses.append(-(q * logp).sum())
    return torch.stack(losses).mean()


def test_query_mixture_and_loss_match_loops():
    g = torch.Generator().manual_seed(0)
    N, T, R, D, K = 3, 6, 4, 5, 7
    tokens, queries = torch.randn(N, T, D, generator=g), torch.randn(N, R, D, generator=g)
    q_logits = torch.randn(N, R, K, generator=g)
    q_valid = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = query_mixture(tokens, queries, q_logits, q_valid, 0.3)
    torch.testing.assert_close(got.double(), loop_mixture(tokens, queries, q_logits, q_valid, 0.3), rtol=1e-5,
                               atol=1e-5)
    assert (got[2] == 0).all()  # no query: zeros

    B, V, hs, ws, h, w = 2, 3, 3, 2, 5, 4
    s_map = torch.randn(B, V, hs, ws, K, generator=g, requires_grad=True)
    with torch.no_grad():
        s_map[1, 2] = 0.0  # a crop without queries is left out
    t_map = torch.randn(B, h, w, K, generator=g)
    # (y0, x0, y1, x1); the second crop flipped (x0 > x1); the third touching the border
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.7], [0.3, 0.9, 0.8, 0.4], [0.0, 0.0, 1.0, 1.0]],
                          [[0.5, 0.5, 0.9, 0.8], [0.05, 0.6, 0.35, 0.1], [0.2, 0.2, 0.4, 0.4]]])
    center = torch.randn(1, K, generator=g)
    loss, entropy = query_mixture_loss(s_map, t_map, boxes, center, 0.07, 0.1)
    ref = loop_loss(s_map.detach(), t_map, boxes, center, 0.07, 0.1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    assert 0 < float(entropy) < math.log(K)
    loss.backward()
    assert s_map.grad[:, :2].abs().sum() > 0 and (s_map.grad[1, 2] == 0).all()
    # the teacher side is a target: centring matters (a different centre gives a different loss)
    other = query_mixture_loss(s_map, t_map, boxes, center * 0, 0.07, 0.1)[0]
    assert float(other.detach()) != float(loss.detach())
