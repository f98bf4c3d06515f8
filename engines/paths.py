"""The project's per-machine cache directory: $SPECMOE_BENCH_CACHE, or ~/.cache/specmoe-bench. Trained checkpoints
live under models/ (workloads/train.py), the disk tier's files under disk-tier/ (engines/disktier.py)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("SPECMOE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specmoe-bench"
