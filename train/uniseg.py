"""S2-UniSeg's QuerySD self-distillation on uniseg shards (reference/uniap.md §4): method and trainer.

A student ViT and its EMA teacher (same architecture) each end in a DINO head (``train.dino``, K
prototypes, 512 by default). For every image the teacher sees the whole image (global view); the
student sees ``local_crops`` augmented crops. The *queries* are the image's UniAP regions stored in the
shard (all levels, duplicates removed): the teacher's query is the region's mean patch token over the
global view; the student's is the mean patch token over the part of the region inside the crop
(token weights = the fraction of each student token the region covers, so a region cropped to a
sliver weighs little, and a region covering less than ``min_coverage`` tokens of a crop is not matched
there). Region pairs are matched by construction (same region id), the paper's cropped matching with
the mask identity instead of Dice. The loss is DINO's cross-entropy between the centred, sharpened
teacher distribution and the student's, averaged over matched (region, crop) pairs; the centre is an EMA
(0.9) of teacher outputs, the teacher temperature warms up linearly, and the teacher follows the
student with a cosine momentum schedule (``train.ema``). distillkit's per-token term (``token_weight``,
default 1; formerly ``dense_weight``) runs the student head on every token against the teacher
distributions of the regions covering it; without it the region queries alone made the features worse
for a linear probe in short CPU runs (docs/uniseg.md). The released code's per-pixel loss is the option
``pixel_weight`` (``query_mixture_loss``: per-token mixtures of head(query) over each view's queries).
``contrast_weight`` optionally adds identifying a crop-part's region among the image's regions.

Differences from the paper, all for a dependency-free plain-torch trainer: no ViT-Adapter and no
Mask2Former decoder (the queries are region-pooled tokens, not decoder queries, so no mask loss);
UniAP masks are computed offline by the pipeline on the pipeline's backbone rather than online on the
teacher's stride-4 map. The EMA update follows every optimiser step (``after_step``, called by the loop).

Sizes: ``small`` = ViT "tiny" (96 wide, 4 blocks, 3 heads) with patch 8 on 64 px global / 32 px local
views, head hidden 256, bottleneck 64, AdamW lr 1e-3 (5 warm-up steps), batch 8, momentum 0.99, 2000
steps by default (a few minutes on 2 idle cores; the demo runs 1500 with 4 crops: ``UnisegTrainer.demo``).
``paper`` = ViT-B/8 ("base") on 224 / 96 px views, head 3 x 2048 -> 256 -> K, AdamW lr 6.25e-4 with 10k
warm-up steps, batch 16, 160k steps, momentum 0.996.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.pipelines.manifest import Key
from distillkit.preprocess.vit import SIZES as VIT_SIZES
from distillkit.preprocess.vit import ViT, vit
from distillkit.remote import location
from distillkit.train import distributed
from distillkit.train.base import ConfigError, Trainer
from distillkit.train.dino import DINOHead, DINOLoss
from distillkit.train.ema import cosine_momentum, ema_update
from distillkit.train.loop import LoopConfig, train_loop
from distillkit.train.streaming import ShardStream, make_loader
from distillkit.train.uniseg_data import ViewConfig, collate, make_example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnisegSize:
    """Network, views and optimiser of one ``size``."""

    vit: str
    patch: int
    global_size: int
    local_size: int
    head_hidden: int
    head_bottleneck: int
    head_layers: int
    batch_size: int
    max_steps: int
    momentum: float
    loop: dict[str, Any] = field(default_factory=dict)


SIZES = {
    "small": UnisegSize("tiny", 8, 64, 32, 256, 64, 3, 8, 2000, 0.99,
                        {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.04, "warmup_steps": 5,
                         "decay_norm_and_bias": False}),
    "paper": UnisegSize("base", 8, 224, 96, 2048, 256, 3, 16, 160_000, 0.996,
                        {"optimizer": "adamw", "lr": 6.25e-4, "weight_decay": 0.04, "warmup_steps": 10_000,
                         "decay_norm_and_bias": False}),
}


class Branch(nn.Module):
    """A ViT backbone and its DINO head (student or teacher).

    Args:
        backbone: the ViT.
        head: the DINO head.
    """

    def __init__(self, backbone: ViT, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head


def pool_regions(tokens: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted mean token of each region.

    Args:
        tokens: (N, T, D) patch tokens of N views.
        weights: (N, R, T) non-negative weight of each token in each region.

    Returns:
        (N, R, D) pooled embeddings and (N, R) total weights (coverage in tokens).
    """
    cover = weights.sum(-1)
    pooled = torch.bmm(weights.to(tokens.dtype), tokens) / cover.clamp_min(1e-6)[..., None].to(tokens.dtype)
    return pooled, cover


def teacher_weights(masks: Tensor, grid: tuple[int, int]) -> Tensor:
    """Fraction of each teacher token (whole-image grid) covered by each region: (B, R, h * w).

    Args:
        masks: (B, R, M, M) 0/1 region masks over the image.
        grid: the teacher's token grid (h, w).
    """
    return F.adaptive_avg_pool2d(masks, grid).flatten(2)


