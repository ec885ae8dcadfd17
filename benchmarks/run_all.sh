#!/usr/bin/env bash
# Run every benchmark with the settings used for benchmarks/results/*.json; each prints one JSON object.
# Usage: bash benchmarks/run_all.sh [cpu|cuda]   (results go to benchmarks/results/<name>_<device>.json)
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cpu}"
out=benchmarks/results
mkdir -p "$out"
run() { local name=$1; shift; echo "== $name" >&2; python "benchmarks/$name.py" "$@" > "$out/${name}_${device}.json"; }
if [ "$device" = "cpu" ]; then
    run data_pipeline --n 64 --repeats 3
    run linear_grid --n 20000 --repeats 2
    run seg_inference --size 224 --iters 20 --baselines
    run phase_online --frames 50 --warmup 5
    run pretrain_throughput --batch 4 --steps 3
    run data_index --rows 4700000 --epoch 200000 --workers 8 --folder 200000
    run step_profile --batch 4 --steps 5 --before
    run sharded_checkpoint --recipe dinov2_vits14 --repeats 2
else
    run device_crops --device cuda --n 256 --batch 64 --repeats 3
    run linear_grid --device cuda
    run seg_inference --device cuda --size 224 --iters 100 --baselines
    run phase_online --device cuda --frames 200
    run pretrain_throughput --device cuda
    echo "== gpu_suite" >&2; bash benchmarks/gpu_suite.sh > "$out/gpu_suite_cuda.json"
fi
