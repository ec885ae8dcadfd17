"""meddino.ssl objectives against independent references: explicit loops, numpy, hand-computed cases."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meddino.errors import ConfigError, UserError
from meddino.ssl import (
    all_reduce_sum,
    dino_loss,
    gram_loss,
    ibot_loss,
    ibot_patch_weights,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
    world_size,
)

F64 = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """numpy's assert_allclose on tensors (torch.testing's first call imports torch.distributed.tensor: slow)."""
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected.detach().cpu().numpy(), rtol=rtol, atol=atol)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _np_sinkhorn(t: np.ndarray, tau: float, n_iter: int) -> np.ndarray:
    """Sinkhorn-Knopp written out element by element, in float64."""
    n, k = t.shape
    q = np.exp(t / tau).T.copy()  # [K, N]
    q /= q.sum()
    for _ in range(n_iter):
        for r in range(k):
            q[r, :] /= q[r, :].sum()
        q /= k
        for c in range(n):
            q[:, c] /= q[:, c].sum()
        q /= n
    return (q * n).T


# ---------------------------------------------------------------- centering


def test_softmax_center_matches_formula():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 7, generator=g, dtype=F64)
    c = torch.randn(1, 7, generator=g, dtype=F64)
    out = softmax_center(t, c, 0.04).numpy()
    tn, cn = t.numpy(), c.numpy()
    for i in range(2):
        for b in range(3):
            z = (tn[i, b] - cn[0]) / 0.04
            ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            np.testing.assert_allclose(out[i, b], ref, rtol=1e-10, atol=1e-12)


def test_update_center_is_ema_of_row_mean_and_does_not_mutate():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 4, 5, generator=g, dtype=F64)
    c = torch.randn(1, 5, generator=g, dtype=F64)
    c_before = c.clone()
    new = update_center(c, t, momentum=0.9)
    rows = t.numpy().reshape(-1, 5)
    ref = 0.9 * c.numpy() + 0.1 * (sum(rows[r] for r in range(8)) / 8)
    np.testing.assert_allclose(new.numpy(), ref, rtol=0, atol=1e-12)
    assert torch.equal(c, c_before)
    assert new.shape == (1, 5)
    # flat [T*B, K] input gives the same centre
    _close(update_center(c, t.reshape(8, 5), 0.9), new, rtol=0, atol=1e-14)


def test_sinkhorn_matches_numpy_loop_and_marginals():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 9, generator=g, dtype=F64) * 0.3
    for n_iter in (1, 3):
        out = sinkhorn_knopp(t, 0.07, n_iterations=n_iter)
        assert out.shape == (6, 9)
        np.testing.assert_allclose(out.numpy(), _np_sinkhorn(t.numpy(), 0.07, n_iter), rtol=1e-6, atol=1e-12)
    out = sinkhorn_knopp(t, 0.07, n_iterations=3)
    # the last step normalises samples: each output row (sample) is a distribution
    np.testing.assert_allclose(out.sum(dim=1).numpy(), np.ones(6), atol=1e-12)
    # run to convergence: prototypes are then used equally, each output column sums to N / K
    converged = sinkhorn_knopp(t, 0.07, n_iterations=200)
    np.testing.assert_allclose(converged.sum(dim=0).numpy(), np.full(9, 6 / 9), rtol=1e-6)
    np.testing.assert_allclose(converged.sum(dim=1).numpy(), np.ones(6), atol=1e-12)


def test_sinkhorn_works_in_place_on_its_own_buffer_only():
    """Its exp runs in place (one [N, K] buffer, not three): the same values as the out-of-place
    exp(t / tau - shift), with and without the overflow shift, and the caller's logits untouched."""
    g = torch.Generator().manual_seed(3)
    for offset, tau in ((0.0, 0.04), (65.0, 1.0)):  # 65: max(t) / tau > 60, the shift applies
        t = torch.randn(7, 50, generator=g) * 0.3 + offset
        before = t.clone()
        out = sinkhorn_knopp(t, tau, n_iterations=3)
        assert torch.equal(t, before)
        shift = (t.max() / tau - 60.0).clamp(min=0.0)
        assert (float(shift) > 0) == (offset > 0)
        q = torch.exp(t / tau - shift)
        q = q / q.sum()
        for _ in range(3):
            q = q / (q.sum(dim=0, keepdim=True) * 50)
            q = q / (q.sum(dim=1, keepdim=True) * 7)
        torch.testing.assert_close(out, q * 7, rtol=1e-6, atol=0)


