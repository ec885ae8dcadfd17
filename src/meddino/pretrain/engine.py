"""The pretraining loop: ``run_pretrain(cfg)`` behind ``meddino pretrain``.

One iteration: teacher targets from the 2 global crops (no grad) -> student forward (2 masked global crops
in one pass, all local crops in one pass) -> DINO (+ iBOT, KoLeo, Gram) loss -> backward (DDP all-reduces
backbone and head gradients together) -> clipping (v1 per parameter; v2/v3 global norm per sub-model) and
the freeze-last-layer rule -> AdamW with the scheduled lr / weight decay per parameter group -> EMA
teacher update -> EMA centre update.

Every schedule is a function of the iteration (lr with the version's batch scaling rule on the GLOBAL
batch, linear warm-up then cosine; weight decay cosine; teacher momentum cosine; teacher temperature
warm-up per iteration (v2/v3) or per epoch (v1)), so resuming only needs the iteration; the checkpoint
holds student, teacher, Gram teacher, centres, optimiser and RNG states, and the data order is a pure
function of (seed, iteration) (see :mod:`meddino.pretrain.data`): a resumed run is bit-identical to an
uninterrupted one on CPU.

Continued pretraining (``init=CKPT``): student, teacher and Gram teacher start from the checkpoint (any
format :func:`meddino.models.resolve_backbone` reads), heads start fresh, and ``head_warmup`` keeps the
backbone frozen for ``frozen_iters`` iterations, then ramps its lr linearly over ``ramp_iters`` to the
scheduled value (or to the constant ``head_warmup.backbone_lr``). ``head_warmup.mode=fino`` (default, the
DINOv3 FINO branch): the backbone keeps receiving gradients and AdamW moments while its lr and weight
decay are 0, the weight decay ramps with the lr, and the constant lr is batch-scaled like ``optim.lr``;
``mode=requires_grad``: no gradient, no moment, weight decay as scheduled, the constant lr as given.

The schedules, optimiser groups and clipping are :mod:`meddino.pretrain.optim`; the checkpoint state and
the resume are :mod:`meddino.pretrain.checkpoint` (one ``.pt``) and :mod:`meddino.pretrain.sharded` (a DCP
folder each rank writes its shards into: ``train.checkpoint_format``, sharded by default under FSDP2); this
module orchestrates them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddino import ssl
from meddino.data.device_crops import DeviceCrops
from meddino.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, UserError, first_line
from meddino.models import export_backbone, resolve_backbone
from meddino.models.checkpoints.dcp import is_sharded_checkpoint
from meddino.models.checkpoints.export import export_meta
from meddino.pretrain import checkpoint as ckpt
from meddino.pretrain import sharded as dcp_ckpt
from meddino.pretrain.compiling import compile_units, compile_unavailable
from meddino.pretrain.config import PretrainConfig, arch_patch_size, arch_version
from meddino.pretrain.data import (
    CropDataset,
    StepBatchSampler,
    build_augmentation,
    build_source,
    data_summary,
    describe_skipped,
    device_batch,
    make_loader,
    require_full_batch,
)
from meddino.pretrain.distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    cleanup,
    full_state_dict,
    shard_fsdp,
    init_distributed,
    mean_over_ranks,
    wrap_student,
)
from meddino.pretrain.figures import knn_curve, pca_panel
from meddino.pretrain.health import CollapseDetector, HealthWindow, log_health
from meddino.pretrain.method import SSLObjective, Student, build_student, iteration_masks
from meddino.pretrain.monitor import KNNMonitor
from meddino.pretrain.optim import Schedules, apply_schedules, build_optimizer, clip_and_freeze
from meddino.runlog import Progress, RunDir, read_metrics, write_json


class TrainingCollapsed(UserError):
    """The collapse detector fired with ``train.stop_on_collapse=true``: one line, exit code 2, no checkpoint
    of the collapsed state (the last good one is named in the message)."""


def run_pretrain(cfg: PretrainConfig) -> int:
    """Entry point of ``meddino pretrain`` (and of every torchrun process)."""
    env = init_distributed(cfg.train.device)
    try:
        Trainer(cfg, env).fit()
    finally:
        cleanup()
    return 0


class Trainer:
    def __init__(self, cfg: PretrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.out = Path(cfg.out).expanduser()
        self.ckpt_dir = self.out / "checkpoints"
        prec = cfg.train.precision
        if prec == "bf16" and self.device.type != "cuda":
            raise ConfigError("train.precision=bf16 needs CUDA (CPU runs in fp32)")
        self.autocast = self.device.type == "cuda" and prec in ("auto", "bf16")
        if cfg.crops.device == "cuda" and self.device.type != "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("crops.device=cuda: no CUDA GPU is available here (torch.cuda.is_available() "
                                  "is false); use crops.device=loader, the CPU workers' path")
            raise ConfigError("crops.device=cuda: the model trains on the CPU (train.device=cpu); the crops "
                              "would come back from the GPU: use crops.device=loader or train.device=cuda")
        self.global_batch = cfg.data.batch_size * env.world_size

    # ------------------------------------------------------------------------------------------ setup
    def _build_backbone(self) -> nn.Module:
        cfg = self.cfg
        img_size = cfg.model.img_size or cfg.crops.global_size
        if cfg.init:
            backbone = resolve_backbone(cfg.init, img_size=img_size, drop_path_rate=cfg.model.drop_path)
            asked, found = arch_version(cfg.model.arch), getattr(backbone, "version", "cnn")
            if asked and found not in (asked, "cnn"):
                raise CheckpointError(
                    f"init: {cfg.init} holds a DINO{found} backbone but model.arch={cfg.model.arch} is a "
                    f"DINO{asked} architecture; set model.arch to a {found} architecture to continue it "
                    "(the objective stays the recipe's)"
                )
            want = arch_patch_size(cfg.model.arch)
            if want and backbone.patch_size != want:
                raise ConfigError(
                    f"init: {cfg.init} has patch size {backbone.patch_size} but model.arch={cfg.model.arch} "
                    f"has {want}; set model.arch to the checkpoint's architecture"
                )
        else:
            backbone = resolve_backbone(f"random:{cfg.model.arch}", img_size=img_size, drop_path_rate=cfg.model.drop_path)
        if getattr(backbone, "version", "cnn") == "cnn":
            raise ConfigError("init/model.arch: DINO pretraining needs a ViT backbone, not a CNN")
        if cfg.train.grad_checkpointing:
            backbone.set_grad_checkpointing(True)
        return backbone

    def setup(self, require_batch: bool = True) -> None:
        """The data source (refused when it cannot fill one global batch, unless ``require_batch=False``:
        the profiler feeds synthetic batches), then model, optimiser, schedules and (on resume) state."""
        self.source = build_source(self.cfg, out=self.out, is_main=self.env.is_main)
        if require_batch:
            require_full_batch(self.source, self.global_batch, Path(self.cfg.data.path).expanduser())
        self.setup_model(len(self.source))

    def setup_model(self, n_samples: int) -> None:
        """Everything but the data: student/teacher, optimiser, schedules (the epoch length of v1 is the
        number of full global batches in ``n_samples``), resume state, DDP wrapping, monitor."""
        cfg, env = self.cfg, self.env
        if env.is_main:  # a kill during an atomic write leaves its temp file: nothing else ever removes it
            stale = ckpt.remove_stale_temp_files(self.out, self.ckpt_dir)
            if stale:
                print(f"removed {len(stale)} temp file(s) of an interrupted write in {self.out}", file=sys.stderr)
        resume_path = ckpt.resume_path(self.cfg.resume, self.ckpt_dir, self.out)
        torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
        backbone = self._build_backbone()
        self.student: Student = build_student(cfg, backbone).to(self.device)
        self.objective = SSLObjective(cfg, self.student).to(self.device)
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        self.sharded = bool(cfg.train.fsdp and env.distributed)
        fmt = cfg.train.checkpoint_format
        self.checkpoint_format = "sharded" if fmt == "sharded" or (fmt == "auto" and self.sharded) else "full"
        self._plain_backbone: nn.Module | None = None
        if self.sharded:  # an unsharded copy to export / monitor the teacher from gathered weights
            self._plain_backbone = copy.deepcopy(backbone).cpu()
            shard_fsdp(self.student, self.objective.teacher, self.objective.gram_teacher, env)

        self.data_steps_per_epoch = n_samples // self.global_batch
        epoch_length = cfg.train.epoch_length or max(self.data_steps_per_epoch, 1)
        self.sched = Schedules(cfg, self.global_batch, epoch_length)

        self.optimizer = build_optimizer(cfg, self.student.backbone, nn.ModuleDict(self.student.heads()), self.device)

        self.start_iter = 0
        source = getattr(self, "source", None)
        self.skipped: dict[str, str] = {x.path: str(x) for x in getattr(source, "index_skipped", [])}
        self._local_skipped: dict[str, str] = {}
        if resume_path is not None:
            self._load(resume_path)
        self.model: nn.Module = self.student
        # FINO keeps the backbone trainable (lr and weight decay 0 while frozen); the requires_grad variant
        # cuts its gradients until frozen_iters
        fino = self.sched.head_warmup_mode == "fino"
        self._set_backbone_trainable(fino or self.start_iter >= self.sched.frozen_iters, rewrap=False)
        self.model = wrap_student(self.student, env, cfg.train.fsdp)
        self.compiled = cfg.train.compile and self._compile()

        torch.manual_seed(cfg.train.seed + 1000 * (env.rank + 1) + self.start_iter)
        if resume_path is not None and self._resume_rng is not None:
            ckpt.set_rng_state(self._resume_rng)
        self._setup_watching()

    def _setup_watching(self) -> None:
        """The training-health window and collapse detector, and (rank 0) the k-NN monitor."""
        cfg = self.cfg
        self.health_window: HealthWindow | None = None
        self.collapse_detector: CollapseDetector | None = None
        if cfg.health.enabled:
            h = cfg.health
            self.health_window = HealthWindow(cfg.method.student_temp)
            self.collapse_detector = CollapseDetector(math.log(cfg.model.head.out_dim), h.entropy_tolerance,
                                                      h.min_effective_rank or None, h.patience,
                                                      h.min_information)

        self.monitor = None
        if cfg.monitor.every and cfg.monitor.manifest and self.env.is_main:
            m = cfg.monitor
            self.monitor = KNNMonitor(m.manifest, cfg.crops.global_size, self.mean, self.std, m.k,
                                      m.temperature, m.val_fraction, m.batch_size, cfg.train.seed)

    def _set_backbone_trainable(self, trainable: bool, rewrap: bool = True) -> None:
        """Freeze/unfreeze the student backbone (head warm-up); re-wraps DDP so its reducer sees it."""
        bb = self.student.backbone
        current = any(p.requires_grad for p in bb.parameters())
        for name, p in bb.named_parameters():
            if name == "mask_token" and not self.cfg.method.ibot.enabled:
                continue
            p.requires_grad_(trainable)
        if rewrap and self.env.distributed and current != trainable and not self.cfg.train.fsdp:
            self.model = wrap_student(self.student, self.env, False)  # compiled blocks stay compiled inside

    compiled = False

    def _compile(self) -> bool:
        """``train.compile=true``: student, teacher and Gram teacher compiled per block and head
        (:mod:`meddino.pretrain.compiling`); where torch.compile cannot run, one warning line and eager."""
        why = compile_unavailable(self.device)
        if why is not None:
            if self.env.is_main:
                print(f"meddino: warning: train.compile=true but torch.compile does not work on "
                      f"{self.device.type} here ({why}); training runs eager", file=sys.stderr, flush=True)
            return False
        compile_units([self.student, self.objective.teacher, self.objective.gram_teacher])
        return True

    # ------------------------------------------------------------------------------------------ state
    def _load(self, path: Path) -> None:
        """Resume from checkpoint ``path``: a ``.pt`` file (:func:`meddino.pretrain.checkpoint.restore_training_state`)
        or a sharded folder (:func:`meddino.pretrain.sharded.restore_sharded`), whatever this run writes."""
        restore = dcp_ckpt.restore_sharded if is_sharded_checkpoint(path) else ckpt.restore_training_state
        resumed = restore(path, self.student, self.objective, self.optimizer, sharded=self.sharded,
                          version=self.cfg.method.version, rank=self.env.rank, world_size=self.env.world_size)
        self.start_iter = resumed.iteration
        self.skipped.update(resumed.skipped)
        self._resume_rng = resumed.rng
        if resumed.rng is None:
            warnings.warn("resume: different number of processes than the checkpoint; RNG streams restart", stacklevel=2)
        if self.env.is_main:
            print(f"resuming from {path} at iteration {self.start_iter}", file=sys.stderr)

    _resume_rng: dict[str, Any] | None = None
    health_window: HealthWindow | None = None
    collapse_detector: CollapseDetector | None = None

    def save(self, iteration: int) -> None:
        """Checkpoint ``iteration`` in ``train.checkpoint_format`` and its teacher backbone export (a
        collective). Sharded: each rank writes its shards; the export gathers the teacher backbone alone
        (one model's weights, not heads or optimiser) onto rank 0."""
        self._merge_skipped()
        if self.checkpoint_format == "sharded":
            teacher_bb = self.teacher_backbone()
            if self.env.is_main:
                export_backbone(teacher_bb, ckpt.export_path(self.ckpt_dir, iteration))
            dcp_ckpt.save_sharded(
                self.ckpt_dir, iteration, self.student, self.objective, self.optimizer, is_main=self.env.is_main,
                world_size=self.env.world_size, fsdp=self.sharded, version=self.cfg.method.version,
                skipped=self.skipped, backbone=export_meta(teacher_bb, "", None), keep_last=self.cfg.train.keep_last,
            )
            return
        state = ckpt.training_state(  # collective (RNG gather, FSDP gathers): every rank calls it
            iteration, self.student, self.objective, self.optimizer, sharded=self.sharded,
            world_size=self.env.world_size, version=self.cfg.method.version, skipped=self.skipped,
        )
        teacher_bb = self.teacher_backbone(state["teacher"])
        if self.env.is_main:
            export_backbone(teacher_bb, ckpt.export_path(self.ckpt_dir, iteration))
            ckpt.save_checkpoint(self.ckpt_dir, iteration, state, self.cfg.train.keep_last)
        barrier()

    # ------------------------------------------------------------------------------------------ step
    def end_iteration(self) -> int:
        """The iteration this process stops at: ``train.iterations``, or ``train.stop_at`` before it."""
        t = self.cfg.train
        return min(t.iterations, t.stop_at or t.iterations)

    def is_log_step(self, done: int) -> bool:
        """Whether the row after ``done`` completed iterations is logged (every ``log_every``, and the last)."""
        return done % self.cfg.train.log_every == 0 or done == self.end_iteration()

    def _apply_schedules(self, it: int) -> dict[str, float]:
        """Iteration ``it``'s lr and weight decay into the optimiser groups; returns the scheduled values."""
        return apply_schedules(self.optimizer, self.sched, it, self.cfg.optim.clip_per_param)

    def train_step(self, it: int, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if it == self.sched.frozen_iters > 0 and self.sched.head_warmup_mode == "requires_grad":
            self._set_backbone_trainable(True)
        values = self._apply_schedules(it)
        non_blocking = self.device.type == "cuda"
        g = batch["global"].to(self.device, non_blocking=non_blocking)  # [2, B, 3, G, G]
        loc = batch["local"].to(self.device, non_blocking=non_blocking)  # [n, B, 3, L, L]
        b = g.shape[1]
        g = g.flatten(0, 1)
        loc = loc.flatten(0, 1) if loc.shape[0] > 0 else None
        grid = self.student.backbone.grid_size(g.shape[-2:])
        masks = iteration_masks(cfg, it, self.global_batch, batch["slot"], grid)
        if masks is not None:
            masks = masks.to(self.device, non_blocking=non_blocking)
        # the teacher side (EMA and Gram teacher) in its own no-grad path, bf16 when the step is
        targets = self.objective.teacher_targets(g, masks, values["teacher_temp"],
                                                 bf16_device=self.device.type if self.autocast else None)
        ac = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ac:
            out = self.model(g, loc, masks)
            terms = self.objective.losses(out, targets, masks, g, b, iteration=it)
        if self.health_window is not None:  # argmaxes every step; the tensors (detached) on log steps only
            self.health_window.update(targets["cls_probs"], out["cls_logits"], targets.get("cls_features"),
                                      targets.get("patch_probs"), out.get("patch_logits"),
                                      keep=self.is_log_step(it + 1))
        loss = terms["loss"]
        avg = mean_over_ranks(loss.detach().float().reshape(1))
        if not torch.isfinite(avg).all():
            last = ckpt.latest_checkpoint(self.ckpt_dir)
            raise TrainingDiverged(
                f"loss is {avg.item()} at iteration {it}; last good checkpoint: {last if last else 'none written yet'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_freeze(self.student, self.cfg, self.sched, it, self.sharded)
        self.optimizer.step()
        ssl.ema_update_(self.objective.teacher, self.student, values["momentum"])
        self.objective.update_centers(targets)
        self.objective.maybe_refresh_gram_teacher(it)  # refresh_every / it_first_update / max_refreshes
        terms = {k: v.detach() for k, v in terms.items()}
        terms["loss"] = avg[0]
        return {**terms, **{k: torch.tensor(v) for k, v in values.items()}}

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> None:
        self.setup()
        cfg, env = self.cfg, self.env
        # a resumed run goes on in the tracked run it started (tracking.json), from its checkpoint's iteration
        run = RunDir(self.out, cfg if env.is_main else None, resume_from=self.start_iter or None)
        try:
            self._fit(run)
        except BaseException:
            run.close(failed=True)
            raise
        run.close()

    def _fit(self, run: RunDir) -> None:
        cfg, env = self.cfg, self.env
        self._write_data_summary()
        if env.is_main:  # resumed: the rows up to its checkpoint; a fresh start: none of an earlier attempt
            ckpt.truncate_metrics(self.out / "metrics.jsonl", self.start_iter if self.start_iter > 0 else None)
        total = cfg.train.iterations
        end = self.end_iteration()
        if self.start_iter >= end:
            if env.is_main:
                print(f"nothing to do: the checkpoint is at iteration {self.start_iter} "
                      f"(train.iterations={total}, train.stop_at={cfg.train.stop_at})", file=sys.stderr)
            if self.start_iter >= total:
                self._final_export(run)
            return
        augment = build_augmentation(cfg, self.mean, self.std)
        on_device = cfg.crops.device != "loader"
        dataset = CropDataset(self.source, augment, cfg.train.seed, encoded=on_device)
        crops = DeviceCrops(augment, self.device if cfg.crops.device == "cuda" else "cpu") if on_device else None
        sampler = StepBatchSampler(len(self.source), self.global_batch, env.rank, env.world_size, cfg.train.seed,
                                   self.start_iter, end)
        loader = make_loader(dataset, sampler, cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.student.train()
        self.objective.train()
        imgs_per_it = self.global_batch
        t_log, n_log = time.perf_counter(), 0
        health_bar: dict[str, float] = {}  # H/lnK in the progress line, updated at each log step
        with Progress((end - self.start_iter) * imgs_per_it, "pretrain", unit="img") as bar:
            it = self.start_iter
            for batch in loader:
                if crops is not None:
                    batch = device_batch(batch, crops)
                self._count_skipped(batch)
                if batch["global"] is None:
                    raise DataError(f"data: every image of the batch at iteration {it} was unreadable "
                                    f"({describe_skipped(batch['skipped'], Path(cfg.data.path).expanduser())})")
                if batch["skipped"] and batch["global"].shape[1] < 2 and (cfg.method.koleo_weight or 0) > 0:
                    # KoLeo compares each image with its nearest other one: name the files, not the loss
                    raise DataError(f"data: 1 readable image left in the batch at iteration {it} and KoLeo needs "
                                    f"at least 2 ({describe_skipped(batch['skipped'], Path(cfg.data.path).expanduser())}"
                                    "); remove the unreadable files, raise data.batch_size or set method.koleo_weight=0")
                terms = self.train_step(it, batch)
                n_log += 1
                done = it + 1
                if self.is_log_step(done):
                    t_log, n_log = self._log_step(run, it, terms, t_log, n_log, health_bar), 0
                if cfg.monitor.every and cfg.monitor.manifest and done % cfg.monitor.every == 0:
                    teacher_bb = self.teacher_backbone()  # collective under FSDP
                    if self.monitor is not None:
                        dev = self.device if not self.sharded else torch.device("cpu")
                        run.log(done, **self.monitor.evaluate(teacher_bb, dev, self.autocast and not self.sharded))
                bar.advance(imgs_per_it, it=done, loss=float(terms["loss"]), lr=float(terms["lr"]), **health_bar)
                if done % cfg.train.checkpoint_every == 0 or done == end:
                    self.save(done)
                it = done
        if end < total:
            if env.is_main:
                print(f"stopped at iteration {end} of {total} (train.stop_at); continue with resume=auto",
                      file=sys.stderr)
            return
        self._final_export(run)

    def _log_step(self, run: RunDir, it: int, terms: dict[str, torch.Tensor], t_log: float, n_log: int,
                  health_bar: dict[str, float]) -> float:
        """The metrics row after iteration ``it`` (the ``n_log`` iterations since ``t_log``, health
        diagnostics, skipped files: a collective), then the collapse rule; returns the row's time."""
        done = it + 1
        self._merge_skipped()
        now = time.perf_counter()
        row = {k: float(v) for k, v in terms.items()}
        row["images_per_s"] = self.global_batch * n_log / max(now - t_log, 1e-9)
        row["s_per_iteration"] = (now - t_log) / n_log
        row["epoch"] = it / self.sched.epoch_length
        row["skipped_files"] = len(self.skipped)
        row["gram_refreshes"] = self.objective.gram_refreshes
        collapse = self._health_row(done, row, health_bar)
        run.log(done, **row)
        if collapse is not None:
            self._on_collapse(collapse)
        return now

    # ------------------------------------------------------------------------------------------ health
    def _health_row(self, step: int, row: dict[str, Any], bar_fields: dict[str, float]) -> str | None:
        """The window's diagnostics into ``row`` (averaged over ranks: a collective), H/lnK into the progress
        fields; returns the collapse warning or None."""
        if self.health_window is None:
            return None
        reduce = (lambda v: mean_over_ranks(v.to(self.device)).cpu()) if self.env.distributed else None
        return log_health(self.health_window, self.collapse_detector, step, row, bar_fields, reduce)

    def _on_collapse(self, warning: str) -> None:
        """One warning line on rank 0, or (``train.stop_on_collapse``) stop on every rank before any
        checkpoint of the collapsed state is written."""
        if self.cfg.train.stop_on_collapse:
            last = ckpt.latest_checkpoint(self.ckpt_dir)
            raise TrainingCollapsed(
                f"training collapsed: {warning}; stopped (train.stop_on_collapse=true); "
                f"last good checkpoint: {last if last else 'none written yet'}"
            )
        if self.env.is_main:
            print(f"meddino: warning: {warning}", file=sys.stderr, flush=True)

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        """Distinct unreadable samples (a file that fails in every epoch counts once)."""
        for s in batch.get("skipped", []):
            path = str(getattr(s, "path", s))
            key = path.split(" ", 1)[0] if path.startswith("#") else path
            self._local_skipped[key] = str(s)

    def _log_figures(self, run: RunDir, teacher_bb: nn.Module) -> None:
        """The end-of-run images for the trackers: the final teacher's PCA map of a few pretraining images,
        and the monitor's kNN accuracy over the iterations (when it ran)."""
        step = self.cfg.train.iterations
        panel = pca_panel(teacher_bb, self.source, self.cfg.crops.global_size, self.mean, self.std)
        if panel is not None:
            run.image("pretrain/pca", panel, step)
        curve = knn_curve(read_metrics(self.out))
        if curve is not None:
            run.image("pretrain/knn_curve", curve, step)

    def _merge_skipped(self) -> None:
        """Union of the unreadable files seen by every rank (a collective: called at log/checkpoint steps)."""
        local, self._local_skipped = self._local_skipped, {}
        for d in all_gather_object(local):
            self.skipped.update(d)

    def teacher_backbone(self, teacher_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The EMA teacher's backbone as a plain module (under FSDP2: the unsharded copy loaded with the
        backbone's weights gathered onto rank 0, or taken from ``teacher_state``; a collective that every
        rank must call)."""
        if not self.sharded:
            return self.objective.teacher.backbone
        prefix = "backbone."
        if teacher_state is None:  # the backbone alone: its heads are not needed for an export
            state = full_state_dict(self.objective.teacher.backbone, True)
        else:
            state = {k[len(prefix):]: v for k, v in teacher_state.items() if k.startswith(prefix)}
        assert self._plain_backbone is not None
        if state:  # gathered with cpu_offload: the full weights exist on rank 0 only
            self._plain_backbone.load_state_dict(state)
        return self._plain_backbone

    def _write_data_summary(self) -> None:
        """``data_summary.json``: the samples by kind and the unreadable files so far (rank 0)."""
        if self.env.is_main:
            write_json(self.out / "data_summary.json", data_summary(self.cfg, self.source, self.skipped))

    def _final_export(self, run: RunDir | None = None) -> None:
        teacher_bb = self.teacher_backbone()
        self._write_data_summary()  # with every unreadable file the run met (merged at the last save)
        if self.env.is_main:
            path = export_backbone(teacher_bb, self.out / "teacher_backbone.safetensors")
            if run is not None and run.tracks_images:
                try:  # the weights are written: a figure must not fail the run (nor hang the other ranks)
                    self._log_figures(run, teacher_bb)
                except Exception as exc:  # noqa: BLE001
                    print(f"meddino: warning: the end-of-run images for the trackers: {first_line(exc)}",
                          file=sys.stderr)
            n = len(self.skipped)
            if n:  # a clean run says nothing about it
                print(f"skipped {n} unreadable file{'s' if n != 1 else ''}", file=sys.stderr)
                for line in list(self.skipped.values())[:5]:
                    print(f"  {line}", file=sys.stderr)
            print(f"teacher backbone: {path}")
        barrier()
