"""EoMT pieces: Hungarian matching and the Mask2Former loss against brute force / numpy formulas, the mask
annealing schedule (official EoMT's windows, probabilities by completed step at hand-computed points), masked
attention, annealed-training == plain-ViT inference, and masked inference without annealing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from meddino.models import build_backbone
from meddino.tasks.seg.eomt import (
    EoMT,
    LayerNorm2d,
    anneal_windows,
    MaskClassificationLoss,
    default_num_blocks,
    importance_points,
    point_sample,
    mask_annealing_probs,
    num_upscale_blocks,
    semantic_map_scores,
    semantic_to_targets,
)
from meddino.tasks.seg.heads import SegmentationModel


# ---------------------------------------------------------------------------------------------- references
def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_bce(x, t, w):
    p = _np_sigmoid(x)
    eps = 1e-12
    loss = -(t * np.log(p + eps) + (1 - t) * np.log(1 - p + eps))
    return float((loss * w).sum() / max(w.sum(), 1.0))


def _np_dice(x, t, w):
    p = _np_sigmoid(x) * w
    tt = t * w
    return float(1 - (2 * (p * tt).sum() + 1) / (p.sum() + tt.sum() + 1))


def _np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _brute_force(mask_logits, class_logits, labels, masks, valid, wc=2.0, wm=5.0, wd=5.0):
    """Minimum total cost over every injective query -> target assignment (plain loops)."""
    q, t = mask_logits.shape[0], len(labels)
    cost = np.zeros((q, t))
    for i in range(q):
        prob = _np_softmax(class_logits[i])
        for j in range(t):
            x, tgt = mask_logits[i].ravel(), masks[j].ravel()
            cost[i, j] = -wc * prob[labels[j]] + wm * _np_bce(x, tgt, valid.ravel()) + wd * _np_dice(x, tgt, valid.ravel())
    best, best_perm = math.inf, None
    for perm in itertools.permutations(range(q), t):
        c = sum(cost[perm[j], j] for j in range(t))
        if c < best:
            best, best_perm = c, perm
    return best, best_perm, cost


# ---------------------------------------------------------------------------------------------- matching / loss
def test_matching_recovers_permutation_and_loss_is_zero_at_optimum():
    h = w = 16
    sem = torch.zeros(h, w, dtype=torch.long)
    sem[:, : w // 2] = 1
    sem[:, w // 2 :] = 2
    labels, masks = semantic_to_targets(sem, num_classes=3, ignore_index=255)
    assert labels.tolist() == [1, 2]
    big = 30.0
    q = 4
    mask_logits = torch.full((1, q, h, w), -big)
    mask_logits[0, 0] = big * (2 * masks[1] - 1)  # query 0 = target 1 (class 2, right half)
    mask_logits[0, 1] = big * (2 * masks[0] - 1)  # query 1 = target 0 (class 1, left half)
    class_logits = torch.full((1, q, 4), -big)
    class_logits[0, 0, 2] = big
    class_logits[0, 1, 1] = big
    class_logits[0, 2:, 3] = big  # the others say "no object"
    crit = MaskClassificationLoss(num_classes=3, num_points=h * w)  # dense: every pixel
    rows, cols = crit.match(mask_logits[0], class_logits[0], labels, masks, sem != 255)
    assert dict(zip(cols.tolist(), rows.tolist())) == {1: 0, 0: 1}
    parts = crit.single(mask_logits, class_logits, [(labels, masks, sem != 255)])
    assert float(parts["loss_mask"]) < 1e-6
    assert float(parts["loss_dice"]) < 1e-3
    assert float(parts["loss_class"]) < 1e-6
    # swapping the two queries' class predictions makes the optimum cost strictly worse
    swapped = class_logits.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert float(crit.single(mask_logits, swapped, [(labels, masks, sem != 255)])["loss"]) > 1.0


def test_matching_is_minimum_cost_against_brute_force():
    g = torch.Generator().manual_seed(0)
    h = w = 8
    crit = MaskClassificationLoss(num_classes=4, num_points=h * w)
    for trial in range(5):
        sem = torch.randint(0, 4, (h, w), generator=g)
        sem[0, :3] = 255  # a few ignored pixels
        labels, masks = semantic_to_targets(sem, 4, 255)
        valid = sem != 255
        mask_logits = torch.randn(5, h, w, generator=g) * 2
        class_logits = torch.randn(5, 5, generator=g)
        rows, cols = crit.match(mask_logits, class_logits, labels, masks, valid)
        best, _, cost = _brute_force(mask_logits.numpy(), class_logits.numpy(), labels.numpy(), masks.numpy(),
                                     valid.numpy().astype(float))
        got = sum(cost[r, c] for r, c in zip(rows, cols))
        assert len(cols) == len(labels)
        assert got == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_loss_matches_numpy_formula_dense():
    g = torch.Generator().manual_seed(1)
    h = w = 8
    b, q, c = 2, 4, 3
    crit = MaskClassificationLoss(num_classes=c, num_points=h * w, no_object_weight=0.1)
    sems = torch.randint(0, c, (b, h, w), generator=g)
    sems[1, 2:4, 2:4] = 255
    mask_logits = torch.randn(b, q, h, w, generator=g)
    class_logits = torch.randn(b, q, c + 1, generator=g)
    targets = []
    for s in sems:
        lab, m = semantic_to_targets(s, c, 255)
        targets.append((lab, m, s != 255))
    parts = crit.single(mask_logits, class_logits, targets)

    # independent: brute-force matching, then the formulas written out with numpy
    ce_num = ce_den = 0.0
    bce_sum = dice_sum = 0.0
    n_masks = 0
    for i, (lab, m, valid) in enumerate(targets):
        _, perm, _ = _brute_force(mask_logits[i].numpy(), class_logits[i].numpy(), lab.numpy(), m.numpy(),
                                  valid.numpy().astype(float))
        target_cls = [c] * q
        for j, qi in enumerate(perm):
            target_cls[qi] = int(lab[j])
            x, t, v = mask_logits[i, qi].numpy().ravel(), m[j].numpy().ravel(), valid.numpy().ravel().astype(float)
            bce_sum += _np_bce(x, t, v)
            dice_sum += _np_dice(x, t, v)
            n_masks += 1
        for qi in range(q):
            wgt = 0.1 if target_cls[qi] == c else 1.0
            ce_num += wgt * -math.log(_np_softmax(class_logits[i, qi].numpy())[target_cls[qi]])
            ce_den += wgt
    assert float(parts["loss_class"]) == pytest.approx(ce_num / ce_den, rel=1e-5)
    assert float(parts["loss_mask"]) == pytest.approx(bce_sum / n_masks, rel=1e-5)
    assert float(parts["loss_dice"]) == pytest.approx(dice_sum / n_masks, rel=1e-5)
    expected = 5 * bce_sum / n_masks + 5 * dice_sum / n_masks + 2 * ce_num / ce_den
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5)


def test_deep_supervision_sums_levels_and_sampled_mode_runs():
    g = torch.Generator().manual_seed(2)
    sem = torch.randint(0, 3, (2, 32, 32), generator=g)
    level = {"pred_masks": torch.randn(2, 5, 8, 8, generator=g, requires_grad=True),
             "pred_logits": torch.randn(2, 5, 4, generator=g, requires_grad=True)}
    dense = MaskClassificationLoss(num_classes=3, num_points=32 * 32)  # every pixel: deterministic
    total = dense({**level, "aux": [dict(level), dict(level)]}, sem)
    single = dense({**level, "aux": []}, sem)
    for key in ("loss", "loss_mask", "loss_dice", "loss_class"):
        assert float(total[key].detach()) == pytest.approx(3 * float(single[key].detach()), rel=1e-5)
    sampled = MaskClassificationLoss(num_classes=3, num_points=64)  # 32x32 targets > 64 points: sampled
    loss = sampled({**level, "aux": [dict(level)]}, sem)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(level["pred_masks"].grad).all()
    assert level["pred_masks"].grad.abs().sum() > 0


def test_importance_points_pick_uncertain_locations():
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[0, 0, :, 8:] = -10.0
    logits[0, 0, :, 5:11] = 0.0  # an uncertain band around the boundary (~37% of the image)
    torch.manual_seed(0)
    pts = importance_points(logits, num_points=100, oversample=3.0, importance=0.75)
    assert pts.shape == (1, 100, 2) and pts.min() >= 0 and pts.max() <= 1
    picked = point_sample(logits, pts[:, :75]).abs().mean()
    uniform = point_sample(logits, torch.rand(1, 2000, 2)).abs().mean()
    assert picked < 0.3 * uniform  # the importance part sits where |logit| is small
    # and point_sample itself is bilinear interpolation at pixel centres: (x + 0.5) / W
    centre = torch.tensor([[[(3 + 0.5) / 16, (5 + 0.5) / 16]]])
    assert float(point_sample(logits, centre)) == pytest.approx(float(logits[0, 0, 5, 3]))


# ---------------------------------------------------------------------------------------------- schedule
def test_anneal_windows_are_the_official_configs():
    """The start / end step lists of official EoMT's configs, from the step at which annealing ends:
    ADE20K large (L2 4) and giant (L2 5), COCO panoptic small / base (L2 3)."""
    ade_l = anneal_windows(4, 32600)
    assert [w[0] for w in ade_l] == [6520, 13040, 19560, 26080]
    assert [w[1] for w in ade_l] == [13040, 19560, 26080, 32600]
    ade_g = anneal_windows(5, 32600)
    assert [w[0] for w in ade_g] == [6520, 11410, 16300, 21190, 26080]
    assert [w[1] for w in ade_g] == [13040, 17930, 22820, 27710, 32600]
    coco_s = anneal_windows(3, 73910)
    assert [w[0] for w in coco_s] == [14782, 36955, 59128]
    assert [w[1] for w in coco_s] == [29564, 51737, 73910]
    assert anneal_windows(1, 50) == [(10, 50)]  # one masked block: [end / 5, end]
    with pytest.raises(ValueError):
        anneal_windows(3, 0)


# windows of L2 = 3 ending at step 100: (20, 40), (50, 70), (80, 100)
@pytest.mark.parametrize(
    "step, expected",
    [
        (0, [1, 1, 1]),
        (19, [1, 1, 1]),
        (20, [1, 1, 1]),  # (1 - 0)^0.9
        (30, [0.5**0.9, 1, 1]),
        (39, [0.05**0.9, 1, 1]),
        (40, [0, 1, 1]),
        (45, [0, 1, 1]),
        (55, [0, 0.75**0.9, 1]),
        (70, [0, 0, 1]),
        (95, [0, 0, 0.25**0.9]),
        (100, [0, 0, 0]),
        (10_000, [0, 0, 0]),
    ],
)
def test_mask_annealing_probs_by_completed_steps(step, expected):
    windows = anneal_windows(3, 100)
    assert windows == [(20, 40), (50, 70), (80, 100)]
    assert mask_annealing_probs(step, windows, 0.9) == pytest.approx(expected, abs=1e-12)


def test_mask_annealing_power():
    assert mask_annealing_probs(30, [(20, 40)], 2.0) == pytest.approx([0.25])
    assert mask_annealing_probs(25, [(20, 40)], 1.0) == pytest.approx([0.75])


def test_schedule_helpers():
    assert [default_num_blocks(d) for d in (12, 24, 40, 4, 2)] == [3, 4, 5, 3, 1]
    assert [num_upscale_blocks(p) for p in (16, 14, 8, 4)] == [2, 2, 1, 0]
    ln = LayerNorm2d(6)
    x = torch.randn(2, 6, 3, 5)
    ref = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + ln.eps)
    assert torch.allclose(ln(x), ref, atol=1e-5)


def test_semantic_map_formula():
    g = torch.Generator().manual_seed(3)
    m, c = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 3, generator=g)
    got = semantic_map_scores(m, c)
    ref = torch.zeros(1, 2, 4, 4)
    for qi in range(3):
        probs = torch.softmax(c[0, qi], -1)
        for k in range(2):
            ref[0, k] += torch.sigmoid(m[0, qi]) * probs[k]
    assert torch.allclose(got, ref, atol=1e-6)


# ---------------------------------------------------------------------------------------------- model
def _live_backbone(arch: str):
    """A random backbone whose LayerScale gammas are 1 (timm initialises them at 1e-5, which would make
    every attention change invisible)."""
    bb = build_backbone(arch)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    return bb


@pytest.mark.parametrize("arch", ["dinov2_tiny_reg", "dinov3_tiny"])
def test_annealed_eomt_equals_plain_vit(arch):
    torch.manual_seed(0)
    model = SegmentationModel(_live_backbone(arch), "eomt", 3, freeze_backbone=False, eomt={"num_queries": 5})
    model.eval()  # no drop path: compare the forward paths only
    x = torch.randn(2, 3, 32, 32)
    plain = model(x)
    annealed = model(x, attn_probs=[0.0] * model.head.num_blocks, deep_supervision=True)
    assert len(annealed["aux"]) == model.head.num_blocks
    assert torch.allclose(plain["pred_masks"], annealed["pred_masks"], atol=1e-6)
    assert torch.allclose(plain["pred_logits"], annealed["pred_logits"], atol=1e-6)
    masked = model(x, attn_probs=[1.0] * model.head.num_blocks)
    assert not torch.allclose(plain["pred_masks"], masked["pred_masks"], atol=1e-4)  # the mask path is live
    # inference scores = the formula on the plain pass, at the input size
    scores = model.class_scores(x)
    assert scores.shape == (2, 3, 32, 32)
    assert torch.allclose(scores, semantic_map_scores(plain["pred_masks"], plain["pred_logits"], (32, 32)), atol=1e-6)


def test_attention_mask_layout():
    bb = build_backbone("dinov2_tiny_reg")  # 1 cls + 4 registers, 4x4 grid at 32 px
    head = EoMT(bb, num_classes=2, num_queries=2)
    grid = (4, 4)
    logits = torch.full((2, 2, 8, 8), -5.0)
    logits[:, 0, :4, :4] = 5.0  # query 0: top-left quarter of the image
    keep = torch.tensor([[True, True], [False, False]])  # [B, Q]
    tokens = 2 + 5 + 16
    allowed = head._attn_mask(logits, grid, tokens, prefix=5, keep=keep)
    assert allowed.shape == (2, 1, tokens, tokens) and allowed.dtype == torch.bool
    q0 = allowed[0, 0, 0, 7:].view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(q0, expected)
    assert not allowed[0, 0, 1, 7:].any()  # query 1 predicts nothing: no patch
    assert allowed[0, 0, :2, :7].all()  # queries always see queries and prefix tokens
    assert allowed[0, 0, 2:].all()  # patch and prefix rows are never masked
    assert allowed[1].all()  # sample 1 dropped both queries' masks this step
    # the draw is per query: query 0 keeps its mask, query 1 (which predicts nothing) sees every patch
    mixed = head._attn_mask(logits, grid, tokens, prefix=5, keep=torch.tensor([[True, False], [True, False]]))
    assert torch.equal(mixed[0, 0, 0, 7:].view(4, 4), expected)
    assert mixed[0, 0, 1].all()


def test_keep_is_drawn_per_query():
    """Official EoMT drops a mask per (sample, query) with probability 1 - p, not per sample."""
    bb = _live_backbone("dinov2_tiny")
    head = EoMT(bb, num_classes=2, num_queries=64)
    seen = []
    real = head._attn_mask

    def spy(mask_logits, grid, num_tokens, prefix, keep):
        seen.append(keep.clone())
        return real(mask_logits, grid, num_tokens, prefix, keep)

    head._attn_mask = spy
    torch.manual_seed(0)
    head(bb, torch.randn(2, 3, 32, 32), attn_probs=[0.5] * head.num_blocks)
    assert len(seen) == head.num_blocks
    for keep in seen:
        assert keep.shape == (2, 64)
        assert 0 < keep[0].sum() < 64 and 0 < keep[1].sum() < 64  # mixed within one sample


@pytest.mark.parametrize("arch", ["dinov2_tiny_reg", "dinov3_tiny"])
def test_without_annealing_inference_keeps_the_masks(arch):
    """eomt.mask_annealing=false is masked attention without annealing: official EoMT's mask probabilities
    stay 1 and its inference reads them, so the inference pass (no attn_probs: validation, test, predict) is
    the fully masked one, not the plain ViT."""
    torch.manual_seed(0)
    bb = _live_backbone(arch)
    model = SegmentationModel(bb, "eomt", 3, freeze_backbone=False,
                              eomt={"num_queries": 5, "mask_annealing": False}).eval()
    assert model.head.masked_inference
    x = torch.randn(2, 3, 32, 32)
    inferred = model(x)
    masked = model(x, attn_probs=[1.0] * model.head.num_blocks)
    plain = model(x, attn_probs=[0.0] * model.head.num_blocks)
    assert torch.allclose(inferred["pred_masks"], masked["pred_masks"], atol=1e-6)
    assert not torch.allclose(inferred["pred_masks"], plain["pred_masks"], atol=1e-4)
    scores = model.class_scores(x)
    assert torch.allclose(scores, semantic_map_scores(masked["pred_masks"], masked["pred_logits"], (32, 32)), atol=1e-6)
    annealed = SegmentationModel(bb, "eomt", 3, freeze_backbone=False, eomt={"num_queries": 5}).eval()
    assert not annealed.head.masked_inference


def test_frozen_eomt_trains_only_heads_but_queries_get_gradients():
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("dinov2_tiny"), "eomt", 3, freeze_backbone=True, eomt={"num_queries": 4})
    model.train()
    out = model(torch.randn(2, 3, 32, 32), attn_probs=[1.0] * model.head.num_blocks, deep_supervision=True)
    loss = MaskClassificationLoss(3, num_points=1024)(out, torch.randint(0, 3, (2, 32, 32)))["loss"]
    loss.backward()
    assert model.head.queries.weight.grad is not None and model.head.queries.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    head, enc = model.trainable_groups()
    assert enc == [] and len(head) == len(list(model.head.parameters()))
