"""The result schema, declared once. One JSON file per cell carries a CellResult; metric names carry their units.

Conventions: a metric that was not measured is None (null in JSON), never 0. `tokens_per_step` counts the
tokens one sequence gains per decode step including the bonus token of speculation (vLLM's convention):
1.0 for plain decoding, up to gamma + 1 for speculative decoding.
Each Metrics field carries its facts (unit, which way is better, whether it is exact on the CPU, how it prints) in
its metadata; `metric_fact(name)` / METRIC_FACTS give them, NVML summary keys (nvml.KEY) included, to every reader.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from engines.errors import BadInput

SCHEMA_VERSION = 1


@dataclass
class CellConfig:
    engine: str
    model: str
    batch_size: int
    hardware: str
    workload: str = "synthetic-ids"
    # what engines that profile (caching, specmoe's hot-global) run their profiling pass on: "split", the workload's
    # own calibration split (never the measured prompts), or another workload; their option profile=oracle profiles
    # on the measured prompts instead
    calibration: str = "split"
    engine_options: dict[str, Any] = field(default_factory=dict)
    model_layers: int | None = None  # load only this many decoder layers (big presets)
    dtype: str = "float32"
    prompt_len: int = 32
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    warmup: int = 1  # untimed generate calls before measuring
    min_iterations: int = 3  # measured generate calls: at least this many ...
    min_duration_s: float = 0.0  # ... and at least this long in total
    timeout_s: float = 600.0  # the cell's process is killed after this
    nvml_trace: bool = False  # keep every NVML reading of the measured region (the timeline) in the cell file
    cpu_threads: int | None = None  # torch intra-op threads in the cell process (None: torch's default)
    # "cell": every cell in a process of its own (the safest isolation); "model": consecutive cells of one model
    # (same model, layers, dtype) share a process, which saves each cell the imports and device start-up
    process_per: str = "cell"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))

    def key(self) -> str:
        """Stable identity of the cell inside a run (used for resume and for matching cells across runs). A part
        too long for a file name (a deep checkpoint path) keeps its ends and hashes its middle."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.engine_options.items()))
        parts = [self.engine + (f"[{_short(opts)}]" if opts else ""), _short(self.model.replace("/", "_")),
                 f"L{self.model_layers}" if self.model_layers else "", self.dtype, f"b{self.batch_size}",
                 _short(self.hardware.replace(":", "_").replace("=", "-").replace("%", "pct").replace("@", "-at-")
                        .replace("/", "_")),
                 _short(self.workload.replace("/", "_")),
                 "" if self.calibration == "split" else "cal-" + _short(self.calibration.replace("/", "_")),
                 f"p{self.prompt_len}", f"n{self.max_new_tokens}",
                 f"t{self.temperature}" if self.temperature else "", f"s{self.seed}"]
        return "-".join(p for p in parts if p)


DTYPES = ("float32", "float16", "bfloat16")
PROCESS_PER = ("cell", "model")  # a process per cell, or one shared by consecutive cells of one model
_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "int | None": (int,),
          "dict[str, Any]": (dict,)}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table"}
_POSITIVE = {"batch_size", "prompt_len", "max_new_tokens", "min_iterations", "model_layers", "timeout_s",
             "cpu_threads"}
_NON_NEGATIVE = {"warmup", "min_duration_s", "temperature", "seed"}