def test_sinkhorn_fp32_and_bf16_inputs_compute_in_fp32():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(5, 4, generator=g)
    ref = _np_sinkhorn(t.double().numpy(), 0.05, 3)
    out32 = sinkhorn_knopp(t, 0.05)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-5, atol=1e-7)
    out_bf = sinkhorn_knopp(t.to(torch.bfloat16), 0.05)
    assert out_bf.dtype == torch.float32
    ref_bf = _np_sinkhorn(t.to(torch.bfloat16).double().numpy(), 0.05, 3)
    np.testing.assert_allclose(out_bf.numpy(), ref_bf, rtol=1e-5, atol=1e-7)


def test_sinkhorn_large_logits_do_not_overflow_fp32():
    # exp(5 / 0.04) = exp(125) overflows float32; the float64 reference does not.
    g = torch.Generator().manual_seed(4)
    t = torch.rand(6, 5, generator=g) * 2 + 3.0
    out = sinkhorn_knopp(t, 0.04)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), _np_sinkhorn(t.double().numpy(), 0.04, 3), rtol=1e-4, atol=1e-7)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str, logits: torch.Tensor, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start = sum(sizes[:rank])
        local = logits[start : start + sizes[rank]]
        center = torch.zeros(1, logits.shape[1], dtype=logits.dtype)
        res = {
            "world": torch.tensor(world_size()),
            "sk": sinkhorn_knopp(local, 0.05, 3),
            "center": update_center(center, local, 0.9),
            "sum": all_reduce_sum(torch.tensor([float(rank + 1)])),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_matches_single_process_on_concatenated_batch(tmp_path):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, 6, generator=g, dtype=F64)
    sizes = [4, 3]  # unequal, like masked-patch counts differing across ranks
    # fork (Linux) skips re-importing torch in the children; conftest pins one OpenMP thread, so it is safe
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _dist_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), logits, sizes),
        nprocs=2,
        join=True,
        start_method=method,
    )
    full_sk = sinkhorn_knopp(logits, 0.05, 3)
    full_center = update_center(torch.zeros(1, 6, dtype=F64), logits, 0.9)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert int(r0["world"]) == 2 and float(r0["sum"]) == 3.0 and float(r1["sum"]) == 3.0
    _close(torch.cat([r0["sk"], r1["sk"]]), full_sk, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(full_sk.numpy(), _np_sinkhorn(logits.numpy(), 0.05, 3), rtol=1e-8)
    for r in (r0, r1):
        _close(r["center"], full_center, rtol=1e-12, atol=1e-14)


def test_single_process_helpers_are_identity():
    x = torch.arange(3.0)
    assert all_reduce_sum(x) is x
    assert world_size() == 1


# ---------------------------------------------------------------- DINO loss


def _dino_loop(s: np.ndarray, q: np.ndarray, tau: float, local_weight: float = 1.0) -> float:
    n_s, batch, _ = s.shape
    n_t = q.shape[0]
    total, n_pairs = 0.0, 0
    for i in range(n_t):
        for v in range(n_s):
            if v == i:
                continue
            pair = 0.0
            for b in range(batch):
                pair += -(q[i, b] * _np_log_softmax(s[v, b] / tau)).sum()
            w = local_weight if v >= n_t else 1.0
            total += w * pair / batch
            n_pairs += 1
    return total / n_pairs


@pytest.mark.parametrize("n_local", [0, 3, 8])
def test_dino_loss_matches_double_loop(n_local):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2 + n_local, 3, 11, generator=g, dtype=F64)
    q = softmax_center(torch.randn(2, 3, 11, generator=g, dtype=F64), torch.zeros(1, 11, dtype=F64), 0.04)
    got = dino_loss(s, q, student_temp=0.1)
    assert got.dtype == F64 and got.dim() == 0
    assert got.item() == pytest.approx(_dino_loop(s.numpy(), q.numpy(), 0.1), rel=1e-10)


def test_dino_loss_local_weight_and_pair_count():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(10, 2, 5, generator=g, dtype=F64)
    q = torch.softmax(torch.randn(2, 2, 5, generator=g, dtype=F64), dim=-1)
    got = dino_loss(s, q, 0.1, local_weight=0.5)
    assert got.item() == pytest.approx(_dino_loop(s.numpy(), q.numpy(), 0.1, 0.5), rel=1e-10)
    # 18 pairs for 2 global + 8 local: weight 0 leaves the 2 cross-global pairs divided by 18
    only_global = dino_loss(s, q, 0.1, local_weight=0.0).item()
    cross = dino_loss(s[:2], q, 0.1).item()  # mean of the 2 cross-global pairs
    assert only_global == pytest.approx(cross * 2 / 18, rel=1e-10)


def test_dino_loss_hand_computed_uniform_case():
    # uniform student -> log_softmax = -log K for every crop; loss = log K whatever the teacher
    s = torch.zeros(4, 3, 8, dtype=F64)
    q = torch.softmax(torch.randn(2, 3, 8, dtype=F64), dim=-1)
    assert dino_loss(s, q).item() == pytest.approx(math.log(8), rel=1e-12)


