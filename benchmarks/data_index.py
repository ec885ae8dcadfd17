"""The pretraining sample index at the seeds' scale: cold build, warm start, RSS per rank, worker PSS.

A synthetic manifest of ``--rows`` paths (no image exists: indexing opens none) is indexed in a fresh
process (cold build: ``meddino.data.index.build_index`` + ``write_index``), then opened in another fresh
process as a pretraining rank does (warm start: map the file, check it is fresh, wrap it as a source).
Each child reports its wall time and peak RSS. The workers' check runs a DataLoader with ``--workers``
workers over ``--epoch`` samples, each looking its sample's path up (what ``load`` does before decoding),
and samples every worker's PSS from ``/proc/PID/smaps_rollup`` at the start and at the end. ``--folder``
adds the threaded walk of a folder of that many empty files (the network-filesystem case).

Usage: python benchmarks/data_index.py --rows 4700000 [--folder 200000] > results/data_index_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_manifest(path: Path, rows: int) -> None:
    """``image,patient`` rows shaped like a frame dump: videoNNNNN/frame_NNNNNN.jpg (about 55 bytes a row)."""
    with open(path, "w") as fh:
        fh.write("image,patient\n")
        per_video = 3000
        for start in range(0, rows, 100_000):
            fh.write("".join(f"/data/surgery/video{i // per_video:05d}/frame_{i % per_video:06d}.jpg,P{i // 30000:04d}\n"
                             for i in range(start, min(rows, start + 100_000))))


def make_folder(root: Path, files: int) -> None:
    """``files`` empty .png files, 1000 per folder in two levels."""
    for i in range(files):
        d = root / f"d{i // 100_000:02d}" / f"s{(i // 1000) % 100:02d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:07d}.png").touch()


def _child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


COLD = """
import json, sys, time
t = time.perf_counter()
from meddino.data import index as dx
idx = dx.build_index(sys.argv[1], absolute=True, threads=int(sys.argv[3]) if len(sys.argv) > 3 else None)
dx.write_index(idx, sys.argv[2])
print(json.dumps({"s": time.perf_counter() - t, "peak_rss_mb": [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024,
                  "samples": len(idx)}))
"""

WARM = """
import json, sys, time
import torch  # a rank has torch loaded already: not part of the start
torch_rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0] / 1024
t = time.perf_counter()
from meddino.data import index as dx
from meddino.data.sources import PretrainSource
idx = dx.open_index(sys.argv[1])
fresh = dx.stale_reason(idx) is None
src = PretrainSource.from_index(idx)
took = time.perf_counter() - t
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")][0] / 1024
print(json.dumps({"s": took, "fresh": fresh, "rss_after_torch_import_mb": torch_rss, "rss_mb": rss,
                  "rss_added_by_index_mb": rss - torch_rss, "samples": len(src), "last": src.describe(len(src) - 1)["path"],
                  "peak_rss_mb": [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024}))
"""

WORKERS = """
import json, os, sys, time
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from meddino.data import index as dx
from meddino.data.sources import PretrainSource
src = PretrainSource.from_index(dx.open_index(sys.argv[1]))
epoch, workers = int(sys.argv[2]), int(sys.argv[3])

class Paths(Dataset):
    def __len__(self): return len(src)
    def __getitem__(self, i): return len(src.files[int(src.file_index[i])])

def pss(pid):
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))[:epoch]
loader = DataLoader(Paths(), batch_size=256, sampler=perm.tolist(), num_workers=workers, persistent_workers=True)
it = iter(loader)
next(it)
pids = [w.pid for w in it._workers]
first = [pss(p) for p in pids]
n = 0
for batch in it:
    n += len(batch)
last = [pss(p) for p in pids]
print(json.dumps({"workers": workers, "samples": n + 256, "pss_mb_start": first, "pss_mb_end": last}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_700_000)
    ap.add_argument("--folder", type=int, default=0, help="files of the folder-walk variant (0: skip)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--epoch", type=int, default=200_000, help="samples the workers go through")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    from meddino.profile.timing import machine_info

    result: dict = {"benchmark": "data_index", "machine": machine_info(__import__("torch").device("cpu")), "rows": args.rows,
                    "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        csv, idx = Path(tmp) / "frames.csv", Path(tmp) / "frames.csv.mdidx"
        t = time.perf_counter()
        make_manifest(csv, args.rows)
        result["manifest_mb"] = csv.stat().st_size / 2**20
        result["generate_s"] = time.perf_counter() - t
        result["cold_build"] = _child(COLD, str(csv), str(idx))
        result["index_mb"] = idx.stat().st_size / 2**20
        result["warm_start"] = _child(WARM, str(idx))
        result["workers_pss"] = _child(WORKERS, str(idx), str(min(args.epoch, args.rows - 256)), str(args.workers))
        print(json.dumps(result["workers_pss"]), file=sys.stderr)
        if args.folder:
            root = Path(tmp) / "folder"
            make_folder(root, args.folder)
            folder_idx = Path(tmp) / "folder.mdidx"
            result["folder"] = {"files": args.folder, "threads_1": _child(COLD, str(root), str(folder_idx), "1"),
                                "threads_default": _child(COLD, str(root), str(folder_idx))}
    result["load_average_end"] = list(os.getloadavg())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("MEDDINO_QUIET", "1")
    main()
