"""benchmarks/gpu_suite.py, the one-command GPU check of issue 13: its --smoke run on the CPU gives every
section's keys (so the script cannot rot while no GPU is at hand), and without CUDA it refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MEDDINO_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=300, env=env)


def test_smoke_run_prints_every_section():
    res = _run("--smoke")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert doc["smoke"] is True and doc["peak_bf16_tflops"] is None
    sec = doc["sections"]
    assert set(sec) == {"pretrain", "max_batch", "data_loader", "seg_latency"}
    for method in ("dinov2", "dinov3"):
        row = sec["pretrain"][f"{method}_vits_eager"]
        assert row["images_per_s_per_gpu"] > 0 and row["tflops_per_step"] > 0 and row["mfu"] is None
        assert row["images_per_s_per_gpu"] == pytest.approx(row["batch_per_gpu"] / row["s_per_step"])
        assert "skipped" in sec["pretrain"][f"{method}_vits_compiled"]
        assert "skipped" in sec["max_batch"][f"{method}_vits"]
    assert sec["data_loader"]["cpu_decode"]["images_per_s"] > 0
    device_path = sec["data_loader"]["gpu_decode"]  # smoke: the device path's code on CPU tensors
    assert device_path["crops_device"] == "cpu" and device_path["images_per_s"] > 0
    assert set(sec["seg_latency"]["heads"]) == {"linear", "unet", "eomt"}
    assert all(h["latency_ms_median"] > 0 for h in sec["seg_latency"]["heads"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_is_one_line_and_exit_2():
    res = _run()
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "CUDA is not available" in res.stderr


def test_peak_table_and_mfu_by_device_name():
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite

    assert gpu_suite.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_suite.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_suite.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert gpu_suite.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_suite.peak_bf16_tflops("NVIDIA L40S") == 362.05
    assert gpu_suite.peak_bf16_tflops("NVIDIA GeForce GTX 1080") is None