def crop_weights(masks: Tensor, boxes: Tensor, grid: tuple[int, int], sub: int = 4) -> Tensor:
    """Fraction of each student token covered by each region, for crops given by boxes: (B, V, R, h * w).

    Each token is sampled at ``sub`` x ``sub`` points (bilinear on the mask grid) and averaged.

    Args:
        masks: (B, R, M, M) region masks over the image.
        boxes: (B, V, 4) crop boxes (y0, x0, y1, x1) in [0, 1] image coordinates (x0 > x1: flipped crop).
        grid: the student's token grid (h, w).
        sub: samples per token side.
    """
    B, V, _ = boxes.shape
    h, w = grid
    dev, dt = masks.device, masks.dtype
    ty = (torch.arange(h * sub, device=dev, dtype=dt) + 0.5) / (h * sub)  # 0..1 within the crop
    tx = (torch.arange(w * sub, device=dev, dtype=dt) + 0.5) / (w * sub)
    y0, x0, y1, x1 = boxes.to(dt).unbind(-1)  # (B, V)
    ys = y0[..., None] + ty * (y1 - y0)[..., None]  # (B, V, h*sub)
    xs = x0[..., None] + tx * (x1 - x0)[..., None]
    gy = ys[..., :, None].expand(B, V, h * sub, w * sub)
    gx = xs[..., None, :].expand(B, V, h * sub, w * sub)
    grid_xy = torch.stack([gx, gy], -1) * 2 - 1  # grid_sample wants (x, y) in [-1, 1]
    m = masks[:, None].expand(B, V, *masks.shape[1:]).flatten(0, 1)  # (B*V, R, M, M)
    s = F.grid_sample(m, grid_xy.flatten(0, 1), mode="bilinear", padding_mode="border", align_corners=False)
    s = F.avg_pool2d(s, sub)  # (B*V, R, h, w)
    return s.reshape(B, V, masks.shape[1], h * w)


