"""Hardware profiles: which device a cell runs on and how much expert memory it may keep there."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import BadInput

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
ALLOWED = "cpu, cuda, cuda:N, cuda:budget=SIZE or cuda:N:budget=SIZE (SIZE like 24GiB, 512MiB)"


def parse_size(text: str) -> int:
    """'24GiB' -> bytes. Raises BadInput naming the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise BadInput(f"bad size {text!r}: use a number with a unit among B, KB, MB, GB, KiB, MiB, GiB, TiB")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise BadInput(f"bad size {text!r}: must be greater than zero")
    return int(value)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class HardwareProfile:
    """`cpu` is functional (bytes and hit rates are real, times are not GPU times); `cuda...` is a real GPU run."""

    spec: str
    device: str  # torch device string: "cpu" or "cuda:N"
    memory_budget_bytes: int | None = None  # device memory of the GPU this profile emulates (None: the real one)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def parse(cls, spec: str, check_available: bool = True) -> "HardwareProfile":
        text = spec.strip()
        if text == "cpu":
            return cls(spec=text, device="cpu")
        m = re.fullmatch(r"cuda(?::(\d+))?(?::budget=([^:]+))?", text)
        if not m:
            raise BadInput(f"unknown hardware {spec!r}: allowed are {ALLOWED}")
        index = int(m.group(1) or 0)
        budget = parse_size(m.group(2)) if m.group(2) else None
        if check_available:
            if not torch.cuda.is_available():
                raise BadInput(f"hardware {spec!r} needs CUDA, and this machine has no CUDA device; use 'cpu'")
            if index >= torch.cuda.device_count():
                raise BadInput(f"hardware {spec!r}: device cuda:{index} does not exist "
                               f"(this machine has {torch.cuda.device_count()} CUDA device(s))")
        return cls(spec=text, device=f"cuda:{index}", memory_budget_bytes=budget)

    def expert_budget(self, non_expert_bytes: int, layers_loaded: int | None = None,
                      layers_total: int | None = None) -> int | None:
        """Bytes of experts an engine may keep resident: the emulated memory, scaled by K/L when only K of the
        model's L layers are loaded (so K layers see the share the whole model would), less the loaded model's
        non-expert weights (which stay on the device). KV cache and activations are not charged."""
        if self.memory_budget_bytes is None:
            return None
        scale = layers_loaded / layers_total if layers_loaded and layers_total else 1.0
        budget = int(self.memory_budget_bytes * scale) - non_expert_bytes
        if budget <= 0:
            shown = f"{format_bytes(self.memory_budget_bytes)}" + (f" x {layers_loaded}/{layers_total} layers"
                                                                   if scale != 1.0 else "")
            raise BadInput(f"hardware {self.spec!r}: the budget ({shown}) is smaller than the model's non-expert "
                           f"weights ({format_bytes(non_expert_bytes)}), which must stay on the device")
        return budget
