#!/usr/bin/env bash
# Issue 13's GPU measurements in one command on a CUDA machine, as one JSON object on stdout, in < 8 min:
# pretraining img/s/GPU and MFU (DINOv2/v3, ViT-S/B/L, seed 000 crops, eager and compiled), peak memory and
# the largest batch, data-loader img/s (CPU and GPU decoding), batch-1 latency of every seg head.
# Usage: bash benchmarks/gpu_suite.sh [--budget-s 440] > benchmarks/results/gpu_suite_cuda.json
#        bash benchmarks/gpu_suite.sh --smoke      (CPU, tiny models: checks the script, no numbers)
# Without CUDA (and without --smoke) it prints one line and exits with code 2.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export MEDDINO_QUIET="${MEDDINO_QUIET:-1}"
# the script's own alarm ends a unit at its budget and still prints the JSON; this is the last resort
exec timeout 470 "${PYTHON:-python}" benchmarks/gpu_suite.py "$@"