def type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def check_setting(key: str, value):
    """One CellConfig value checked against its field's type and range, returned converted (an integer where a
    number is asked becomes a float). The one set of rules for a cell's settings; BadInput names the key, the
    value and what is allowed."""
    f = next((f for f in dataclasses.fields(CellConfig) if f.name == key), None)
    if f is None:
        raise BadInput(f"unknown key {key!r}; allowed: {', '.join(f.name for f in dataclasses.fields(CellConfig))}")
    if value is None and "None" in str(f.type):
        return None
    kinds = _TYPES[str(f.type)]
    if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
        raise BadInput(f"{key} must be {_TYPE_WORDS[kinds[-1]]}, got {type_name(value)} {value!r}")
    if isinstance(value, str) and not value.strip():
        raise BadInput(f"{key} must not be empty")
    if key == "engine_options":
        return {k: _check_option(k, v) for k, v in value.items()}
    if key == "dtype" and value not in DTYPES:
        raise BadInput(f"dtype {value!r} is not one of {', '.join(DTYPES)}")
    if key == "process_per" and value not in PROCESS_PER:
        raise BadInput(f"process_per {value!r} is not one of {', '.join(PROCESS_PER)}")
    if key in _POSITIVE and value <= 0:
        raise BadInput(f"{key} must be greater than 0, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise BadInput(f"{key} must be 0 or more, got {value!r}")
    if key == "top_p" and not 0 < value <= 1:
        raise BadInput(f"top_p must be in (0, 1], got {value!r}")
    return float(value) if kinds == (int, float) else value


def _check_option(name, value):
    """An engine option must be a plain value; which values are allowed is its engine's Options class's call."""
    if not isinstance(name, str) or not name:
        raise BadInput(f"engine option name {name!r} must be a non-empty string")
    if not isinstance(value, (str, int, float, bool)):
        raise BadInput(f"engine option {name} must be a string, a number or true/false, got {type_name(value)} "
                       f"{value!r}")
    return value


def _short(text: str, limit: int = 64) -> str:
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{text[:24]}-{digest}-{text[-24:]}"


# -- metric facts: a metric's unit, direction, CPU exactness and format live on its Metrics field -----------------

BETTER = ("higher", "lower", None)  # None: no better direction (a count of the method, a bandwidth reading)


@dataclass(frozen=True)
class MetricFact:
    """What `regress`, `report`, `compare`, `show` and `export` know about one metric."""

    name: str  # a Metrics field, or "nvml.<summary key>" (harness.nvml.NvmlSummary)
    unit: str  # "tokens/s", "ms", "bytes", "bytes/token", "ratio", ...
    better: str | None  # "higher" | "lower" | None
    cpu_exact: bool  # counted, not timed: identical run to run on the CPU when adaptive switches are off
    format: str  # how format_value prints it: a format spec (".1f") or bytes | count | pct | bool | list
    compared: bool = True  # regress compares it (False: a property of the method, such as `iterations`)
    help: str = ""

    def __post_init__(self):
        if self.better not in BETTER:
            raise ValueError(f"metric {self.name}: better={self.better!r}, allowed: {BETTER}")

    def text(self, value) -> str:
        return format_value(value, self.format)


def _metric(unit: str, better: str | None, fmt: str, cpu_exact: bool = False, compared: bool = True,
            help: str = ""):
    """A Metrics field (None: not measured) carrying its facts in `metadata`."""
    return field(default=None, metadata=dict(unit=unit, better=better, format=fmt, cpu_exact=cpu_exact,
                                             compared=compared, help=help))


_RATE, _MS = dict(unit="tokens/s", better="higher", fmt=".1f"), dict(unit="ms", better="lower")


@dataclass
class Metrics:
    # throughput and latency (means over measured iterations)
    tokens_per_s: float | None = _metric(**_RATE, help="output tokens / end-to-end time (prefill included)")
    decode_tokens_per_s: float | None = _metric(**_RATE, help="tokens after the first / time after the first token")
    steady_tokens_per_s: float | None = _metric(**_RATE, help="the same over the decode steps in which every row of "
                                                              "the batch was still generating (no ragged tail)")
    prefill_tokens_per_s: float | None = _metric(**_RATE, help="prompt tokens / time to first token")
    ttft_ms: float | None = _metric(**_MS, fmt=".1f")
    tpot_ms_p50: float | None = _metric(**_MS, fmt=".2f", help="per-output-token time of each decode step, "
                                                               "per sequence")
    tpot_ms_p90: float | None = _metric(**_MS, fmt=".2f")
    tpot_ms_p99: float | None = _metric(**_MS, fmt=".2f")
    e2e_latency_ms: float | None = _metric(**_MS, fmt=".1f")
    output_tokens: int | None = _metric("tokens", None, "count", cpu_exact=True, help="per iteration, all sequences")
    iterations: int | None = _metric("count", None, "count", cpu_exact=True, compared=False)
    # expert traffic counted by the engine
    h2d_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True, help="per iteration")
    h2d_bytes_per_token: float | None = _metric("bytes/token", "lower", "bytes", cpu_exact=True)
    h2d_gb_per_s: float | None = _metric("GB/s", "higher", ".1f", help="engine-counted bytes / end-to-end time: "
                                                                       "the copy rate the engine achieved")
    h2d_copies: int | None = _metric("copies", "lower", "count", cpu_exact=True)
    expert_hit_rate: float | None = _metric("ratio", "higher", ".3f", cpu_exact=True)
    setup_h2d_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True,
                                          help="copies made to keep experts resident before measuring")
    weight_read_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True,
                                            help="per iteration: weight bytes the forwards read from device memory")
    # the hardware bound (harness/bounds.py): absent on the CPU
    bound_tokens_per_s: float | None = _metric(**_RATE, help="output tokens / time the cell's h2d bytes and weight "
                                                             "reads need at the probed bandwidths")
    pct_of_bound: float | None = _metric("ratio", "higher", "pct", help="tokens_per_s / bound_tokens_per_s (1.0 is "
                                                                        "the hardware's limit)")
    bound: str | None = _metric("name", None, "text", compared=False, help="which bound binds: pcie (host-to-device "
                                                                        "copies) or memory (weight reads)")
    # speculation (absent for engines that do not speculate)
    drafted_tokens: int | None = _metric("tokens", None, "count", cpu_exact=True)
    accepted_tokens: int | None = _metric("tokens", "higher", "count", cpu_exact=True)
    acceptance_rate: float | None = _metric("ratio", "higher", ".3f", cpu_exact=True, help="accepted / drafted")
    tokens_per_step: float | None = _metric("tokens/step", "higher", ".2f", cpu_exact=True,
                                            help="per sequence per decode step, bonus token included")
    draft_time_ms: float | None = _metric(**_MS, fmt=".1f")
    verify_time_ms: float | None = _metric(**_MS, fmt=".1f")
    draft_h2d_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True)
    verify_h2d_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True,
                                           help="per iteration: verification's own copies (not the prefetched)")
    acceptance_by_position: list[float | None] | None = _metric(
        "ratio", None, "list", cpu_exact=True, compared=False,
        help="[j]: accepted / drafted tokens at draft position j + 1 (a token is accepted only if all before it were)")
    draft_forward_ms: float | None = _metric(**_MS, fmt=".3f", help="one draft forward (CUDA events on a GPU)")
    verify_pass_ms: float | None = _metric(**_MS, fmt=".2f", help="one verification forward (CUDA events on a GPU)")
    gamma_chosen: int | None = _metric("tokens", None, "count", cpu_exact=True, compared=False,
                                       help="the draft length used for most decode steps (0: plain steps)")
    # draft-guided prefetch (specmoe prefetch=draft; absent without it), per iteration
    prefetch_h2d_bytes: int | None = _metric("bytes", None, "bytes", cpu_exact=True,
                                             help="experts copied ahead of verification from the drafts' routing")
    prefetch_used_bytes: int | None = _metric("bytes", "higher", "bytes", cpu_exact=True,
                                              help="of those, routed by the verification they were copied for")
    prefetch_wasted_bytes: int | None = _metric("bytes", "lower", "bytes", cpu_exact=True,
                                                help="of those, not routed by that verification")
    # memory
    peak_device_mem_bytes: int | None = _metric("bytes", "lower", "bytes")
    host_rss_bytes_max: int | None = _metric("bytes", "lower", "bytes")
    # equivalence against `resident`
    equivalent: bool | None = _metric("bool", "higher", "bool", cpu_exact=True)
    exact_match_rate: float | None = _metric("ratio", "higher", ".3f", cpu_exact=True)
    first_divergence: list[int | None] | None = _metric("token index", None, "list", cpu_exact=True, compared=False)
    teacher_forced_top1: float | None = _metric("ratio", "higher", ".4f")
    max_abs_logit_diff: float | None = _metric("logit", "lower", ".3g")
    # NVML / GPM (harness.nvml summary keys, units in the names); absent without an NVIDIA GPU
    nvml: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellResult:
    config: CellConfig
    status: str  # "ok" | "failed" | "skipped"
    valid: bool  # ok and trustworthy (enough iterations, equivalence checked, nothing flagged)
    invalid_reason: str | None = None
    error: str | None = None  # for failed/skipped cells: one line, plus the traceback in `error_detail`
    error_detail: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    samples: dict[str, list[float]] = field(default_factory=dict)  # per-iteration values, for significance tests
    model_info: dict[str, Any] = field(default_factory=dict)
    workload_info: dict[str, Any] = field(default_factory=dict)  # what the prompts are (name, source, lengths)
    environment: dict[str, Any] = field(default_factory=dict)
    engine_stats: dict[str, Any] = field(default_factory=dict)  # engine-specific extras
    outputs: dict[str, Any] | None = None  # --save-outputs: prompt and generated token ids
    started_at: str | None = None
    wall_s: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)  # where the cell's wall time went (load, reference, ...)
    process: dict[str, Any] = field(default_factory=dict)  # the process it ran in: pid, cells it measured before
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CellResult":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"result schema version {version!r}; this tool reads version {SCHEMA_VERSION}")
        data = dict(data)
        data["config"] = CellConfig(**data["config"])
        known = {f.name for f in dataclasses.fields(Metrics)}
        data["metrics"] = Metrics(**{k: v for k, v in data.get("metrics", {}).items() if k in known})
        return cls(**data)


