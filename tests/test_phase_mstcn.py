"""Causal MS-TCN: causality for several kernel sizes / dilations, online == offline, the loss formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, OnlineMSTCN, mstcn_loss, smoothing_loss


def _model(k: int, layers: int, causal: bool = True, stages: int = 2, in_dim: int = 6, classes: int = 4) -> MSTCN:
    torch.manual_seed(k * 100 + layers)
    cfg = MSTCNConfig(
        in_dim=in_dim, num_classes=classes, num_stages=stages, num_layers=layers, channels=8,
        kernel_size=k, causal=causal, dropout=0.5,
    )
    return MSTCN(cfg).eval()


@pytest.mark.parametrize("k,layers", [(3, 1), (3, 4), (5, 2), (5, 3), (2, 3), (4, 2), (1, 2)])
def test_causal_output_ignores_the_future(k: int, layers: int) -> None:
    model = _model(k, layers)
    T = 40
    x = torch.randn(1, 6, T)
    ref = model(x)
    assert ref.shape == (2, 1, 4, T)
    for t in (0, 7, 19, T - 2):
        y = x.clone()
        y[:, :, t + 1 :] = torch.randn(1, 6, T - t - 1) * 5
        out = model(y)
        torch.testing.assert_close(out[:, :, :, : t + 1], ref[:, :, :, : t + 1], rtol=0, atol=1e-6)
        if t + 1 < T:  # and the future itself did change (the test can fail)
            assert not torch.allclose(out[:, :, :, t + 1 :], ref[:, :, :, t + 1 :])


def test_causal_output_depends_on_whole_receptive_field() -> None:
    """Frame t - (receptive_field - 1) still influences t; one frame earlier does not."""
    model = _model(3, 3, stages=1)
    rf = model.receptive_field
    assert rf == 1 + 2 * (1 + 2 + 4)
    T = 30
    t = T - 1
    x = torch.randn(1, 6, T)
    ref = model(x)[-1, 0, :, t]
    y = x.clone()
    y[:, :, t - (rf - 1)] += 3.0
    assert not torch.allclose(model(y)[-1, 0, :, t], ref)
    y = x.clone()
    y[:, :, : t - (rf - 1)] += 3.0
    torch.testing.assert_close(model(y)[-1, 0, :, t], ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_non_causal_option_looks_ahead(k: int) -> None:
    model = _model(k, 3, causal=False)
    T = 30
    x = torch.randn(1, 6, T)
    ref = model(x)
    assert ref.shape[-1] == T  # symmetric padding keeps the length for odd and even k
    t = 10
    y = x.clone()
    y[:, :, t + 1] += 5.0
    assert not torch.allclose(model(y)[:, :, :, t], ref[:, :, :, t])


def test_mask_keeps_padding_out() -> None:
    """Padded frames at the end of a shorter video leave its outputs unchanged (batching is safe)."""
    model = _model(3, 3)
    x = torch.randn(2, 6, 20)
    mask = torch.ones(2, 20)
    mask[1, 12:] = 0
    out = model(x, mask)
    alone = model(x[1:2, :, :12])
    torch.testing.assert_close(out[:, 1:2, :, :12], alone, rtol=0, atol=1e-6)
    assert torch.all(out[:, 1, :, 12:] == 0)


@pytest.mark.parametrize("k,layers,stages", [(3, 4, 2), (5, 3, 3), (2, 2, 1), (1, 2, 2)])
def test_online_equals_offline(k: int, layers: int, stages: int) -> None:
    model = _model(k, layers, stages=stages)
    T = 37
    x = torch.randn(2, 6, T)
    offline = model(x)[-1]  # [B, K, T]
    online = OnlineMSTCN(model)
    steps = torch.stack([online.step(x[:, :, t]) for t in range(T)], dim=-1)
    torch.testing.assert_close(steps, offline, rtol=1e-5, atol=1e-5)
    # a single stream without batch dim, after a reset
    online.reset()
    single = torch.stack([online.step(x[0, :, t]) for t in range(T)], dim=-1)
    torch.testing.assert_close(single, offline[0], rtol=1e-5, atol=1e-5)


def test_online_refuses_non_causal() -> None:
    with pytest.raises(ValueError):
        OnlineMSTCN(_model(3, 2, causal=False))


def test_smoothing_loss_matches_formula() -> None:
    torch.manual_seed(0)
    B, K, T, tau = 2, 3, 9, 4.0
    logits = torch.randn(B, K, T) * 6  # large values so that the clamp at tau^2 is exercised
    got = smoothing_loss(logits, None, tau)
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            def log_softmax_at(tt: int) -> list[float]:
                z = math.log(sum(math.exp(logits[b, j, tt].item()) for j in range(K)))
                return [logits[b, c, tt].item() - z for c in range(K)]

            lp_t, lp_p = log_softmax_at(t), log_softmax_at(t - 1)
            for c in range(K):
                total += min(max((lp_t[c] - lp_p[c]) ** 2, 0.0), tau * tau)
                count += 1
    assert bool(((logits.log_softmax(1)[:, :, 1:] - logits.log_softmax(1)[:, :, :-1]) ** 2 > tau * tau).any())
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_smoothing_loss_detaches_previous_frame() -> None:
    logits = torch.randn(1, 3, 5, requires_grad=True)
    smoothing_loss(logits).backward()
    # the last frame is only ever "current", the first only ever "previous" (detached) -> no gradient
    assert torch.all(logits.grad[:, :, 0] == 0)
    assert torch.any(logits.grad[:, :, -1] != 0)


def test_mstcn_loss_is_ce_plus_weighted_smoothing() -> None:
    torch.manual_seed(1)
    S, B, K, T = 2, 1, 4, 12
    logits = torch.randn(S, B, K, T)
    target = torch.randint(0, K, (B, T))
    weights = torch.tensor([1.0, 2.0, 0.5, 1.5])
    out = mstcn_loss(logits, target, class_weights=weights, smooth_weight=0.15, tau=4.0)
    ce = 0.0
    for s in range(S):
        num = den = 0.0
        for t in range(T):
            y = target[0, t].item()
            logp = logits[s, 0, :, t].log_softmax(0)[y].item()
            num += -weights[y].item() * logp
            den += weights[y].item()
        ce += num / den
    sm = sum(smoothing_loss(logits[s]).item() for s in range(S))
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["smooth"].item() == pytest.approx(sm, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + 0.15 * sm, rel=1e-5)
    # the loss takes raw logits: it equals F.cross_entropy on them, not on their softmax
    assert out["ce"].item() != pytest.approx(
        sum(F.cross_entropy(logits[s, 0].T.softmax(-1), target[0], weight=weights).item() for s in range(S)), rel=1e-3
    )


def test_mstcn_loss_masks_unlabelled_frames() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 1, 3, 10)
    target = torch.randint(0, 3, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 6:] = False
    out = mstcn_loss(logits, target, mask)
    ref = mstcn_loss(logits[..., :6], target[:, :6])
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-6)


def test_training_step_learns_a_toy_sequence() -> None:
    """A few AdamW steps on one video reduce the loss (gradients flow through all stages)."""
    torch.manual_seed(3)
    model = MSTCN(MSTCNConfig(in_dim=4, num_classes=3, num_stages=2, num_layers=3, channels=8))
    x = torch.randn(1, 4, 30)
    target = torch.tensor([[0] * 10 + [1] * 10 + [2] * 10])
    x[0, target[0], torch.arange(30)] += 3.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = mstcn_loss(model(x), target)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    for p in model.stages[-1].parameters():
        assert p.grad is not None
