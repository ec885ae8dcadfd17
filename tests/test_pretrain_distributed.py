"""``torchrun --nproc_per_node 2`` with gloo on CPU against the single-process run with the same global batch.

Compared with DINOv1 and drop path 0: per-sample drop path draws from each process's own RNG, and KoLeo is
computed per process (as in the originals), so v2/v3 runs with those terms differ by design between 1 and
2 processes. Everything else (data order, crops, iBOT masks, centre / Sinkhorn all-reduces, lr scaling by
the global batch, DDP gradient averaging) is world-size independent, which the v2 case checks with KoLeo
and drop path switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from meddino.pretrain.checkpoint import load_checkpoint


def make_images(folder, n: int = 16, seed: int = 0):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.kron(rng.random((4, 4, 3)), np.ones((10, 12, 1)))
        Image.fromarray((255 * img).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return folder


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "meddino", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference, leaving out the KEY third of each ``attn.qkv.bias``: adding a constant
    to every key shifts all logits of a query equally, so softmax attention makes that gradient exactly 0
    in exact arithmetic; what remains is float round-off (~1e-10), which AdamW divides by its own running
    RMS and turns into O(lr) steps whose direction depends on summation order (1 vs 2 processes). Those
    entries are therefore not comparable to 1e-5 by construction."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        x, y = a[k].double(), b[k].double()
        if k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d :]]), torch.cat([y[:d], y[2 * d :]])
        worst = max(worst, (x - y).abs().max().item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    ("dinov1_tiny", []),
    ("dinov2_tiny", ["method.koleo_weight=0"]),
])
def test_two_processes_match_one(recipe, extra, tmp_path):
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.engine import run_pretrain

    data = make_images(tmp_path / "imgs", n=16)
    # a large base lr (still scaled by the global batch of 8) so that the weights move well beyond 1e-5
    common = [f"data.path={data}", "train.iterations=6", "train.checkpoint_every=3", "model.drop_path=0",
              "optim.lr=0.05", *extra]
    two = tmp_path / "two"
    res = _torchrun(["pretrain", "--config", recipe, *common, "data.batch_size=4", f"out={two}"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    one = tmp_path / "one"
    run_pretrain(load_config(PretrainConfig, recipe, [*common, "data.batch_size=8", f"out={one}"], "pretrain"))
    a = load_checkpoint(one / "checkpoints" / "checkpoint_00000006.pt")
    b = load_checkpoint(two / "checkpoints" / "checkpoint_00000006.pt")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert _max_diff(a["student"], b["student"]) < 1e-5
    assert _max_diff(a["teacher"], b["teacher"]) < 1e-5
    assert (a["center"] - b["center"]).abs().max().item() < 1e-5
    # the student moved (the comparison is not between two untouched initialisations)
    c = load_checkpoint(one / "checkpoints" / "checkpoint_00000003.pt")
    assert _max_diff(a["student"], c["student"]) > 1e-3


@pytest.mark.slow
def test_two_ranks_stay_identical_and_resume(tmp_path):
    """Each rank checks after every step that its student equals rank 0's (broadcast + compare), through
    a stop and a ``resume=auto`` under torchrun."""
    data = make_images(tmp_path / "imgs", n=16)
    out = tmp_path / "run"
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from meddino.config import load_config\n"
        "from meddino.pretrain.config import PretrainConfig\n"
        "from meddino.pretrain import engine\n"
        "orig = engine.Trainer.train_step\n"
        "def step(self, it, batch):\n"
        "    out = orig(self, it, batch)\n"
        "    for p in list(self.student.parameters()) + list(self.objective.teacher.parameters()):\n"
        "        q = p.detach().clone(); dist.broadcast(q, 0)\n"
        "        assert torch.equal(q, p.detach()), f'ranks diverged at iteration {it}'\n"
        "    return out\n"
        "engine.Trainer.train_step = step\n"
        "cfg = load_config(PretrainConfig, 'dinov3_tiny', sys.argv[1:], 'pretrain')\n"
        "engine.run_pretrain(cfg)\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            f"data.path={data}", f"out={out}", "data.batch_size=4", "train.iterations=6", "train.checkpoint_every=2"]
    res = subprocess.run([*base, "train.stop_at=4"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([*base, "resume=auto"], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    state = load_checkpoint(out / "checkpoints" / "checkpoint_00000006.pt")
    assert state["iteration"] == 6 and torch.isfinite(torch.stack([v.float().sum() for v in state["student"].values()])).all()


def _final_state(out, iteration: int = 6) -> dict:
    """student / teacher / center of checkpoint ``iteration``, from a ``.pt`` file or a sharded ``.dcp`` folder."""
    from meddino.models.checkpoints.dcp import read_tensors

    folder = out / "checkpoints" / f"checkpoint_{iteration:08d}.dcp"
    if folder.is_dir():
        return {"fsdp": True, "student": read_tensors(folder, "student"), "teacher": read_tensors(folder, "teacher"),
                "center": torch.load(folder / "state.pt", weights_only=True)["center"]}
    return load_checkpoint(out / "checkpoints" / f"checkpoint_{iteration:08d}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [
    # prototypes trained from step 0: a parameter whose FIRST AdamW step falls mid-run gets an update of
    # ~lr * sign(g) on entries whose gradient is at round-off level, which is not comparable to 1e-5;
    # the full format under FSDP2 (every tensor gathered onto rank 0) here, the sharded one (auto) for v2
    ("dinov1_tiny", ["optim.freeze_last_layer_epochs=0", "train.checkpoint_format=full"]),
    ("dinov2_tiny", ["method.koleo_weight=0"]),
])
def test_fsdp2_on_cpu_resumes_and_matches_one_process(recipe, extra, tmp_path):
    """FSDP2 (train.fsdp=true) with gloo: sharded student, teacher and optimiser; stopped at 3, resumed to 6,
    and equal to the single-process run to 1e-5."""
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.engine import run_pretrain

    data = make_images(tmp_path / "imgs", n=16)
    common = [f"data.path={data}", "train.iterations=6", "train.checkpoint_every=3", "model.drop_path=0",
              "optim.lr=0.05", *extra]
    sharded = tmp_path / "fsdp"
    args = ["pretrain", "--config", recipe, *common, "data.batch_size=4", f"out={sharded}", "train.fsdp=true"]
    res = _torchrun([*args, "train.stop_at=3"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun([*args, "resume=auto"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    one = tmp_path / "one"
    run_pretrain(load_config(PretrainConfig, recipe, [*common, "data.batch_size=8", f"out={one}"], "pretrain"))
    a = load_checkpoint(one / "checkpoints" / "checkpoint_00000006.pt")
    b = _final_state(sharded)
    assert b["fsdp"] is True and not a["fsdp"]
    assert (sharded / "checkpoints" / "checkpoint_00000006.dcp").is_dir() == (recipe == "dinov2_tiny")
    for part in ("student", "teacher"):  # a sharded checkpoint leaves out the alias ibot_head.* of the shared head
        assert set(b[part]) <= set(a[part])
        a[part] = {k: v for k, v in a[part].items() if k in b[part]}
    assert _max_diff(a["student"], b["student"]) < 1e-5
    assert _max_diff(a["teacher"], b["teacher"]) < 1e-5
    assert (a["center"] - b["center"]).abs().max().item() < 1e-5
    from meddino.models import load_backbone

    exported = load_backbone(sharded / "teacher_backbone.safetensors")
    for name, p in exported.vit.state_dict().items():
        assert torch.equal(p, b["teacher"][f"backbone.vit.{name}"]), name


_CRASH_ONCE = """
import os, sys
from meddino.pretrain import engine
step = engine.Trainer.train_step
def crash_once(self, it, batch):
    if it == 4 and self.env.rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        print("injected failure: rank 1 exits at iteration 4", file=sys.stderr, flush=True)
        os._exit(1)
    return step(self, it, batch)