METRIC_FIELDS = [f.name for f in dataclasses.fields(Metrics) if f.name != "nvml"]


def _nvml_fact(key: str) -> MetricFact:
    """The facts of one numeric NVML summary key, read from its name (the unit is in every name)."""
    base = re.sub(r"_(mean|p50|p90|max)$", "", key)
    if key == "joules_per_token":
        unit, better, fmt = "J/token", "lower", ".3g"
    elif base == "power_w":
        unit, better, fmt = "W", "lower", ".1f"
    elif key == "energy_j":
        unit, better, fmt = "J", "lower", ".1f"
    elif base.endswith("_bytes_per_s"):
        unit, better, fmt = "bytes/s", None, ".3g"
    elif base.endswith(("_bytes", "_bytes_calibrated")):
        unit, better, fmt = "bytes", "lower" if base.startswith("device_mem") else None, "bytes"
    elif base.endswith("_pct"):
        unit, better, fmt = "%", None, ".1f"
    elif base.endswith("_s") or "_s_" in base:
        unit, better, fmt = "s", None, ".3g"
    else:
        unit, better, fmt = "tokens" if key == "output_tokens" else "count", None, "count"
    return MetricFact("nvml." + key, unit, better, cpu_exact=False, format=fmt, compared=better is not None)


def _facts() -> dict[str, MetricFact]:
    from .nvml import NvmlSummary
    out = {}
    for f in dataclasses.fields(Metrics):
        if f.name == "nvml":
            continue
        if "unit" not in f.metadata:
            raise TypeError(f"Metrics.{f.name} carries no metric facts: declare it with _metric(unit, better, "
                            "format, ...)")
        m = f.metadata
        out[f.name] = MetricFact(f.name, m["unit"], m["better"], m["cpu_exact"], m["format"], m["compared"], m["help"])
    numeric = {"float", "int", "None"}
    for key, hint in NvmlSummary.__annotations__.items():
        text = getattr(hint, "__forward_arg__", hint)  # a TypedDict keeps postponed annotations as ForwardRefs
        if isinstance(text, str) and {t.strip() for t in text.split("|")} <= numeric:
            out["nvml." + key] = _nvml_fact(key)
    return out


