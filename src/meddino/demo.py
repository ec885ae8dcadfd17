"""``meddino demo``: the whole chain on real medical images shipped by installed packages, on a CPU.

1. data: MNI152 T1 slices (nilearn) + CT/MR/US test images (pydicom) -> unlabeled set; anatomical-level
   labels and grey/white-matter masks derived from the same files (see :mod:`meddino.data.bundled`);
2. three backbones, as the seeds compare them: the tiny DINOv2 ViT at a seeded random init, the shipped
   "generic" start (the same ViT pretrained by meddino on natural photos, ``assets/generic_dinov2_tiny``,
   rebuilt by ``scripts/make_generic_start.py``), and that generic start continued with DINOv2 on the
   medical images;
3. the three backbones side by side: kNN and linear probe (patient-level folds) and a frozen-encoder linear
   segmentation head;
4. kNN on the intermediate checkpoint too (metric vs pretraining iteration), PCA feature maps of both
   backbones, bootstrap ranks and the HTML report.

Every step is the real CLI verb run in this process, so the demo exercises exactly what users run.

Tracking: the demo's ``log`` block (``meddino demo log.backends=[tensorboard]``) is handed to every step
that has one (:func:`step_log_values`), so each pretraining, evaluation, PCA and report run is one tracked
run, named after its step and tagged ``demo``, and every MLflow run goes to one store, ``OUT/mlruns``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from pathlib import Path

from meddino.config import Schema
from meddino.errors import UserError
from meddino.pretrain import commands as pretrain_commands
from meddino.report import commands as report_commands
from meddino.tasks.classify import commands as classify_commands
from meddino.tasks.seg import commands as seg_commands
from meddino.tracking import LogConfig
from meddino.verbs import Arg, Verb, load_attr, run_verb
from meddino.viz import commands as viz_commands


@dataclass(frozen=True)
class DemoPlan:
    size: int  # image size of every stage
    slice_step: int  # every n-th MNI slice
    iterations: int  # pretraining iterations
    batch_size: int
    seg_epochs: int
    linear_epochs: int
    bootstrap: int


GENERIC, CONTINUED = "generic (natural photos)", "continued DINOv2"
#: a step's name -> its ``log.*`` values (:func:`step_log_values`), or None when the demo tracks nothing
Tracked = Callable[[str], "dict[str, object] | None"]

# each of the six steps' share of the demo's time, measured (benchmarks/results/demo_steps_cpu.json); the
# whole-demo ETA scales them by the time the steps done so far actually took on this machine
FULL_SHARES = (0.035, 0.614, 0.0004, 0.317, 0.009, 0.025)
QUICK_SHARES = (0.171, 0.246, 0.003, 0.381, 0.080, 0.118)


def demo_eta(elapsed: float, shares: tuple[float, ...], step: int, fraction: float) -> float | None:
    """Seconds left in the whole demo after ``elapsed`` seconds, at ``fraction`` (0-1) of step ``step``
    (1-based), from the steps' measured ``shares`` of its time: elapsed x (left share / done share).
    None before 2 % of it is done (too little to scale by)."""
    total = sum(shares)
    done = (sum(shares[: step - 1]) + shares[step - 1] * min(max(fraction, 0.0), 1.0)) / total
    if done < 0.02 or elapsed <= 0:
        return None
    return elapsed * (1.0 - done) / done


class DemoClock:
    """Where the demo is (step, and part k of n within a step that runs several verbs) and its whole ETA,
    for the header of each step and, through :func:`meddino.runlog.outer_progress`, every progress line."""

    def __init__(self, shares: tuple[float, ...]):
        self.shares = shares
        self.t0 = time.perf_counter()
        self.step, self.part, self.parts = 0, 0, 1
        self.starts: list[float] = []

    def start(self, step: int, parts: int = 1) -> None:
        self.starts.append(time.perf_counter())
        self.step, self.part, self.parts = step, 0, max(parts, 1)

    def step_seconds(self) -> list[float]:
        """Wall seconds of each step started so far (the last one up to now)."""
        ends = [*self.starts[1:], time.perf_counter()]
        return [round(b - a, 2) for a, b in zip(self.starts, ends)]

    def next_part(self) -> None:
        self.part = min(self.part + 1, self.parts - 1)

    def eta(self, fraction: float = 0.0) -> float | None:
        within = (self.part + min(max(fraction, 0.0), 1.0)) / self.parts
        return demo_eta(time.perf_counter() - self.t0, self.shares, self.step, within)

    def describe(self, fraction: float = 0.0) -> str:
        eta = self.eta(fraction)
        left = "?" if eta is None else _mss(eta)
        return f"demo {self.step}/{len(self.shares)} eta {left}"


def _mss(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"

QUICK = DemoPlan(size=32, slice_step=2, iterations=40, batch_size=32, seg_epochs=4, linear_epochs=30, bootstrap=200)
FULL = DemoPlan(size=64, slice_step=1, iterations=200, batch_size=64, seg_epochs=12, linear_epochs=60, bootstrap=1000)

# docs/pretrain.md, "Why tiny runs sit at ln K": a teacher that can move in a short run, sharpening without
# the warm-up to 0.07, and the FINO head warm-up because the heads start fresh on a pretrained backbone
SMALL_SCALE = ("optim.momentum=0.95", "optim.momentum_end=0.995", "optim.teacher_temp=0.04")


VERBS = (
    Verb(
        "demo",
        help="run the whole chain on bundled real medical images (CPU, minutes, no download)",
        description="A tiny DINOv2 ViT pretrained on natural photos (the shipped generic start) continued "
        "on MNI152 and DICOM test images; random init vs generic vs continued evaluation (kNN, linear probe, "
        "frozen-encoder segmentation), PCA maps, bootstrap ranks and an HTML report.",
        schema="meddino.demo:DemoConfig",
        run="meddino.demo:run",
        source="demo takes only out=DIR and log.* (docs/tracking.md)",
        run_folder="out",
        rerun=True,  # a second demo into its folder redoes it (pretraining resumes)
        args=(Arg("--quick", "quick", switch=True, help="smaller images and fewer iterations (< 3 minutes)"),),
        overrides_help="out=DIR (default runs/demo) log.backends=[tensorboard,mlflow,wandb] log.experiment=NAME "
        "log.offline=true ... (every step is tracked; docs/tracking.md)",
    ),
)
# the verbs the demo runs, by their command-line path ("eval knn")
STEPS = {v.path: v for v in (*pretrain_commands.VERBS, *classify_commands.VERBS, *seg_commands.VERBS,
                             *viz_commands.VERBS, *report_commands.VERBS)}


class DemoConfig(Schema):
    quick: bool = False
    out: str = "runs/demo"
    log: LogConfig = LogConfig()  # handed to every step (module docstring)


def run(cfg: DemoConfig) -> int:
    from meddino.models.checkpoints.load import quiet_load_reports  # torch: only once the demo runs

    with quiet_load_reports():  # the demo loads only what it wrote or ships: no 'loaded ...' line per step
        report = run_demo(Path(cfg.out), QUICK if cfg.quick else FULL, cfg.log)
    print(f"\nmeddino demo finished: open {report}")
    return 0


def step_log_values(log: LogConfig, out: Path, step_name: str) -> dict[str, object]:
    """The ``log.*`` values of one demo step: the demo's block, the run named ``[RUN_NAME ]STEP_NAME``,
    tagged ``demo``, and MLflow's store ``OUT/mlruns`` unless a tracking URI is given (or
    MLFLOW_TRACKING_URI is, when not offline), so the steps' runs are found in one place."""
    values = {f"log.{k}": v for k, v in log.model_dump(mode="json").items()}
    values["log.run_name"] = f"{log.run_name} {step_name}" if log.run_name else step_name
    values["log.tags"] = [*log.tags, *(["demo"] if "demo" not in log.tags else [])]
    if "mlflow" in log.backends and not log.tracking_uri and (log.offline or not os.environ.get("MLFLOW_TRACKING_URI")):
        values["log.tracking_uri"] = str((out / "mlruns").resolve())
    return values


