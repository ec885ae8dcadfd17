"""Where a full DINO step's time goes beyond a bare backbone step (issue 13: DINOv3's step costs 1.67x a bare
backbone step while its FLOPs are 1.33x; v1: 1.30 vs 1.21).

For each method it times, on the same synthetic crops (data loading excluded), the engine's full step
(``Trainer.train_step``) with its phases (teacher backbone, teacher heads + centring, student forward,
losses, backward, clipping, AdamW, EMA, the rest) timed by wrapping them, and a bare backbone forward + backward. For RoPE
backbones (DINOv3's Eva blocks) it also times the bare step with the rotary embedding's application made an
identity: the difference is what applying RoPE (forward and backward) costs. The FLOPs of both steps
(``torch.utils.flop_counter.FlopCounterMode``: matmuls, attention, convolutions) give the ratio the time
ratio is compared with. Prints one JSON object.

``--before`` times the pieces issue 13's CPU changes touched, the code before and after interleaved on the
trainer's own parameters and logits: per-tensor vs fused AdamW, clipping that takes the norms twice vs once,
Sinkhorn-Knopp's exp out of place vs in place; the full step before is estimated as the step now plus the
savings (a second trainer run alongside would evict the first one's 1 GB of parameters and moments from
the caches, and the steps' +-10 % noise on this machine hides a 5 % change).

    python benchmarks/step_profile.py --methods dinov3 dinov2 --batch 2 --steps 2 [--before]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from meddino.profile.timing import machine_info

# CPU seconds of this process, not wall time: on the shared 2-core machine other processes' load would
# otherwise land on whichever of the compared steps ran while it was high (torch runs on this one thread)
_clock = time.process_time

METHODS = {"dinov1": "dinov1_vits16", "dinov2": "dinov2_vits14", "dinov3": "dinov3_vits16"}


def _timed(obj, name: str, acc: dict, label: str) -> None:
    """Wrap ``obj.name`` so each call adds its wall time to ``acc[label]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = _clock()
        try:
            return fn(*a, **k)
        finally:
            acc[label] += _clock() - t

    setattr(obj, name, wrapper)