METRIC_FACTS: dict[str, MetricFact] = _facts()


def metric_fact(name: str) -> MetricFact:
    """The facts of a metric by name (a Metrics field or nvml.KEY); BadInput with the allowed names otherwise."""
    if name in METRIC_FACTS:
        return METRIC_FACTS[name]
    import difflib
    close = difflib.get_close_matches(name, list(METRIC_FACTS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise BadInput(f"unknown metric {name!r}{hint}; known metrics: {', '.join(METRIC_FACTS)}")


def metric_value(result: "CellResult", name: str):
    """A cell's value of a metric by name; None when not measured (NVML keys that are not numbers included)."""
    if name.startswith("nvml."):
        v = (result.metrics.nvml or {}).get(name[5:])
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return getattr(result.metrics, name)


# -- the one value formatter of the command line ----------------------------------------------------------------


def format_value(value, fmt: str = ".4g") -> str:
    """Print a value the way every table of the CLI does. fmt: a format spec (".1f"), or bytes (binary units),
    count (a whole number with thousands separators), pct, x (a ratio like 1.50x), bool (yes/no), list (JSON)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "bool" or isinstance(value, bool):
        return "yes" if value else "no"
    if fmt == "list" or isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, str):
        return value
    if fmt == "bytes":
        from engines.hardware import format_bytes
        return format_bytes(value)
    if fmt == "count":
        return f"{round(value):,}"
    if fmt == "pct":
        return f"{value:.1%}"
    if fmt == "x":
        return f"{value:.2f}x"
    return format(value, fmt)