engine.Trainer.train_step = crash_once
from meddino.cli import main
sys.exit(main(["pretrain", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_survive_an_elastic_restart_bit_identically_and_convert(tmp_path, capsys):
    """docs/distributed.md's recipe on one node: c10d rendezvous, ``--max-restarts 1``, ``resume=auto``,
    FSDP2 over 2 gloo processes with sharded checkpoints (train.checkpoint_format=auto), DINOv1. Rank 1
    dies at iteration 4 of the first attempt (after the checkpoint at 3); torchrun restarts both, they
    resume from checkpoint_00000003.dcp, and the end equals the uninterrupted run bit for bit (student,
    teacher, every AdamW moment and step, centres, losses), the prototypes frozen across the checkpoint
    (0.5 x 10 iterations, so it has no AdamW state for them). Each rank wrote its own shards; ``meddino
    convert`` of the last folder on this process (no process group) is the run's own teacher export."""
    import socket

    from meddino.cli import main
    from meddino.models.checkpoints.dcp import read_tensors
    from meddino.runlog import read_metrics

    data = make_images(tmp_path / "imgs", n=16)
    args = ["--config", "dinov1_tiny", f"data.path={data}", "train.iterations=6", "train.checkpoint_every=3",
            "data.batch_size=4", "train.fsdp=true", "optim.lr=0.05", "resume=auto"]
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    res = _torchrun(["pretrain", *args, f"out={straight}"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    script = tmp_path / "crash_once.py"
    script.write_text(_CRASH_ONCE)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    # torch 2.14: without it the restarted workers fail in init_process_group (a stale gloo address in the
    # rendezvous store that torchrun shares with them; pytorch/pytorch#135712 for NCCL)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-id=t",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--max-restarts=1", str(script), *args,
           f"out={restarted}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "injected failure" in res.stderr
    assert f"resuming from {restarted / 'checkpoints' / 'checkpoint_00000003.dcp'} at iteration 3" in res.stderr
    marker = json.loads((restarted / "checkpoints" / "checkpoint_00000003.dcp" / "meddino_checkpoint.json").read_text())
    assert marker["world_size"] == 2 and not [n for n in marker["optimizer_params"] if "last_layer" in n]
    folders = [p / "checkpoints" / "checkpoint_00000006.dcp" for p in (straight, restarted)]
    for section in ("student", "teacher", "optimizer"):
        a, b = (read_tensors(f, section) for f in folders)
        assert a.keys() == b.keys() and a, section
        for k in a:
            assert torch.equal(a[k], b[k]), (section, k)
    assert any("last_layer" in k for k in b)  # trained from iteration 5, in both runs
    small = [torch.load(f / "state.pt", weights_only=True) for f in folders]
    assert torch.equal(small[0]["center"], small[1]["center"]) and len(small[0]["rng"]) == 2
    la, lb = ({r["step"]: r["loss"] for r in read_metrics(p) if "loss" in r} for p in (straight, restarted))
    assert la == lb and 6 in la
    shards = {p.name: p.stat().st_size for p in folders[0].glob("__*_0.distcp")}
    assert set(shards) == {"__0_0.distcp", "__1_0.distcp"}
    assert max(shards.values()) < 0.75 * sum(shards.values())  # split between the ranks, not all on rank 0
    capsys.readouterr()
    assert main(["convert", str(folders[1]), str(tmp_path / "teacher")]) == 0
    assert (tmp_path / "teacher.safetensors").read_bytes() == (restarted / "teacher_backbone.safetensors").read_bytes()


@pytest.mark.slow
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_three(tmp_path):
    """DCP reshards on load: a checkpoint written by 2 FSDP2 ranks resumes on 3 (the elastic case of a
    job coming back with more processes). The teacher it loads is exactly the one saved (its export at the
    checkpoint, rewritten by the 3-rank run that ends there, is byte-identical), the AdamW state goes on
    (step counts continue from the checkpoint's), and the RNG streams restart with a warning."""
    from meddino.models.checkpoints.dcp import read_tensors

    data = make_images(tmp_path / "imgs", n=24)
    out = tmp_path / "run"
    args = ["pretrain", "--config", "dinov2_tiny", f"data.path={data}", "train.checkpoint_every=2",
            "data.batch_size=4", "train.fsdp=true", "method.koleo_weight=0", f"out={out}"]
    res = _torchrun([*args, "train.iterations=4", "train.stop_at=2"], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = out / "checkpoints" / "checkpoint_00000002.dcp"
    assert json.loads((saved / "meddino_checkpoint.json").read_text())["world_size"] == 2
    export = (out / "checkpoints" / "teacher_backbone_00000002.safetensors").read_bytes()
    res = _torchrun([*args, "train.iterations=2", "resume=auto"], 3)  # ends at the checkpoint: its teacher
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RNG streams restart" in res.stderr
    assert (out / "teacher_backbone.safetensors").read_bytes() == export
    res = _torchrun([*args, "train.iterations=4", "resume=auto"], 3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {saved} at iteration 2" in res.stderr
    last = out / "checkpoints" / "checkpoint_00000004.dcp"
    assert json.loads((last / "meddino_checkpoint.json").read_text())["world_size"] == 3
    steps = {k: v for k, v in read_tensors(last, "optimizer").items() if k.endswith(".step")}
    assert steps and {float(v) for k, v in steps.items() if ".backbone." in k} == {4.0}
