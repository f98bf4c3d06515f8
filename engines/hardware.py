"""Hardware profiles: which device a cell runs on and how much expert memory it may keep there."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch

from .disktier import check_dir
from .errors import BadInput

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
ALLOWED = ("cpu, cuda, cuda:N, cuda:budget=SIZE or cuda:N:budget=SIZE (SIZE like 24GiB, 512MiB: the device memory "
           "of the GPU to emulate; or a share of the experts like 25%), each optionally ending in :host=disk or "
           ":host=disk@DIR (experts served from a file on local disk, in DIR or the cache directory)")
HOST_TIERS = ("memory", "disk")
_LAYER_PARAM = re.compile(r"(^|\.)layers\.\d+\.")


def parse_size(text: str) -> int:
    """'24GiB' -> bytes. Raises BadInput naming the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise BadInput(f"bad size {text!r}: use a number with a unit among B, KB, MB, GB, KiB, MiB, GiB, TiB")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise BadInput(f"bad size {text!r}: must be greater than zero")
    return int(value)


def _percent(text: str) -> float | None:
    """'25' -> 0.25; None when the text is not a number."""
    try:
        return float(text) / 100
    except ValueError:
        return None


def byte_unit(max_value: float) -> tuple[str, float]:
    """The binary unit to print `max_value` bytes in: (name, bytes per unit)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(max_value) >= size:
            return unit, size
    return "B", 1


def format_bytes(n: float | None) -> str:
    """The one byte formatter of the project: binary units, two decimals (512 B, 3.00 MiB)."""
    if n is None:
        return "-"
    unit, size = byte_unit(n)
    return f"{n / size:.2f} {unit}" if size > 1 else f"{n:.0f} B"


@dataclass(frozen=True)
class HardwareProfile:
    """`cpu` is functional (bytes and hit rates are real, times are not GPU times); `cuda...` is a real GPU run."""

    spec: str
    device: str  # torch device string: "cpu" or "cuda:N"
    memory_budget_bytes: int | None = None  # device memory of the GPU this profile emulates (None: the real one)
    expert_share: float | None = None  # budget=25%: the share of the model's expert bytes engines may keep
    disk_dir: str | None = None  # host=disk: the directory of the experts' file (None: experts in host memory)

    @property
    def has_budget(self) -> bool:
        return self.memory_budget_bytes is not None or self.expert_share is not None

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def host(self) -> str:
        """Where the experts live off the device: memory (pinned host memory) or disk (`host=disk`)."""
        return "memory" if self.disk_dir is None else "disk"

    def memory_bytes(self) -> int | None:
        """All the memory of the device that holds the static cache: the GPU's, or this machine's for `cpu`
        (None where it cannot be read)."""
        if self.is_cuda:
            return torch.cuda.get_device_properties(self.device).total_memory if torch.cuda.is_available() else None
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None

    @classmethod
    def parse(cls, spec: str, check_available: bool = True) -> "HardwareProfile":
        text = spec.strip()
        m = re.fullmatch(r"(.*?):host=([^@]*)(?:@(.*))?", text)
        disk_dir = None
        if m:
            device_part, tier, directory = m.groups()
            if tier not in HOST_TIERS:
                raise BadInput(f"hardware {spec!r}: unknown host tier {tier!r}; allowed: {', '.join(HOST_TIERS)}")
            if directory is not None and tier != "disk":
                raise BadInput(f"hardware {spec!r}: only host=disk takes a directory (host=disk@DIR)")
            if directory is not None and not directory.strip():
                raise BadInput(f"hardware {spec!r}: host=disk@ names no directory; write host=disk@DIR or host=disk")
            if tier == "disk":
                disk_dir = check_dir(spec, directory)
            text = device_part
        profile = cls._parse_device(spec, text, check_available)
        return dataclasses.replace(profile, spec=spec.strip(), disk_dir=disk_dir)

    @classmethod
    def _parse_device(cls, spec: str, text: str, check_available: bool) -> "HardwareProfile":
        if text == "cpu":
            return cls(spec=text, device="cpu")
        m = re.fullmatch(r"cuda(?::(\d+))?(?::budget=([^:]+))?", text)
        if not m:
            raise BadInput(f"unknown hardware {spec!r}: allowed are {ALLOWED}")
        index = int(m.group(1) or 0)
        budget, share = None, None
        if m.group(2) and m.group(2).strip().endswith("%"):
            share = _percent(m.group(2).strip()[:-1])
            if share is None or not 0 < share <= 1:
                raise BadInput(f"hardware {spec!r}: bad expert share {m.group(2)!r}: use a percentage in (0, 100]")
        elif m.group(2):
            budget = parse_size(m.group(2))
        if check_available:
            if not torch.cuda.is_available():
                raise BadInput(f"hardware {spec!r} needs CUDA, and this machine has no CUDA device; use 'cpu'")
            if index >= torch.cuda.device_count():
                raise BadInput(f"hardware {spec!r}: device cuda:{index} does not exist "
                               f"(this machine has {torch.cuda.device_count()} CUDA device(s))")
        return cls(spec=text, device=f"cuda:{index}", memory_budget_bytes=budget, expert_share=share)

    def expert_budget(self, non_expert_bytes: int, layers_loaded: int | None = None,
                      layers_total: int | None = None, layer_non_expert_bytes: int = 0,
                      total_expert_bytes: int | None = None) -> int | None:
        """Bytes of experts an engine may keep resident, or None without a budget.

        A share (budget=25%) is that share of the loaded experts. A memory size emulates a GPU of that size running
        the whole model: the whole model's non-expert weights stay on it (the loaded model's, with its per-layer
        part `layer_non_expert_bytes` scaled from K loaded layers to all L), what is left holds experts, and the
        K loaded layers get K/L of that. KV cache and activations are not charged."""
        if self.expert_share is not None:
            if total_expert_bytes is None:
                raise ValueError("an expert share needs the model's total expert bytes")
            return int(self.expert_share * total_expert_bytes)
        if self.memory_budget_bytes is None:
            return None
        scale = layers_loaded / layers_total if layers_loaded and layers_total else 1.0
        whole_non_expert = non_expert_bytes - layer_non_expert_bytes + int(layer_non_expert_bytes / scale)
        budget = self.memory_budget_bytes - whole_non_expert
        if budget <= 0:
            whole = " of the whole model" if scale != 1.0 else ""
            raise BadInput(f"hardware {self.spec!r}: the budget ({format_bytes(self.memory_budget_bytes)}) is smaller "
                           f"than the non-expert weights{whole} ({format_bytes(whole_non_expert)}), which must stay "
                           "on the device")
        return int(budget * scale)


def layer_bytes(model) -> int:
    """Bytes of the parameters and buffers inside the decoder layers (`...layers.N....`): the per-layer part."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return sum(t.nbytes for name, t in named if _LAYER_PARAM.search(name))