def _run(path: str, *overrides: object, recipe: str | None = None, log: dict[str, object] | None = None,
         **values: object) -> None:
    """One verb, exactly as ``meddino PATH [--config RECIPE] OVERRIDES`` runs it, with the ``log`` values
    when its config has a ``log`` block; a failure stops the demo with that verb's message."""
    if log and "log" in load_attr(STEPS[path].schema).model_fields:
        values = {**log, **values}
    try:
        code = run_verb(STEPS[path], recipe, [str(o) for o in overrides], values, force=True)
    except UserError as exc:
        raise UserError(f"demo step `meddino {path}` failed: {exc}") from None
    if code != 0:
        raise UserError(f"demo step failed (exit {code}): meddino {path}")


def generic_start(arch: str = "dinov2_tiny") -> Path:
    """A shipped generic start checkpoint: the tiny DINOv2 ViT pretrained on natural photos (the demo's), or
    ``arch="dinov3_tiny"``, the tiny DINOv3 architecture pretrained on the same photos with the DINOv2
    objective (``scripts/make_generic_start.py`` says why)."""
    path = Path(str(files("meddino") / "assets" / f"generic_{arch}.safetensors"))
    if not path.is_file():
        raise UserError(f"demo: the generic start checkpoint {path} is missing from this install; "
                        f"rebuild it with scripts/make_generic_start.py --arch {arch}")
    return path


