"""Training-health diagnostics and a collapse detector for DINO-style pretraining.

The official DINO code logs only the losses, and a DINO loss that sits at ln K tells that something
collapsed but not what. These signals tell the two classic failure modes apart:

- **uniform collapse**: the teacher's (centred, sharpened) distribution over the K prototypes becomes
  uniform, its entropy reaches ln K and the DINO loss equals ln K whatever the student does. A high
  entropy alone is not collapse: DINOv3's plain-Linear last layer starts every run with logits of std
  0.02 / teacher_temp, i.e. an entropy within 1% of ln K, while its targets still differ from image to
  image. What collapse adds is that the targets no longer depend on the image, which
  :func:`teacher_information` measures;
- **dimensional / one-prototype collapse**: every image maps to the same direction; the teacher's
  argmax uses few prototypes and the effective rank of its CLS features approaches 1.

Everything here is a pure function of tensors (no I/O, no process group), except the two small stateful
helpers at the end: :class:`HealthWindow` (what the engine feeds every iteration) and
:class:`CollapseDetector` (which turns the logged values into one warning per episode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HEALTH_KEYS",
    "CollapseDetector",
    "HealthWindow",
    "averaged_diagnostics",
    "effective_rank",
    "kl_divergence",
    "log_health",
    "mean_entropy",
    "prototype_usage",
    "teacher_information",
]


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean Shannon entropy (natural log) of the rows of a distribution ``probs`` [..., K].

    0 for one-hot rows, ln K for uniform rows: the teacher's value against ln K is the direct measure of
    how sharp (or how collapsed to uniform) its targets are. Leading dimensions are flattened.
    """
    p = probs.detach().float().reshape(-1, probs.shape[-1])
    if p.shape[0] == 0:
        return float("nan")
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # 0 * log 0 = 0
    return float(ent.mean())


def kl_divergence(p_teacher: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> float:
    """Mean over rows of KL(teacher || softmax(student_logits / student_temp)), natural log.

    ``p_teacher`` [N, K] with ``student_logits`` [N, K] row by row; or ``p_teacher`` [T, B, K] with
    ``student_logits`` [S, B, K] (S >= T, the first T student crops the global crops in the teacher's
    order): then teacher crop i is paired with student crop i, the SAME view. The DINO loss pairs
    *different* views; the same-view KL isolates how far the student's distribution is from its target
    without the augmentation gap, and is 0 exactly when the student reproduces the teacher. ``KL = CE - H``:
    with the loss at ln K and the KL near 0, teacher and student are both uniform.
    """
    q = p_teacher.detach().float()
    s = student_logits.detach().float()
    if q.dim() == 3:
        if s.dim() != 3 or s.shape[0] < q.shape[0] or s.shape[1:] != q.shape[1:]:
            raise ValueError(f"kl_divergence: teacher {tuple(q.shape)} does not match student {tuple(s.shape)}")
        s = s[: q.shape[0]]
    q, s = q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1])
    if q.shape != s.shape:
        raise ValueError(f"kl_divergence: teacher {tuple(q.shape)} does not match student {tuple(s.shape)}")
    if q.shape[0] == 0:
        return float("nan")
    log_s = F.log_softmax(s / student_temp, dim=-1)
    kl = (q * (torch.log(q.clamp_min(1e-30)) - log_s)).sum(-1)
    return float(kl.mean())


def teacher_information(probs: torch.Tensor) -> float:
    """Mutual information (nats) between the row and the prototype of a batch of distributions ``probs``
    [..., K]: ``H(mean_i q_i) - mean_i H(q_i)``, the mean KL of each row from the batch mean.

    0 when every image gets the same target, whether that target is uniform or one prototype: the targets
    tell the student nothing about its image. Up to ln(min(N, K)) when each image has its own sharp
    target. At DINOv3's init the teacher's logits ``w_k . z_i`` (``w ~ N(0, 0.02^2)``, unit ``z``) vary
    across images by ``0.02 |z_i - z_j|``, so the information is about ``(0.02 / t)^2 (1 - c) / 2`` for
    teacher temperature ``t`` and mean cosine ``c`` between the images' bottleneck vectors: a few 1e-2
    nats when the backbone tells images apart, ~1e-4 when it does not (c ~ 1).
    """
    p = probs.detach().float().reshape(-1, probs.shape[-1])
    if p.shape[0] == 0:
        return float("nan")
    return max(mean_entropy(p.mean(0, keepdim=True)) - mean_entropy(p), 0.0)


