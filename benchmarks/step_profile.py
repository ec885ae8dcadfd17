"""Where a full DINO step's time goes beyond a bare backbone step (issue 13: DINOv3's step costs 1.67x a bare
backbone step while its FLOPs are 1.33x; v1: 1.30 vs 1.21).

For each method it times, on the same synthetic crops (data loading excluded), the engine's full step
(``Trainer.train_step``) with its phases (teacher backbone, teacher heads + centring, student forward,
losses, backward, clipping, AdamW, EMA, the rest) timed by wrapping them, and a bare backbone forward + backward. For RoPE
backbones (DINOv3's Eva blocks) it also times the bare step with the rotary embedding's application made an
identity: the difference is what applying RoPE (forward and backward) costs. Prints one JSON object.

    python benchmarks/step_profile.py --methods dinov3 dinov2 --batch 2 --steps 2
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
    if no_rope:
        out["bare_backbone_rope_apply_identity_s"] = statistics.median(no_rope)
        out["rope_apply_share_of_bare"] = 1 - out["bare_backbone_rope_apply_identity_s"] / out["bare_backbone_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--methods", nargs="*", default=["dinov3", "dinov2"], choices=list(METHODS))
    args = p.parse_args()
    os.environ.setdefault("MEDDINO_QUIET", "1")
    res = {name: bench(name, METHODS[name], args) for name in args.methods}
    print(json.dumps({"machine": machine_info(torch.device("cpu")), "methods": res}, indent=2))


if __name__ == "__main__":
    main()