def _step(clock: DemoClock, n: int, text: str, parts: int = 1) -> None:
    clock.start(n, parts)
    eta = clock.eta()
    when = f"  ({_mss(time.perf_counter() - clock.t0)} so far" + (f", about {_mss(eta)} left)" if eta else ")")
    print(f"\n[{n}/{len(clock.shares)}] {text}" + (when if n > 1 else ""), flush=True)


def _evaluate(name: str, spec: Path, tag: str, folds: Path, seg_manifest: Path, classes: list[str], runs: Path,
              plan: DemoPlan, clock: DemoClock, track: Tracked) -> None:
    """kNN, linear probe and frozen-encoder segmentation of one backbone (three parts of the clock's step)."""
    common = [f"data.manifest={folds}", f"backbone={spec}", f"model_name={name}", "dataset_name=MNI152 level"]
    _run("eval knn", *common, f"data.img_size={plan.size}", f"out={runs / f'knn_{tag}'}", recipe="knn_tiny",
         log=track(f"knn {name}"))
    clock.next_part()
    _run("eval linear", *common, f"data.img_size={plan.size}", f"linear.epochs={plan.linear_epochs}",
         f"out={runs / f'linear_{tag}'}", recipe="linear_tiny", log=track(f"linear {name}"))
    clock.next_part()
    _run("eval seg", f"data.manifest={seg_manifest}", f"backbone={spec}", f"model_name={name}",
         "dataset_name=MNI152 tissue", "head=linear", f"data.image_size={plan.size}",
         f"data.classes={classes}", "data.folds=3", f"train.epochs={plan.seg_epochs}",
         f"out={runs / f'seg_{tag}'}", recipe="seg_tiny", log=track(f"seg {name}"))
    clock.next_part()


def run_demo(out: Path, plan: DemoPlan = FULL, log: LogConfig | None = None) -> Path:
    from meddino.runlog import outer_progress

    clock = DemoClock(QUICK_SHARES if plan == QUICK else FULL_SHARES)
    log = log or LogConfig()
    track = partial(step_log_values, log, Path(out)) if log.trackers else lambda _name: None
    with outer_progress(clock.describe):  # every verb's progress line also shows the whole demo's ETA
        return _run_demo(Path(out), plan, clock, track)


