"""Test-wide settings: nothing downloads, caches live in a temp dir, one CPU thread per worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.mkdtemp(prefix="meddino-test-cache-"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HOME": str(_CACHE / "hf"),
    "TORCH_HOME": str(_CACHE / "torch"),
    "XDG_CACHE_HOME": str(_CACHE / "xdg"),
    "MPLCONFIGDIR": str(_CACHE / "mpl"),
    "MPLBACKEND": "Agg",
    "MEDDINO_QUIET": "1",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_meddino(*args: str, cwd: str | Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (``python -m meddino ARGS``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "meddino", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


@pytest.fixture
def cli():
    """``cli("eval", "knn", ...)`` -> CompletedProcess of the real CLI."""
    return run_meddino
