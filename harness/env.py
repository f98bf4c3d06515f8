"""The environment a result was measured in: versions, GPU, git commit, host. Stored in every cell file."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def environment() -> dict:
    """Everything needed to tell two result files apart; fields that cannot be read are None."""
    import torch

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    env = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": None,
        "gpu_count": 0,
        "gpu_memory_bytes": None,
        "driver": None,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "executable": sys.executable,
    }
    try:  # the NVML module adds driver, PCIe link and more where it is present
        from harness import nvml
        extra = nvml.environment()
        env.update({k: v for k, v in extra.items() if v is not None or k not in env})
        env["driver"] = env.get("driver") or extra.get("driver_version")
        env["gpu_memory_bytes"] = env.get("gpu_memory_bytes") or extra.get("device_mem_total_bytes")
    except Exception:  # noqa: BLE001 - absent module or no NVIDIA driver: those fields stay None
        pass
    if torch.cuda.is_available():
        env["gpu_count"] = torch.cuda.device_count()
        if not env.get("gpu_name"):  # torch as the fallback: it creates a CUDA context, NVML does not
            props = torch.cuda.get_device_properties(0)
            env.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory)
    return env
