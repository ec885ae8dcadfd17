"""Profiling: parameters, batch-1 latency (median / p95) and FPS of a backbone with each task head, and
pretraining throughput and the largest batch that fits (``meddino profile``, see docs/profile.md).

Kept import-light on purpose: import the submodule you need (``from meddino.profile import timing``).
"""