def _old_clip(module, max_norm: float, per_parameter: bool):
    """Global-norm clipping as it was: a norm pass of its own, then clip_grad_norm_ (a second one)."""
    from meddino.ssl.optim import _params

    params = _params(module)
    if not params:
        return torch.tensor(0.0)
    grads = [p.grad for p in params]
    norms = [n.to(torch.promote_types(n.dtype, torch.float32)) for n in torch._foreach_norm(grads, 2.0)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    if per_parameter or max_norm <= 0:
        raise NotImplementedError("the A/B covers DINOv2/v3's global clipping")
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return total


def _old_sinkhorn(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp as it was: the exponent and exp in three fresh [N, K] buffers (single process)."""
    t = teacher_logits.detach().float()
    n_local, k = t.shape
    shift = (t.max() / teacher_temp - 60.0).clamp(min=0.0)
    q = torch.exp(t / teacher_temp - shift)
    b = torch.tensor(float(n_local))
    q.div_(q.sum())
    for _ in range(n_iterations):
        q.div_(q.sum(dim=0, keepdim=True) * k)
        q.div_(q.sum(dim=1, keepdim=True) * b)
    return q.mul_(b)


class _PerTensorAdamW(torch.optim.AdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, **{**kwargs, "fused": None, "foreach": False})


def before_after(tr, batch: dict, it: int, reps: int) -> dict:
    """The three pieces issue 13's CPU changes touched, old and new code interleaved ``reps`` times on
    this trainer's own parameters and teacher logits (CPU seconds, medians): AdamW over every student
    parameter, the clipping of backbone and heads, Sinkhorn-Knopp of the CLS and masked-patch logits."""
    from meddino import ssl
    from meddino.pretrain import optim

    cfg = tr.cfg
    student = tr.student
    heads = torch.nn.ModuleDict(student.heads())
    real = optim.torch.optim.AdamW
    optim.torch.optim.AdamW = _PerTensorAdamW
    try:
        per_tensor = optim.build_optimizer(cfg, student.backbone, heads, torch.device("cpu"))
    finally:
        optim.torch.optim.AdamW = real
    fused = optim.build_optimizer(cfg, student.backbone, heads, torch.device("cpu"))
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in per_tensor.param_groups)
    for opt in (per_tensor, fused):
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 1e-6, 0.04
    gen = torch.Generator().manual_seed(0)
    params = [p for p in student.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    from meddino.pretrain.method import iteration_masks

    g = batch["global"].flatten(0, 1)
    grid = tr.student.backbone.grid_size(g.shape[-2:])
    masks = iteration_masks(cfg, it, tr.global_batch, batch["slot"], grid)  # this step's own iBOT masks
    with torch.no_grad():  # the teacher's logits of this batch, as the step computes them
        targets = tr.objective.teacher_targets(g, masks, 0.07)
    cls_logits, patch_logits = targets["cls_logits"], targets["patch_logits"]

    def clip_new() -> None:
        optim.clip_and_freeze(student, cfg, tr.sched, it, False)

    def clip_old() -> None:
        saved = ssl.clip_gradients
        ssl.clip_gradients = _old_clip
        try:
            optim.clip_and_freeze(student, cfg, tr.sched, it, False)
        finally:
            ssl.clip_gradients = saved

    its = cfg.method.sinkhorn_iterations
    pieces = {"adamw": (per_tensor.step, fused.step)}
    if not cfg.optim.clip_per_param:
        pieces["clipping"] = (clip_old, clip_new)
    if cfg.method.centering == "sinkhorn":
        logits = [x for x in (cls_logits, patch_logits) if x is not None]
        pieces["sinkhorn"] = (lambda: [_old_sinkhorn(x, 0.07, its) for x in logits],
                              lambda: [ssl.sinkhorn_knopp(x, 0.07, its) for x in logits])
    out = {}
    for name, (old, new) in pieces.items():
        old(), new()  # warm-up (AdamW: its state is allocated on the first step)
        t_old, t_new = [], []
        for _ in range(reps):
            for fn, acc in ((old, t_old), (new, t_new)):
                t = _clock()
                fn()
                acc.append(_clock() - t)
        out[name] = {"before_s": statistics.median(t_old), "after_s": statistics.median(t_new)}
    if "sinkhorn" in out:
        out["sinkhorn"]["shapes"] = [list(x.shape) for x in logits]
    for p in params:
        p.grad = None
    return out


def bench(name: str, recipe: str, args: argparse.Namespace) -> dict:
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.distributed import DistEnv
    from meddino.pretrain.engine import Trainer

    overrides = [f"out={tempfile.mkdtemp(prefix='meddino-prof-')}", f"data.batch_size={args.batch}",
                 "train.iterations=10000", "train.device=cpu"]
    cfg = load_config(PretrainConfig, recipe, overrides, "pretrain")
    tr = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    tr.setup_model(n_samples=10**6)
    tr.student.train()
    c = cfg.crops
    gen = torch.Generator().manual_seed(0)
    batch = {"global": torch.randn(2, args.batch, 3, c.global_size, c.global_size, generator=gen),
             "local": torch.randn(c.n_local, args.batch, 3, c.local_size, c.local_size, generator=gen),
             "slot": torch.arange(args.batch)}

    acc: dict[str, float] = defaultdict(float)
    _timed(tr.objective, "teacher_targets", acc, "teacher")
    _timed(tr.objective, "losses", acc, "losses")
    fwd = tr.model.forward

    def student_forward(*a, **k):
        t = _clock()
        try:
            return fwd(*a, **k)
        finally:
            acc["student_forward"] += _clock() - t

    tr.model.forward = student_forward
    import meddino.pretrain.engine as engine
    from meddino import ssl

    _timed(tr.optimizer, "step", acc, "adamw")
    _timed(engine, "clip_and_freeze", acc, "clipping")
    _timed(ssl, "ema_update_", acc, "ema_update")
    _timed(tr.objective.teacher.backbone, "forward_features", acc, "teacher: backbone forward")
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        t = _clock()
        try:
            return orig_backward(self, *a, **k)
        finally:
            acc["backward"] += _clock() - t

    bb = tr.student.backbone
    g, loc = batch["global"].flatten(0, 1), batch["local"].flatten(0, 1)

    def bare() -> None:
        loss = bb.forward_features(g)["cls"].sum() + bb.forward_features(loc)["cls"].sum()
        loss.backward()
        for p in bb.parameters():
            p.grad = None

    import timm.models.eva as eva

    apply_rot = eva.apply_rot_embed_cat

    def bare_without_rope_apply() -> None:
        eva.apply_rot_embed_cat = lambda x, emb, half=False: x
        try:
            bare()
        finally:
            eva.apply_rot_embed_cat = apply_rot

    def timed(fn) -> float:
        t = _clock()
        fn()
        return _clock() - t

    it0 = tr.sched.freeze_last_layer_iters
    tr.train_step(it0, batch)  # warm-up
    bare()
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for label, fn in (("full", lambda: tr.train_step(it0, batch)), ("bare", bare)):  # matmuls, attention, convs
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[label] = counter.get_total_flops()
    acc.clear()
    full, bare_s, no_rope = [], [], []
    for i in range(args.steps):  # interleaved, so that a change of machine load hits all alike
        torch.Tensor.backward = backward
        try:
            full.append(timed(lambda: tr.train_step(it0 + 1 + i, batch)))
        finally:
            torch.Tensor.backward = orig_backward
        bare_s.append(timed(bare))
        if bb.uses_rope:
            no_rope.append(timed(bare_without_rope_apply))
    phases = {k: v / args.steps for k, v in acc.items()}
    inner = phases.pop("teacher: backbone forward")  # part of "teacher"
    phases["rest (masks, centres, health window, schedules)"] = statistics.mean(full) - sum(phases.values())
    phases["teacher: backbone forward"] = inner
    phases["teacher: heads and centring"] = phases["teacher"] - inner

    out = {"recipe": recipe, "batch": args.batch, "clock": "process CPU seconds (1 torch thread)",
           "full_step_s": statistics.median(full), "full_step_all": full, "phases_s": phases,
           "bare_backbone_s": statistics.median(bare_s), "bare_backbone_all": bare_s}
    out["ratio_full_to_bare"] = out["full_step_s"] / out["bare_backbone_s"]
    out["flops_full"], out["flops_bare"] = flops["full"], flops["bare"]
    out["flop_ratio_full_to_bare"] = flops["full"] / flops["bare"]
    out["time_ratio_over_flop_ratio"] = out["ratio_full_to_bare"] / out["flop_ratio_full_to_bare"]
    if args.before:
        ab = before_after(tr, batch, it0 + 1, args.before_reps)
        saved = sum(v["before_s"] - v["after_s"] for v in ab.values())
        out["before_after"] = ab
        out["full_step_before_estimate_s"] = out["full_step_s"] + saved
        out["ratio_full_before_estimate_to_bare"] = out["full_step_before_estimate_s"] / out["bare_backbone_s"]
    if no_rope:
        out["bare_backbone_rope_apply_identity_s"] = statistics.median(no_rope)
        out["rope_apply_share_of_bare"] = 1 - out["bare_backbone_rope_apply_identity_s"] / out["bare_backbone_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=["dinov3", "dinov2"], choices=list(METHODS))
    p.add_argument("--before", action="store_true", help="also time the pieces issue 13's CPU changes touched "
                   "(per-tensor vs fused AdamW, two-pass vs one-pass clipping, out-of-place vs in-place Sinkhorn exp)")
    p.add_argument("--before-reps", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("MEDDINO_QUIET", "1")
    res = {name: bench(name, METHODS[name], args) for name in args.methods}
    print(json.dumps({"machine": machine_info(torch.device("cpu")), "methods": res}, indent=2))


if __name__ == "__main__":
    main()