def test_dino_loss_gradient_flows_to_student_only():
    s = torch.randn(4, 2, 6, requires_grad=True)
    q = torch.softmax(torch.randn(2, 2, 6), dim=-1)
    dino_loss(s, q).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- iBOT


def test_ibot_patch_weights_hand_case():
    masks = torch.tensor(
        [[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool
    )
    w = ibot_patch_weights(masks)
    assert w.dtype == torch.float32
    expected = [1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-7)
    assert w.shape == (int(masks.sum()),)


def test_ibot_loss_matches_loop():
    g = torch.Generator().manual_seed(8)
    masks = torch.rand(4, 9, generator=g) < 0.4
    masks[1] = False  # one unmasked crop
    m = int(masks.sum())
    s = torch.randn(m, 7, generator=g, dtype=F64)
    t = torch.softmax(torch.randn(m, 7, generator=g, dtype=F64) / 0.05, dim=-1)
    w = ibot_patch_weights(masks, dtype=F64)
    got = ibot_loss(s, t, w, n_crops=4, student_temp=0.1).item()
    # reference: per image, mean over its masked patches of the cross-entropy; sum over images / n_crops
    ref, idx = 0.0, 0
    sn, tn = s.numpy(), t.numpy()
    for b in range(4):
        count = int(masks[b].sum())
        img = 0.0
        for _ in range(count):
            img += -(tn[idx] * _np_log_softmax(sn[idx] / 0.1)).sum()
            idx += 1
        if count:
            ref += img / count
    assert got == pytest.approx(ref / 4, rel=1e-10)


# ---------------------------------------------------------------- KoLeo


def test_koleo_matches_bruteforce_loop():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 5, generator=g, dtype=F64)
    eps = 1e-8
    xn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    ref = 0.0
    for i in range(7):
        best, best_j = -np.inf, -1
        for j in range(7):
            if j != i and xn[i] @ xn[j] > best:
                best, best_j = xn[i] @ xn[j], j
        d = np.sqrt(((xn[i] - xn[best_j] + eps) ** 2).sum())  # torch PairwiseDistance adds eps to the difference
        ref += -np.log(d + eps)
    assert koleo_loss(x).item() == pytest.approx(ref / 7, rel=1e-10)


def test_koleo_hand_case_and_duplicate_points():
    # two orthogonal unit vectors: distance sqrt(2) -> loss = -log(sqrt(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    assert koleo_loss(x, eps=0.0).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-12)
    # identical points: distance is ||eps * 1|| = sqrt(D) eps, finite loss
    y = torch.ones(3, 4, dtype=F64)
    assert koleo_loss(y, eps=1e-8).item() == pytest.approx(-math.log(2 * 1e-8 + 1e-8), rel=1e-6)


def test_koleo_needs_two_samples():
    with pytest.raises(ConfigError):
        koleo_loss(torch.randn(1, 4))
    assert issubclass(ConfigError, UserError)


# ---------------------------------------------------------------- Gram


def _gram_loop(s: np.ndarray, t: np.ndarray, img_level: bool, mode: str) -> float:
    def norm(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    s, t = norm(s), norm(t)
    mats = [(s[b], t[b]) for b in range(s.shape[0])] if img_level else [(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))]
    total, count = 0.0, 0
    for xs, xt in mats:
        n = xs.shape[0]
        for i in range(n):
            for j in range(n):
                gs = float(xs[i] @ xs[j])
                gt = float(xt[i] @ xt[j])
                if mode == "remove_neg":
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                elif mode == "teacher_neg":
                    gt = max(gt, 0.0)
                total += (gs - gt) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize("mode", ["none", "remove_neg", "teacher_neg"])
def test_gram_loss_matches_loop(img_level, mode):
    g = torch.Generator().manual_seed(10)
    s = torch.randn(2, 5, 4, generator=g, dtype=F64)
    t = torch.randn(2, 5, 4, generator=g, dtype=F64)
    got = gram_loss(
        s, t, img_level=img_level, remove_neg=mode == "remove_neg", remove_only_teacher_neg=mode == "teacher_neg"
    )
    assert got.item() == pytest.approx(_gram_loop(s.numpy(), t.numpy(), img_level, mode), rel=1e-10)


def test_gram_loss_zero_for_same_features_and_exclusive_flags():
    x = torch.randn(2, 6, 3, dtype=F64)
    assert gram_loss(x, x * 2.0).item() == pytest.approx(0.0, abs=1e-24)  # scale-invariant after normalising
    with pytest.raises(ConfigError):
        gram_loss(x, x, remove_neg=True, remove_only_teacher_neg=True)