class QuerySD(nn.Module):
    """Student + EMA teacher + DINO loss over region queries; ``loss(batch)`` for ``train.loop``.

    Args:
        student: the trained branch.
        out_dim: K.
        total_steps: length of training (momentum and temperature schedules).
        momentum: base teacher momentum.
        teacher_temp: teacher temperature after warm-up.
        warmup_teacher_temp: teacher temperature at step 0.
        teacher_temp_warmup: warm-up length in steps.
        student_temp: student temperature.
        min_coverage: least region coverage (in student tokens) for a (region, crop) pair to count.
        token_weight: weight of distillkit's per-token term (``region_token_loss``); 0 = region queries only.
        pixel_weight: weight of the released per-pixel query-mixture term (``query_mixture_loss``); 0 = off.
        nq_temp: temperature of the token-to-query attention of that term.
        contrast_weight: weight of the region-identification term (``region_contrast``); 0 = off.
        contrast_temp: its temperature.
    """

    def __init__(self, student: Branch, out_dim: int, total_steps: int, momentum: float = 0.996,
                 teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04, teacher_temp_warmup: int = 0,
                 student_temp: float = 0.1, min_coverage: float = 0.5, token_weight: float = 0.0,
                 contrast_weight: float = 0.0, contrast_temp: float = 0.1, pixel_weight: float = 0.0,
                 nq_temp: float = 0.1) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.loss_fn = DINOLoss(out_dim, teacher_temp, warmup_teacher_temp, teacher_temp_warmup, student_temp)
        self.total_steps, self.momentum, self.min_coverage = total_steps, momentum, min_coverage
        self.token_weight, self.pixel_weight, self.nq_temp = token_weight, pixel_weight, nq_temp
        self.contrast_weight, self.contrast_temp = contrast_weight, contrast_temp
        # the optimisation step, in the state dict so that schedules resume where they were
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_pairs = 0
        # The loss split into its two parts, summed since the last ``loss_terms()`` (see ``loss_terms``).
        self._terms: list[Tensor] = []
        self._token_entropy = torch.zeros(())
        self._pixel_entropy = torch.zeros(())
        self.log_every = 0  # steps per logged window of loss_terms (train_main sets the run's log_every)
        self.windows: list[dict[str, float]] = []  # loss_terms of each logged window, with its step

    def train(self, mode: bool = True) -> QuerySD:
        super().train(mode)
        self.teacher.train(False)
        return self

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        step = int(self.step)
        g, crops, boxes = batch["global"], batch["local"], batch["boxes"]
        masks, valid = batch["masks"].float(), batch["valid"]
        B, V = crops.shape[:2]
        with torch.no_grad():
            t_tok = self.teacher.backbone(g)[0]  # (B, h, w, D)
            tw = teacher_weights(masks, t_tok.shape[1:3])
            t_emb, _ = pool_regions(t_tok.flatten(1, 2), tw)
            t_logits = self.teacher.head(t_emb)  # (B, R, K)
        s_tok = self.student.backbone(crops.flatten(0, 1))[0]  # (B*V, h, w, D)
        sw = crop_weights(masks, boxes, s_tok.shape[1:3]).flatten(0, 1)  # (B*V, R, T)
        s_emb, cover = pool_regions(s_tok.flatten(1, 2), sw)
        match = valid[:, None].expand(B, V, -1).flatten(0, 1) & (cover >= self.min_coverage)
        self.last_pairs = int(match.sum())
        if self.training:
            self.step += 1
        # Without pairs (no region reaches into any crop) the loss is 0, but the step still runs the head on
        # no rows and the centre's all-reduce: under DDP every rank's graph and collectives match every step.
        pairs = self.last_pairs > 0
        s_logits = self.student.head(s_emb[match])
        t_rep = t_logits[:, None].expand(B, V, *t_logits.shape[1:]).flatten(0, 1)  # (B*V, R, K)
        if self.token_weight > 0 and pairs:
            token = self.region_token_loss(s_tok.flatten(1, 2), sw, t_rep,
                                           valid[:, None].expand(B, V, -1).flatten(0, 1), step)
        if self.pixel_weight > 0 and pairs:
            pixel = self._pixel_term(t_tok, t_emb, t_logits, valid, s_tok, s_emb, match, boxes, step)
        # updates the centre (after the per-token and per-pixel terms, which read the old one, as the release's
        # DINOLoss.forward calls update_center last: bio-mlhui/S2-UniSeg S2UniSeg.py:252) from the matched
        # pairs' teacher outputs: a region counts once per crop it reaches. Counting each region once (DINO counts each
        # teacher output once) measured +0.009 mIoU against +0.031 this way on the gain test (docs/uniseg.md).
        entropy = self._teacher_entropy(t_rep[match], step) if pairs else s_tok.new_zeros(())
        loss = self.loss_fn(s_logits, t_rep[match], step) + s_tok.sum() * 0.0
        if self.token_weight > 0 and pairs:
            loss = loss + self.token_weight * token
            entropy = entropy + self.token_weight * self._token_entropy
        if self.pixel_weight > 0 and pairs:
            loss = loss + self.pixel_weight * pixel
            entropy = entropy + self.pixel_weight * self._pixel_entropy
        contrast = s_tok.new_zeros(())
        if self.contrast_weight > 0 and pairs:
            t_emb_rep = t_emb[:, None].expand(B, V, *t_emb.shape[1:]).flatten(0, 1)
            contrast = self.contrast_weight * region_contrast(s_emb, t_emb_rep, match, valid[:, None].expand(
                B, V, -1).flatten(0, 1), self.contrast_temp)
        if self.training and self.log_every:  # the parts add up to the loss the loop logs
            self._terms.append(torch.stack([loss.detach().float(), entropy.float(), contrast.detach().float()]))
        return loss + contrast

    @torch.no_grad()
    def _teacher_entropy(self, t_logits: Tensor, step: int) -> Tensor:
        """Mean entropy of the centred, sharpened teacher distributions (before this step's centre update)."""
        q = torch.softmax((t_logits.float() - self.loss_fn.center) / self.loss_fn.temperature(step), dim=-1)
        return -(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean()

    def loss_terms(self) -> dict[str, float]:
        """The mean loss since the last call split as cross-entropy = teacher entropy + KL(teacher || student).

        Why: the DINO loss is a cross-entropy against a moving target. Its teacher-entropy part rises while
        the teacher temperature warms up (0.04 -> 0.07) and centring flattens the teacher's distributions, so
        the logged loss can rise while the student matches the teacher better (the KL part falls): the
        demo's curve rises from about 8.5 to 10.2 over the warm-up (docs/uniseg.md "Reading the loss curve").

        Returns:
            ``{"loss": ..., "teacher_entropy": ..., "kl": ...}`` (and ``"contrast"``, the weighted region-contrast
            term, when ``contrast_weight > 0``, so the parts add up to the loss) means over the training steps
            since the last call (empty when there were none).
        """
        if not self._terms:
            return {}
        ce, entropy, contrast = torch.stack(self._terms).mean(0).tolist()
        self._terms.clear()
        terms = {"loss": ce + contrast, "teacher_entropy": entropy, "kl": ce - entropy}
        return {**terms, "contrast": contrast} if self.contrast_weight > 0 else terms

    def after_step(self, step: int, max_steps: int) -> None:
        """The EMA teacher update, called by ``train.loop`` after each optimiser step.

        Args:
            step: optimiser steps done (1 after the first).
            max_steps: the run's length (the schedule spans ``total_steps``, set at construction).
        """
        ema_update(self.teacher, self.student, cosine_momentum(step - 1, self.total_steps, self.momentum))
        if self.log_every and (step % self.log_every == 0 or step == max_steps):
            terms = self.loss_terms()
            if terms:
                self.windows.append({"step": step, **terms})
                log.info("step %d loss %.3f = teacher entropy %.3f + KL %.3f (teacher temperature %.3f)", step,
                         terms["loss"], terms["teacher_entropy"], terms["kl"], self.loss_fn.temperature(step))

    def log_terms(self, step: int) -> dict[str, float]:
        """The loss of the window ending at ``step`` split into teacher entropy and KL, for ``log.jsonl``
        and ``curves.png`` (``train.loop``); empty when ``after_step`` logged no window at that step."""
        last = self.windows[-1] if self.windows else {}
        if last.get("step") != step:
            return {}
        parts = {"part 1: teacher entropy (rises as the teacher temperature warms up)": last["teacher_entropy"],
                 "part 2: KL(teacher || student), what the student lowers": last["kl"]}
        if "contrast" in last:
            parts["part 3: region contrast (weighted)"] = last["contrast"]
        return parts

    def region_token_loss(self, tokens: Tensor, weights: Tensor, t_logits: Tensor, valid: Tensor,
                          step: int) -> Tensor:
        """Per student token, DINO cross-entropy against the teacher distributions of the regions covering it.

        The target of a token is the mean of the (centred, sharpened) teacher distributions of the regions
        that cover it, weighted by coverage (regions of several levels overlap: a multi-granular target);
        tokens that no region covers by at least half are left out. distillkit's own term: the student's
        head runs on each token, which the release never does (its per-pixel maps are mixtures of head
        outputs on queries: ``query_mixture_loss``, the ``pixel_weight`` option).

        Args:
            tokens: (N, T, D) student patch tokens of N crops.
            weights: (N, R, T) region coverage of each token.
            t_logits: (N, R, K) teacher logits of the regions.
            valid: (N, R) real regions.
            step: optimisation step (teacher temperature).
        """
        w = weights * valid[..., None].to(weights.dtype)
        total = w.sum(1)  # (N, T)
        keep = total >= 0.5
        if not bool(keep.any()):
            self._token_entropy = tokens.new_zeros(())
            return tokens.sum() * 0.0
        q = torch.softmax((t_logits.float() - self.loss_fn.center) / self.loss_fn.temperature(step), dim=-1)
        target = torch.einsum("nrt,nrk->ntk", w.float(), q) / total.clamp_min(1e-6)[..., None]
        with torch.no_grad():  # its entropy: the part of this term that the student cannot lower (loss_terms)
            self._token_entropy = -(target[keep] * torch.log(target[keep].clamp_min(1e-30))).sum(-1).mean()
        logp = torch.log_softmax(self.student.head(tokens[keep]).float() / self.loss_fn.student_temp, dim=-1)
        return -(target[keep] * logp).sum(-1).mean()

    def _pixel_term(self, t_tok: Tensor, t_emb: Tensor, t_logits: Tensor, valid: Tensor, s_tok: Tensor,
                    s_emb: Tensor, match: Tensor, boxes: Tensor, step: int) -> Tensor:
        """The released per-pixel query-mixture term on this step's views (``query_mixture_loss``).

        Queries of a view are its UniAP regions pooled over that view (the teacher's on the global view, the
        student's over the part of each region inside the crop, kept where ``match``). The release computes
        them online with UniAP on each view's frozen-backbone features (bio-mlhui/S2-UniSeg S2UniSeg.py:470-510,
        :529); distillkit takes the stored regions restricted to the view.
        """
        B, V = boxes.shape[:2]
        t_map = query_mixture(t_tok.flatten(1, 2), t_emb, t_logits, valid, self.nq_temp)  # (B, T, K)
        s_q_logits = torch.zeros(*s_emb.shape[:2], t_logits.shape[-1], device=s_emb.device, dtype=t_logits.dtype)
        s_q_logits = s_q_logits.masked_scatter(match[..., None], self.student.head(s_emb[match]).to(t_logits.dtype))
        s_map = query_mixture(s_tok.flatten(1, 2), s_emb, s_q_logits, match, self.nq_temp)  # (B*V, Ts, K)
        h, w = t_tok.shape[1:3]
        loss, entropy = query_mixture_loss(
            s_map.unflatten(0, (B, V)).unflatten(2, s_tok.shape[1:3]), t_map.unflatten(1, (h, w)), boxes,
            self.loss_fn.center, self.loss_fn.temperature(step), self.loss_fn.student_temp)
        self._pixel_entropy = entropy
        return loss


def query_mixture(tokens: Tensor, queries: Tensor, q_logits: Tensor, q_valid: Tensor, temp: float) -> Tensor:
    """Per token, the mixture of its view's query head outputs weighted by a soft attention over the queries.

    As the release (bio-mlhui/S2-UniSeg S2UniSeg.py:535-561): attention = softmax over the view's queries
    of cos(token, query) / ``temp``, computed without gradient (:543-546); the token's logits = attention @
    head(query), the teacher's head on the teacher's views (:557-559), the student's on every view
    (:560-561). A view without any valid query gives zeros (the caller leaves its pixels out).

    Args:
        tokens: (N, T, D) patch tokens of N views.
        queries: (N, R, D) query embeddings of each view.
        q_logits: (N, R, K) head outputs on the queries.
        q_valid: (N, R) queries that exist in the view.
        temp: attention temperature (the release's ``nq_temperature``).

    Returns:
        (N, T, K) per-token logits.
    """
    with torch.no_grad():
        cos = torch.einsum("ntd,nrd->ntr", F.normalize(tokens.float(), dim=-1, eps=1e-10),
                           F.normalize(queries.float(), dim=-1, eps=1e-10))
        cos = cos.masked_fill(~q_valid[:, None, :], float("-inf"))
        attn = torch.softmax(cos / temp, dim=-1).nan_to_num(0.0)  # a view with no query: all-zero attention
    return torch.einsum("ntr,nrk->ntk", attn, q_logits.float())


def query_mixture_loss(s_map: Tensor, t_map: Tensor, boxes: Tensor, center: Tensor, t_temp: float,
                       s_temp: float) -> tuple[Tensor, Tensor]:
    """DINO cross-entropy per pixel of the views' overlap between the teacher's and the student's mixture maps.

    Release steps (bio-mlhui/S2-UniSeg S2UniSeg.py): teacher logits centred and sharpened over K before any
    resampling, ``softmax((t - center) / t_temp)`` (:212); student logits over ``student_temp`` (:208);
    both maps resampled onto the overlap's grid with ``grid_sample`` (bilinear, border padding,
    align_corners=False, the teacher's side detached: :244-245); per pixel ``-sum_k q log_softmax(s)``
    (:248); mean over every pixel of every (teacher view, student view) pair of the rank's batch
    (:250-251). Here the teacher's view is the whole image, so the overlap is the crop: the common grid is
    the student's own token grid (identity resampling for the student) and the teacher's map is sampled at
    those tokens' centres. The release sizes its grid with ``box_to_grid(box, K, h)`` (:186-198, :237-239),
    so its height follows K: not reproduced. Crops of an image without any query (an all-zero student map)
    are left out.

    Args:
        s_map: (B, V, hs, ws, K) student mixture logits of each crop.
        t_map: (B, h, w, K) teacher mixture logits of each whole image.
        boxes: (B, V, 4) crops as (y0, x0, y1, x1) in [0, 1] image coordinates (x0 > x1: flipped).
        center: (1, K) teacher centre.
        t_temp: teacher temperature.
        s_temp: student temperature.

    Returns:
        The loss and, without gradient, the mean entropy of the teacher targets (its part the student cannot lower).
    """
    B, V, hs, ws, K = s_map.shape
    q = torch.softmax((t_map.float() - center.float()) / t_temp, dim=-1).permute(0, 3, 1, 2)  # (B, K, h, w)
    dev = s_map.device
    ty = (torch.arange(hs, device=dev, dtype=torch.float32) + 0.5) / hs
    tx = (torch.arange(ws, device=dev, dtype=torch.float32) + 0.5) / ws
    y0, x0, y1, x1 = boxes.float().unbind(-1)  # (B, V)
    gy = (y0[..., None] + ty * (y1 - y0)[..., None])[..., :, None].expand(B, V, hs, ws)
    gx = (x0[..., None] + tx * (x1 - x0)[..., None])[..., None, :].expand(B, V, hs, ws)
    grid = (torch.stack([gx, gy], -1) * 2 - 1).flatten(1, 2)  # (B, V*hs, ws, 2), (x, y) in [-1, 1]
    qs = F.grid_sample(q, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, K, V*hs, ws)
    qs = qs.reshape(B, K, V, hs, ws).permute(0, 2, 3, 4, 1)  # (B, V, hs, ws, K)
    logp = torch.log_softmax(s_map.float() / s_temp, dim=-1)
    keep = s_map.detach().abs().flatten(2).amax(-1) > 0  # (B, V): crops with at least one query
    ce = -(qs * logp).sum(-1)[keep]
    with torch.no_grad():
        entropy = -(qs * torch.log(qs.clamp_min(1e-30))).sum(-1)[keep].mean()
    if not bool(keep.any()):
        return s_map.sum() * 0.0, s_map.new_zeros(())
    return ce.mean(), entropy


def region_contrast(s_emb: Tensor, t_emb: Tensor, match: Tensor, valid: Tensor, temp: float) -> Tensor:
    """Cross-entropy of identifying, among the image's regions, the teacher region a student crop-part came from.

    For each matched (crop, region) pair the logits are the cosines between the student's pooled embedding
    and the teacher's embeddings of every valid region of that image, over ``temp``; the target is the
    region itself (the cropped matching of QuerySD read as a classification over the image's queries).

    Args:
        s_emb: (N, R, D) student region embeddings per crop.
        t_emb: (N, R, D) teacher region embeddings of each crop's image.
        match: (N, R) pairs that count.
        valid: (N, R) the image's real regions.
        temp: temperature.
    """
    s = F.normalize(s_emb.float(), dim=-1)
    t = F.normalize(t_emb.float(), dim=-1)
    logits = torch.einsum("nrd,nqd->nrq", s, t) / temp
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    target = torch.arange(s.shape[1], device=s.device).expand(s.shape[0], -1)
    return F.cross_entropy(logits[match], target[match])


def build_backbone(size: str, seed: int, vit_size: str | None = None, patch: int | None = None) -> ViT:
    """The student's ViT at its seed's initialisation (the random-init baseline of the evaluation).

    Args:
        size: a key of ``SIZES``.
        seed: initialisation seed.
        vit_size: ViT size name overriding the size's.
        patch: patch size overriding the size's.
    """
    s = SIZES[size]
    torch.manual_seed(seed)
    return vit(vit_size or s.vit, patch=patch or s.patch, img_size=s.global_size)


def initial_backbone(config: dict[str, Any]) -> ViT:
    """The ViT training starts from: ``init_checkpoint`` when given (the paper starts from DINO), else the
    seed's random initialisation. It is also the baseline the evaluation compares the distilled network with.

    Args:
        config: resolved trainer configuration.
    """
    if config.get("init_checkpoint"):
        from distillkit.preprocess.vit import load_vit

        return load_vit(config["init_checkpoint"]).train()
    return build_backbone(config["size"], config["seed"], config.get("vit"), config.get("patch"))


def build_method(config: dict[str, Any], total_steps: int) -> QuerySD:
    """The QuerySD module of a resolved configuration.

    Args:
        config: resolved trainer configuration.
        total_steps: training length in steps.
    """
    s = SIZES[config["size"]]
    backbone = initial_backbone(config)
    head = DINOHead(backbone.embed_dim, config["out_dim"], s.head_layers, config["head_hidden"] or s.head_hidden,
                    s.head_bottleneck)
    warm = int(round(config["teacher_temp_warmup"] * total_steps))
    return QuerySD(Branch(backbone, head), config["out_dim"], total_steps,
                   momentum=config["momentum"] if config["momentum"] is not None else s.momentum,
                   teacher_temp=config["teacher_temp"], warmup_teacher_temp=config["warmup_teacher_temp"],
                   teacher_temp_warmup=warm, student_temp=config["student_temp"],
                   min_coverage=config["min_coverage"], token_weight=config["token_weight"],
                   contrast_weight=config["contrast_weight"], pixel_weight=config["pixel_weight"],
                   nq_temp=config["nq_temp"])


def view_config(config: dict[str, Any]) -> ViewConfig:
    """The views of a resolved configuration.

    Args:
        config: resolved trainer configuration.
    """
    s = SIZES[config["size"]]
    return ViewConfig(global_size=s.global_size, local_size=s.local_size, local_crops=config["local_crops"],
                      scale=tuple(config["local_scale"]), max_regions=config["max_regions"])


def _transform(sample: dict[str, Any], rng: np.random.Generator, gen: torch.Generator, cfg: ViewConfig
               ) -> dict[str, Any]:
    from distillkit.pipelines.uniseg import image_field

    return make_example(sample[image_field(sample)], np.asarray(sample["uniap.npy"]), cfg, rng)


def _check(sample: dict[str, Any]) -> None:
    levels = sample["uniap.npy"]
    if not isinstance(levels, np.ndarray) or levels.ndim != 3:
        raise ValueError("uniap.npy is not an (L, h, w) array")


def make_stream(shards: Path, config: dict[str, Any], strict: bool = False, rank: int = 0, world_size: int = 1
                ) -> ShardStream:
    """The training stream: shuffled shards and samples, one example per image.

    Args:
        shards: a uniseg shard directory.
        config: resolved trainer configuration.
        strict: raise on the first bad sample.
        rank: this process's rank.
        world_size: number of ranks.
    """
    return ShardStream(shards, seed=config["seed"], shuffle_buffer=64, rank=rank, world_size=world_size,
                       required=["uniap.npy"], check=_check,
                       transform=functools.partial(_transform, cfg=view_config(config)), strict=strict,
                       on_corrupt=config.get("on_corrupt_shard", "stop"))


def train_main(shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu", resume: bool = False,
               strict: bool = False) -> dict[str, Any]:
    """Train QuerySD on ``shards``; checkpoints and the run log go to ``out``. Returns the final metrics.

    Args:
        shards: a uniseg shard directory.
        out: run directory (None writes nothing).
        config: resolved trainer configuration (``UnisegTrainer.resolve_config``).
        device: "cpu" or "cuda".
        resume: continue from ``out/latest.pt``.
        strict: stop at the first bad sample.
    """
    s = SIZES[config["size"]]
    steps = config["max_steps"] or s.max_steps
    batch_size = config["batch_size"] or s.batch_size
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    method = build_method(config, steps)
    ranks = distributed.ranks()  # under torchrun each rank reads its own shards
    # location(): a URL folder (s3://, https://) stays a string, which Path() would mangle (remote.location)
    stream = make_stream(location(shards), config, strict, rank=ranks.rank, world_size=ranks.world_size)
    loop = dict(s.loop)
    if config["lr"] is not None:
        loop["lr"] = config["lr"]
    cfg = LoopConfig(max_steps=steps, device=device, out=Path(out) if out is not None else None, resume=resume,
                     log_every=config["log_every"], ckpt_every=max(1, steps // 4) if steps >= 8 else 0,
                     run_config=config, bf16=config["precision"] != "fp32", grad_clip=3.0, global_batch=batch_size,
                     sync_batchnorm=bool(UnisegTrainer.effective_config(config)["sync_batchnorm"]), **loop)

    def batches() -> Any:
        return make_loader(stream, distributed.rank_batch(batch_size), collate,
                           num_workers=config["num_workers"], device=device,
                           timeout=600 if config["num_workers"] else 0)

    method.log_every = config["log_every"]
    metrics = train_loop(method, batches, cfg, batch_size=lambda b: len(b["global"]))
    metrics.update(size=config["size"], seed=config["seed"], bad_samples=stream.bad_samples,
                   matched_pairs_last_step=method.last_pairs)
    if method.windows:
        # The loss is a cross-entropy against a moving target: its teacher-entropy part rises with the teacher
        # temperature's warm-up, so the first and last windows' split say whether the student still learns
        # (KL falls) when the loss curve rises (QuerySD.loss_terms).
        first, last = method.windows[0], method.windows[-1]
        metrics.update(teacher_entropy_first=first["teacher_entropy"], kl_first=first["kl"],
                       teacher_entropy=last["teacher_entropy"], kl=last["kl"])
    return metrics


class UnisegTrainer(Trainer):
    """``distillkit train uniseg``: the keys below plus the common ones (``train.base``)."""

    name = "uniseg"
    pipeline = "uniseg"
    summary = "S2-UniSeg QuerySD: EMA-teacher self-distillation of UniAP region queries (DINO loss)"
    schema = {
        "size": Key(str, "small", choices=tuple(SIZES), doc="small (tiny ViT/8, CPU, demo) or paper (ViT-B/8)"),
        "max_steps": Key(int, None, doc="optimiser steps (default: small 2000, paper 160000)"),
        "batch_size": Key(int, None, doc="images per step (default: small 8, paper 16)"),
        "vit": Key(str, None, choices=tuple(VIT_SIZES), doc="ViT size overriding the size's (tiny, small, base)"),
        "init_checkpoint": Key("existing_path", None,
                               doc="ViT checkpoint the student and teacher start from (a DINO backbone, as the paper; "
                                   "its architecture replaces vit and patch); the evaluation's baseline then is it"),
        "patch": Key(int, None, doc="ViT patch size overriding the size's (8)"),
        "out_dim": Key(int, 512, doc="K, prototypes of the DINO head (paper 512)"),
        "head_hidden": Key(int, None, doc="DINO head hidden width (default: small 256, paper 2048)"),
        "local_crops": Key(int, 2, doc="student crops per image (paper delta = 2)"),
        "local_scale": Key(list, [0.05, 0.4], doc="crop area range as a fraction of the image (paper 0.05-0.4)"),
        "max_regions": Key(int, 32, doc="UniAP regions (all levels, deduplicated) used per image"),
        "min_coverage": Key(float, 0.5, doc="least region coverage of a crop, in student tokens, to match it"),
        "token_weight": Key(float, 1.0, doc="weight of distillkit's per-token term (the student head on every "
                                           "token against the covering regions' teacher targets; not in the "
                                           "release); 0 = off"),
        "pixel_weight": Key(float, 0.0, doc="weight of the released per-pixel loss (query mixtures of head outputs "
                                           "over each view's UniAP queries, S2UniSeg.py:535-561); 0 = off"),
        "nq_temp": Key(float, 0.1, doc="temperature of that loss's token-to-query attention (release: nq_temperature, "
                                      "value not released)"),
        "dense_weight": Key(float, None, doc="old name of token_weight (renamed: it is not the released per-pixel "
                                            "loss); still read, with a warning, so old configs and checkpoints load"),
        "contrast_weight": Key(float, 0.0, doc="weight of the region-identification term (region_contrast); 0 = off"),
        "momentum": Key(float, None, doc="base EMA momentum, cosine to 1 (default: small 0.99, paper 0.996)"),
        "teacher_temp": Key(float, 0.07, doc="teacher temperature after warm-up"),
        "warmup_teacher_temp": Key(float, 0.04, doc="teacher temperature at step 0"),
        "teacher_temp_warmup": Key(float, 0.3, doc="teacher-temperature warm-up, fraction of the steps"),
        "student_temp": Key(float, 0.1, doc="student temperature"),
        "lr": Key(float, None, doc="peak AdamW learning rate (default: small 1e-3, paper 6.25e-4)"),
        "precision": Key(str, "bf16", choices=("bf16", "fp32"), doc="CUDA autocast (CPU runs are fp32)"),
    }
    # docs/uniseg.md "The demo": on the 200 medium images, 1500 steps with 4 crops per image gave +0.035 and
    # +0.032 probe mIoU (seeds 0, 1) where 600 steps with the default 2 crops gave +0.006: the gain grows with
    # the matched (region, crop) pairs seen, and 4 crops add pairs for less than twice the step's cost (the
    # teacher's pass is shared). One loader worker overlaps the crops' decoding and augmentation (a quarter
    # of the step in the main process) with training on the second core.
    demo = {"max_steps": 1500, "local_crops": 4, "log_every": 150, "num_workers": 1}
    demo_eval = {"epochs": 50}
    eval_schema = {
        "epochs": Key(int, 50, doc="epochs of the linear probe"),
        "size": Key(int, None, doc="evaluation image side in px (default: the trainer's global view)"),
    }

    @classmethod
    def check_config(cls, config: dict[str, Any], where: str | Path) -> None:
        super().check_config(config, where)
        sc = config["local_scale"]
        if len(sc) != 2 or not all(isinstance(v, (int, float)) for v in sc) or not 0 < sc[0] <= sc[1] <= 1:
            raise ConfigError(where, "local_scale", f"must be [min, max] with 0 < min <= max <= 1, got {sc}")
        for key in ("out_dim", "local_crops", "max_regions"):
            if config[key] < 1:
                raise ConfigError(where, key, "must be >= 1")
        if config["momentum"] is not None and not 0 <= config["momentum"] <= 1:
            raise ConfigError(where, "momentum", "must be in [0, 1]")
        for key in ("token_weight", "pixel_weight", "contrast_weight"):
            if config[key] < 0:
                raise ConfigError(where, key, "must be >= 0")
        if not config["nq_temp"] > 0:
            raise ConfigError(where, "nq_temp", "must be > 0")
        if config["dense_weight"] is not None:
            # The old name of token_weight: configs and checkpoints written before the rename still load, but
            # setting both to different values is ambiguous.
            if config["token_weight"] not in (cls.schema["token_weight"].default, config["dense_weight"]):
                raise ConfigError(where, "dense_weight", "is the old name of token_weight; set only token_weight")
            log.warning("%s: dense_weight is the old name of token_weight (distillkit's per-token term, not the "
                        "released per-pixel loss: pixel_weight); reading it as token_weight", where)
            config["token_weight"], config["dense_weight"] = config["dense_weight"], None

    @classmethod
    def effective_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``config`` with the size's defaults filled in (``Trainer.effective_config``).

        Args:
            config: a resolved configuration.
        """
        out = super().effective_config(config)
        s = SIZES[out["size"]]
        fill = {"max_steps": s.max_steps, "batch_size": s.batch_size, "head_hidden": s.head_hidden,
                "momentum": s.momentum, "lr": s.loop["lr"], "patch": s.patch}
        for key, value in fill.items():
            if out.get(key) is None:
                out[key] = value
        if out.get("vit") is None and out.get("init_checkpoint") is None:  # a checkpoint sets its own ViT
            out["vit"] = s.vit
        if out.get("dense_weight") is None:  # the old name: not printed unless a config still uses it
            out.pop("dense_weight", None)
        # sync_batchnorm keeps the base default, False: there is no BatchNorm anywhere (the release's heads are
        # built with use_bn=False, S2UniSeg.py:318, :327, and its ViT has none), so nothing to synchronise
        return out

    @classmethod
    def config_sources(cls, config: dict[str, Any]) -> dict[str, str]:
        """Where each value of ``effective_config(config)`` comes from (``Trainer.config_sources``).

        Args:
            config: a resolved configuration.
        """
        rel = "bio-mlhui/S2-UniSeg S2UniSeg.py"
        no_cfg = "distillkit's choice: the release's configuration files are not published (only S2UniSeg.py, " \
                 "FastUniAP.py, utils.py at 9049574)"
        src = {
            "out_dim": f"{no_cfg}; 512 prototypes is the paper's K",
            "local_crops": f"{rel}:346 (local_crop_number, value in the unreleased config); paper delta = 2",
            "student_temp": f"{rel}:355 (student_temp = 0.1)",
            "teacher_temp": f"{rel}:352 (teacher_temp from the unreleased config); 0.07 is DINO's",
            "warmup_teacher_temp": f"{rel}:175-179 (linear warm-up schedule; value unreleased); 0.04 is DINO's",
            "teacher_temp_warmup": f"{no_cfg}; a fraction of the steps instead of epochs (:176)",
            "momentum": f"{rel}:460-465 (cosine from momentum_teacher to 1; value unreleased)",
            "nq_temp": f"{rel}:546 (softmax(cos / nq_temperature); value unreleased): 0.1 is distillkit's",
            "pixel_weight": "distillkit's choice: 0 = off by default (the release's only loss is this one, "
                            f"{rel}:568-572; distillkit's default recipe was measured with token_weight)",
            "token_weight": "distillkit's choice: its per-token term, not in the release (docs/uniseg.md)",
            "contrast_weight": "distillkit's choice: optional region-identification term, not in the release",
            "min_coverage": "distillkit's choice: pairs whose region covers under half a student token are noise",
            "max_regions": "distillkit's choice: bounds the per-image query count",
            "lr": ("distillkit's choice: the value (the release publishes none) and no batch scaling (its "
                   f"{rel}:443 scales by the per-process batch, which would tie the lr to the GPU count)"),
            "sync_batchnorm": f"{rel}:318, :327 (heads use_bn=False; no BatchNorm to synchronise)",
            "precision": f"{rel}:438-440 (use_fp16 option: GradScaler fp16); bf16 is distillkit's choice",
            "vit": f"{rel}:330 (dinov1_vits8 head weights; backbone from the unreleased config)",
            "patch": "the paper's ViT-*/8",
            "max_steps": f"{no_cfg}; small: a few CPU minutes",
            "batch_size": f"{no_cfg}; the release's lr rule ({rel}:443) reads the per-process batch",
        }
        if config["size"] == "paper":
            src["head_hidden"] = f"{rel}:320-322 (DINOHead nlayers=3, hidden_dim=2048, bottleneck_dim=256)"
        return src

    def train(self, shards: Path, out: Path | None, config: dict[str, Any], device: str = "cpu",
              resume: bool = False, strict: bool = False) -> dict[str, Any]:
        return train_main(shards, out, config, device=device, resume=resume, strict=strict)

    def evaluate(self, checkpoint: Path | None, shards: list[Path], config: dict[str, Any],
                 device: str = "cpu", options: dict[str, Any] | None = None) -> dict[str, Any]:
        from distillkit.train.uniseg_eval import evaluate

        options = self.resolve_eval_options(options or {})
        return evaluate(checkpoint, shards, config, device=device, epochs=options["epochs"], size=options["size"])

    def format_eval(self, result: dict[str, Any]) -> str:
        from distillkit.train.uniseg_eval import format_result

        return format_result(result)

    def headline(self, result: dict[str, Any]) -> dict[str, Any]:
        from distillkit.train.uniseg_eval import headline

        return headline(result)
