"""Stage 2 of ``meddino eval phase``: the causal MS-TCN trained on whole-video feature sequences.

Kept apart from the runner (:mod:`.train`) as the other trainable stage (stage 1 is :mod:`.frame_model`):
batch of one video in a seeded random order per epoch, AdamW, cross-entropy + truncated-MSE smoothing
(:func:`.mstcn.mstcn_loss`). The best epoch on the mean per-video validation accuracy is kept (strictly
better only, so a tie keeps the earlier epoch; the last epoch without validation videos); no early stopping.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from meddino.runlog import Progress, RunDir
from meddino.tasks.loop import BestSnapshot, check_finite
from meddino.tasks.phase.config import Stage2
from meddino.tasks.phase.frame_model import class_weights
from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, mstcn_loss


def mstcn_config(s2: Stage2, in_dim: int, num_classes: int) -> MSTCNConfig:
    return MSTCNConfig(
        in_dim=in_dim, num_classes=num_classes, num_stages=s2.num_stages, num_layers=s2.num_layers,
        channels=s2.channels, kernel_size=s2.kernel_size, causal=s2.causal, dropout=s2.dropout,
    )


@torch.no_grad()
def mstcn_probs(model: MSTCN, features: Tensor, device: torch.device) -> Tensor:
    """features [T, D] -> last-stage probabilities [T, K] (offline causal pass = online output)."""
    model.eval()
    logits = model(features.T[None].to(device))[-1, 0]
    return F.softmax(logits.float(), dim=0).T.cpu()


def train_stage2(
    train: list[tuple[Tensor, Tensor]],
    val: list[tuple[Tensor, Tensor]],
    s2: Stage2,
    num_classes: int,
    device: torch.device,
    seed: int,
    run: RunDir,
    step0: int = 0,
) -> tuple[MSTCN, dict[str, Any]]:
    """Train the MS-TCN on (features [T, D], labels [T]) videos, one video per step."""
    torch.manual_seed(seed)
    in_dim = train[0][0].shape[1]
    model = MSTCN(mstcn_config(s2, in_dim, num_classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s2.lr, weight_decay=s2.weight_decay)
    weight = class_weights([y.numpy() for _, y in train], num_classes, s2.class_weights)
    weight = weight.to(device) if weight is not None else None
    rng = np.random.default_rng(seed)
    best = BestSnapshot("max")  # the first validated epoch is always taken, then strictly better only
    train_loss = float("nan")
    step = step0
    with Progress(s2.epochs, "phase stage 2 (MS-TCN)", unit="epoch") as bar:
        for epoch in range(1, s2.epochs + 1):
            model.train()
            losses = []
            for i in rng.permutation(len(train)):
                x, y = train[i]
                out = model(x.T[None].to(device))
                loss = mstcn_loss(out, y[None].to(device), None, weight, s2.smooth_weight, s2.tau)["loss"]
                losses.append(check_finite(loss, "eval phase stage 2", epoch=epoch, step=step))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            train_loss = float(np.mean(losses))
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss}
            if val:
                accs = [float((mstcn_probs(model, x, device).argmax(1) == y).float().mean()) for x, y in val]
                row["val_accuracy"] = float(np.mean(accs))
                best.update(row["val_accuracy"], epoch, model)
            run.log(step, group={"stage": 2}, **row)
            bar.advance(1, loss=train_loss)
    best.restore(model)
    model.eval()
    # best_epoch is the last epoch without validation videos; train_loss is the last epoch's, as before
    return model, {"best_epoch": best.epoch if best.epoch is not None else s2.epochs, "val_accuracy": best.value,
                   "train_loss": train_loss}
