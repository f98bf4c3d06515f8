"""The result schema, declared once. One JSON file per cell carries a CellResult; metric names carry their units.

Conventions: a metric that was not measured is None (null in JSON), never 0. `tokens_per_step` counts the
tokens one sequence gains per decode step including the bonus token of speculation (vLLM's convention):
1.0 for plain decoding, up to gamma + 1 for speculative decoding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class CellConfig:
    engine: str
    model: str
    batch_size: int
    hardware: str
    workload: str = "synthetic-ids"
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

    def key(self) -> str:
        """Stable identity of the cell inside a run (used for resume and for matching cells across runs)."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.engine_options.items()))
        parts = [self.engine + (f"[{opts}]" if opts else ""), self.model.replace("/", "_"),
                 f"L{self.model_layers}" if self.model_layers else "", self.dtype, f"b{self.batch_size}",
                 self.hardware.replace(":", "_").replace("=", "-").replace("%", "pct"),
                 self.workload.replace("/", "_"),
                 f"p{self.prompt_len}", f"n{self.max_new_tokens}",
                 f"t{self.temperature}" if self.temperature else "", f"s{self.seed}"]
        return "-".join(p for p in parts if p)


@dataclass
class Metrics:
    # throughput and latency (means over measured iterations)
    tokens_per_s: float | None = None  # output tokens / end-to-end time (prefill included)
    decode_tokens_per_s: float | None = None  # tokens after the first / time after the first token
    prefill_tokens_per_s: float | None = None  # prompt tokens / time to first token
    ttft_ms: float | None = None
    tpot_ms_p50: float | None = None  # per-output-token time of each decode step, per sequence
    tpot_ms_p90: float | None = None
    tpot_ms_p99: float | None = None
    e2e_latency_ms: float | None = None
    output_tokens: int | None = None  # per iteration, all sequences
    iterations: int | None = None
    # expert traffic counted by the engine
    h2d_bytes: int | None = None  # per iteration
    h2d_bytes_per_token: float | None = None
    h2d_gb_per_s: float | None = None  # engine-counted bytes / end-to-end time: the copy rate the engine achieved
    h2d_copies: int | None = None
    expert_hit_rate: float | None = None
    setup_h2d_bytes: int | None = None  # copies made to keep experts resident before measuring
    weight_read_bytes: int | None = None  # per iteration: weight bytes the forwards read from device memory
    # the hardware bound (harness/bounds.py): absent on the CPU
    bound_tokens_per_s: float | None = None  # output tokens / time the cell's h2d bytes and weight reads need
    pct_of_bound: float | None = None  # tokens_per_s / bound_tokens_per_s (a fraction; 1.0 is the hardware's limit)
    bound: str | None = None  # which bound binds: "pcie" (host-to-device copies) or "memory" (weight reads)
    # speculation (absent for engines that do not speculate)
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    acceptance_rate: float | None = None  # accepted / drafted
    tokens_per_step: float | None = None  # per sequence per decode step, bonus token included
    draft_time_ms: float | None = None
    verify_time_ms: float | None = None
    draft_h2d_bytes: int | None = None
    verify_h2d_bytes: int | None = None
    # memory
    peak_device_mem_bytes: int | None = None
    host_rss_bytes_max: int | None = None
    # equivalence against `resident`
    equivalent: bool | None = None
    exact_match_rate: float | None = None
    first_divergence: list[int | None] | None = None
    teacher_forced_top1: float | None = None
    max_abs_logit_diff: float | None = None
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