def _run_demo(out: Path, plan: DemoPlan, clock: DemoClock, track: Tracked) -> Path:
    import torch  # torch, numpy, the models: only once the demo runs, not for `meddino --help`

    from meddino.data.bundled import SEG_CLASSES, build_demo_data
    from meddino.models import build_backbone, export_backbone
    from meddino.runlog import write_json

    t0 = time.time()
    runs = out / "runs"
    _step(clock, 1, "building the demo data set from nilearn's MNI152 template and pydicom's test images")
    data = build_demo_data(out / "data", size=plan.size, step=plan.slice_step)
    n_unlabeled = sum(1 for _ in data.unlabeled.iterdir())
    print(f"  {n_unlabeled} unlabeled images, labelled slices in {data.classify_manifest.name} and {data.seg_manifest.name}")

    _step(clock, 2, f"continued DINOv2 pretraining of the generic tiny ViT on the medical images ({plan.iterations} iterations)")
    torch.manual_seed(0)
    random_start = export_backbone(build_backbone("dinov2_tiny", img_size=plan.size), out / "start_backbone")
    generic = generic_start()
    pretrain_dir = runs / "pretrain"
    _run("pretrain", f"data.path={data.unlabeled}", f"init={generic}",
         f"out={pretrain_dir}", f"train.iterations={plan.iterations}", f"data.batch_size={plan.batch_size}",
         f"crops.global_size={plan.size}", f"crops.local_size={plan.size // 2}",
         f"train.checkpoint_every={max(plan.iterations // 2, 1)}", "resume=auto", *SMALL_SCALE,
         f"head_warmup.frozen_iters={plan.iterations // 8}", f"head_warmup.ramp_iters={plan.iterations // 8}",
         recipe="dinov2_tiny", log=track("pretrain"))
    # the per-checkpoint exports carry their iteration in the name, so the report can plot metric vs iteration;
    # the last one holds the same weights as OUT/teacher_backbone.safetensors
    snapshots = sorted((pretrain_dir / "checkpoints").glob("teacher_backbone_*.safetensors"))
    continued = snapshots[-1] if snapshots else pretrain_dir / "teacher_backbone.safetensors"
    backbones = {"random init": random_start, GENERIC: generic, CONTINUED: continued}

    _step(clock, 3, "patient-level folds for the labelled slices")
    folds = out / "data" / "classify_folds.csv"
    _run("data split", f"out={folds}", "k=3", "seed=0", manifest=str(data.classify_manifest))

    _step(clock, 4, "classification (kNN, linear probe) and frozen-encoder segmentation: random vs generic vs "
          "continued", parts=3 * len(backbones) + len(snapshots[:-1]))
    for i, (name, spec) in enumerate(backbones.items()):
        _evaluate(name, spec, f"m{i}", folds, data.seg_manifest, list(SEG_CLASSES), runs, plan, clock, track)

    for snapshot in snapshots[:-1]:  # kNN along the pretraining run
        iteration = int(snapshot.stem.rsplit("_", 1)[-1])
        _run("eval knn", f"data.manifest={folds}", f"backbone={snapshot}",
             f"model_name={CONTINUED} (iteration {iteration})", "dataset_name=MNI152 level",
             f"data.img_size={plan.size}", f"out={runs / f'knn_it{iteration}'}", recipe="knn_tiny",
             log=track(f"knn {CONTINUED} (iteration {iteration})"))
        clock.next_part()

    _step(clock, 5, "PCA feature maps of the three backbones")
    _run("viz pca", f"out={runs / 'pca'}", f"img_size={plan.size}", images=[str(i) for i in data.viz_images],
         backbones=[str(s) for s in backbones.values()], labels=list(backbones), log=track("pca"))

    _step(clock, 6, "bootstrap ranks and the HTML report")
    _run("report", f"out={out / 'report'}", f"bootstrap.samples={plan.bootstrap}", "title=meddino demo",
         f"compare=[{CONTINUED}, {GENERIC}]", runs=str(runs), log=track("report"))
    seconds = clock.step_seconds()
    write_json(out / "demo_steps.json", {"plan": "quick" if plan == QUICK else "full", "step_seconds": seconds,
                                         "shares": [round(x / sum(seconds), 4) for x in seconds],
                                         "total_s": round(time.time() - t0, 1)})
    print(f"  demo took {time.time() - t0:.0f} s")
    return out / "report" / "report.html"