def prototype_usage(argmax_indices: torch.Tensor, k: int) -> float:
    """Fraction of the ``k`` prototypes that are the teacher's argmax for at least one sample.

    Computed over a window of accumulated argmax indices (all samples between two log steps): close to 1
    when the batch spreads over the prototypes, 1/K when every image goes to the same one. Bounded above
    by (number of samples) / K, so compare runs at the same batch size and log interval.
    """
    idx = argmax_indices.detach().reshape(-1).long()
    if k <= 0:
        raise ValueError("prototype_usage: k must be positive")
    if idx.numel() == 0:
        return float("nan")
    return int(torch.unique(idx).numel()) / k


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, arXiv:2210.02885) of ``features`` [N, D]: ``exp(-sum_i p_i log p_i)``
    with ``p_i = s_i / sum(s) + eps`` over the singular values ``s`` of the row-L2-normalised matrix.

    A smooth count of the directions the representation uses: r for r orthonormal rows, 1 when all rows
    are identical; bounded by min(N, D). A value falling towards 1 is dimensional collapse.
    """
    x = features.detach().float().reshape(-1, features.shape[-1])
    if x.shape[0] == 0:
        return float("nan")
    x = F.normalize(x, dim=-1)
    s = torch.linalg.svdvals(x.cpu() if x.device.type == "mps" else x)
    p = s / s.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


class HealthWindow:
    """Accumulates what one log window needs, cheaply: every iteration :meth:`update` keeps the teacher's
    argmax indices (for prototype usage over the window) and only the LAST step's tensors (detached) for
    entropy, KL and effective rank; :meth:`compute` returns the diagnostics and starts a new window.
    The engine passes ``keep=False`` on steps that are not log steps, so no logits [N, K] outlive their
    step (with K = 65536 and thousands of masked patches they would cost GBs of accelerator memory).

    ``student_temp`` is the student's softmax temperature; the student side of the entropy and the KL is
    its global crops (the first T*B rows of the student's CLS logits, T = number of teacher crops).
    """

    def __init__(self, student_temp: float):
        self.student_temp = float(student_temp)
        self._argmax: list[torch.Tensor] = []
        self._ibot_argmax: list[torch.Tensor] = []
        self._last: dict[str, torch.Tensor | None] = {}

    @torch.no_grad()
    def update(
        self,
        teacher_probs: torch.Tensor,
        student_logits: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
        patch_probs: torch.Tensor | None = None,
        patch_logits: torch.Tensor | None = None,
        keep: bool = True,
    ) -> None:
        """``teacher_probs`` [T, B, K] (or [N, K]), ``student_logits`` [S*B, K] or [S, B, K] with the T
        global crops first, ``teacher_features`` [T*B, D] (teacher CLS), iBOT ``patch_probs`` [M, K'] and
        ``patch_logits`` [M, K'] of the masked patches (same order), when iBOT is on. ``keep``: hold this
        step's tensors for :meth:`compute` (else only its argmax indices are recorded)."""
        q = teacher_probs.detach()
        k = q.shape[-1]
        q2 = q.reshape(-1, k)
        s = student_logits.detach().reshape(-1, k)[: q2.shape[0]]
        self._argmax.append(q2.argmax(-1))
        has_patches = patch_probs is not None and patch_logits is not None and patch_probs.shape[0] > 0
        if has_patches:
            self._ibot_argmax.append(patch_probs.detach().argmax(-1))
        if not keep:
            return
        last: dict[str, torch.Tensor | None] = {"q": q2, "s": s, "feat": None, "pq": None, "ps": None}
        if teacher_features is not None:
            last["feat"] = teacher_features.detach()
        if has_patches:
            last["pq"], last["ps"] = patch_probs.detach(), patch_logits.detach()
        self._last = last

    def compute(self) -> dict[str, float]:
        """The diagnostics of the window (empty when no step was kept); resets the window."""
        last = self._last
        if not last:
            self._argmax, self._ibot_argmax = [], []
            return {}
        q, s = last["q"], last["s"]
        assert q is not None and s is not None
        k = q.shape[-1]
        out = {
            "teacher_entropy": mean_entropy(q),
            "teacher_information": teacher_information(q),
            "student_entropy": mean_entropy(F.softmax(s.float() / self.student_temp, dim=-1)),
            "ln_k": math.log(k),
            "kl_teacher_student": kl_divergence(q, s, self.student_temp),
            "prototype_usage": prototype_usage(torch.cat(self._argmax), k),
        }
        if last["feat"] is not None:
            out["effective_rank"] = effective_rank(last["feat"])
        pq, ps = last["pq"], last["ps"]
        if pq is not None and ps is not None:
            kp = pq.shape[-1]
            out["ibot_teacher_entropy"] = mean_entropy(pq)
            out["ibot_teacher_information"] = teacher_information(pq)
            out["ibot_student_entropy"] = mean_entropy(F.softmax(ps.float() / self.student_temp, dim=-1))
            out["ibot_kl_teacher_student"] = kl_divergence(pq, ps, self.student_temp)
            out["ibot_prototype_usage"] = prototype_usage(torch.cat(self._ibot_argmax), kp)
        self._argmax, self._ibot_argmax, self._last = [], [], {}
        return out


class CollapseDetector:
    """Turns the logged diagnostics into a warning when a collapse signal persists.

    Two conditions, each counted over consecutive log steps:

    - the teacher entropy is within ``entropy_tolerance`` (relative) of ln K, i.e.
      ``H >= (1 - entropy_tolerance) * ln K``, AND the targets carry less than ``min_information`` nats
      about the image (:func:`teacher_information`; not measured or ``min_information=0``: not required): uniform targets that
      are the same for every image, so the DINO loss carries no signal. The second half keeps the
      detector quiet on DINOv3's healthy start, whose entropy is within 1% of ln K by construction;
    - the effective rank of the teacher's CLS features is below ``min_rank`` (None disables it).

    :meth:`update` returns a one-line warning the first time a condition has held for ``patience``
    consecutive log steps; it fires once per episode and re-arms when the condition clears.
    """

    def __init__(self, ln_k: float, entropy_tolerance: float = 0.02, min_rank: float | None = 1.5, patience: int = 5,
                 min_information: float = 0.005):
        if patience < 1:
            raise ValueError("CollapseDetector: patience must be >= 1")
        self.ln_k = float(ln_k)
        self.entropy_tolerance = float(entropy_tolerance)
        self.min_information = float(min_information)
        self.min_rank = min_rank
        self.patience = int(patience)
        self._count = {"entropy": 0, "rank": 0}
        self._fired = {"entropy": False, "rank": False}

    def _step(self, name: str, holds: bool) -> bool:
        if not holds:
            self._count[name], self._fired[name] = 0, False
            return False
        self._count[name] += 1
        if self._count[name] >= self.patience and not self._fired[name]:
            self._fired[name] = True
            return True
        return False

    def update(self, step: int, teacher_entropy: float | None, effective_rank: float | None,
               teacher_information: float | None = None) -> str | None:
        """Feed one log step's values (None or NaN = not measured: the entropy or rank condition does not
        hold, the information one is not required); returns the warning text when a condition has just
        reached ``patience`` log steps, else None."""
        messages = []
        h_holds = _finite(teacher_entropy) and teacher_entropy >= (1.0 - self.entropy_tolerance) * self.ln_k
        same_for_all = (self.min_information <= 0 or not _finite(teacher_information)
                        or teacher_information < self.min_information)
        if self._step("entropy", bool(h_holds and same_for_all)):
            about = f", {teacher_information:.2g} nats about the image" if _finite(teacher_information) else ""
            messages.append(
                f"teacher entropy {teacher_entropy:.3f} within {self.entropy_tolerance * 100:g}% of "
                f"ln K={self.ln_k:.3f}{about} for {self.patience} log steps (uniform collapse)"
            )
        r_holds = self.min_rank is not None and _finite(effective_rank) and effective_rank < self.min_rank
        if self._step("rank", bool(r_holds)):
            messages.append(
                f"effective rank of the teacher CLS features {effective_rank:.3f} below {self.min_rank:g} "
                f"for {self.patience} log steps (dimensional collapse)"
            )
        if not messages:
            return None
        return f"step {step}: " + "; ".join(messages)


HEALTH_KEYS = ("teacher_entropy", "teacher_information", "student_entropy", "ln_k", "kl_teacher_student",
               "prototype_usage", "effective_rank", "ibot_teacher_entropy", "ibot_teacher_information",
               "ibot_student_entropy", "ibot_kl_teacher_student", "ibot_prototype_usage")


def averaged_diagnostics(window: HealthWindow,
                         mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """The window's diagnostics, each computed on this rank's local data, then averaged over the ranks that
    measured it (``mean_over_ranks``: one small all-reduce, a collective every rank calls at the log step),
    so every rank feeds the detector the same values and takes the same stop decision."""
    local = window.compute()
    vals = [float(local.get(k, float("nan"))) for k in HEALTH_KEYS]
    present = [1.0 if math.isfinite(v) else 0.0 for v in vals]
    vec = torch.tensor([v if p else 0.0 for v, p in zip(vals, present)] + present, dtype=torch.float64)
    if mean_over_ranks is not None:
        vec = mean_over_ranks(vec)
    n = len(HEALTH_KEYS)
    return {k: float(vec[i] / vec[n + i]) for i, k in enumerate(HEALTH_KEYS) if vec[n + i] > 0}


def log_health(window: HealthWindow, detector: CollapseDetector | None, step: int, row: dict[str, Any],
               bar_fields: dict[str, float],
               mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> str | None:
    """Add the diagnostics (and ``collapse_warning`` when the detector fires) to the log ``row``, and H/lnK
    to the progress fields; returns the warning text or None."""
    diag = averaged_diagnostics(window, mean_over_ranks)
    row.update(diag)
    if "teacher_entropy" in diag and diag.get("ln_k"):
        bar_fields["H/lnK"] = diag["teacher_entropy"] / diag["ln_k"]
    warning = None
    if detector is not None:
        warning = detector.update(step, diag.get("teacher_entropy"), diag.get("effective_rank"),
                                  diag.get("teacher_information"))
    if warning is not None:
        row["collapse_warning"] = warning
    return warning


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
