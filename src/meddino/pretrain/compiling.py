"""``train.compile=true``: torch.compile per transformer block and per head, as DINOv3 compiles its blocks.

Why per block, not the whole student: every block has the same code, so one compiled graph serves all of
them (Dynamo inlines the module and guards on shapes, not on which block it is); the pieces with
data-dependent shapes (iBOT's masked-patch selection, the concatenation of CLS tokens) stay eager between
blocks instead of breaking the graph; parameter names stay as they are (``nn.Module.compile`` compiles in
place, no ``_orig_mod.`` prefix), so the EMA update, checkpoints and exports see the same keys as eager; and
DDP / FSDP2 wrap the same modules with or without compile.

torch.compile fails only at the first call (no C++ compiler for inductor on CPU, no Triton for the GPU,
an unsupported Python), so :func:`compile_unavailable` compiles and runs a two-op function on the run's
device first; when that fails the run stays eager after one warning line instead of failing mid-step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on ``device`` here (its error's first line), or None when it can."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + 1

    try:
        fn = torch.compile(probe, dynamic=False)
        x = torch.linspace(0, 1, 8, device=device)
        if not torch.allclose(fn(x), probe(x)):
            return "the compiled probe function computed another result than eager"
    except Exception as e:  # why: any backend failure (missing compiler, Triton, Python version) means eager
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


def compile_units(models: Iterable[nn.Module | None]) -> int:
    """Compile, in place, every transformer block of each model's backbone and each of its heads (a
    ``Student``/teacher with ``backbone`` and heads, or a bare backbone such as the Gram teacher); a module
    reached twice (a shared iBOT head) is compiled once. Returns the number of compiled modules."""
    done: set[int] = set()
    for model in models:
        if model is None:
            continue
        backbone = getattr(model, "backbone", model)
        units: list[nn.Module] = list(backbone.blocks)
        units += [h for h in (getattr(model, "dino_head", None), getattr(model, "ibot_head", None)) if h is not None]
        for unit in units:
            if id(unit) not in done:
                unit.compile()
                done.add(id(unit))
    return len(done)
