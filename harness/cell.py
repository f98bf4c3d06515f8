"""The cell process: one cell measured as a short list of phases (load, reference, warm-up, measure, equivalence,
validity), and `python -m harness.cell --jobs-fd N`, the process the parent (harness.runner) starts to run them.

The process reads one JSON job per line from file descriptor N and answers on its stdout, one line per message
(PROGRESS_PREFIX + JSON): progress while a cell runs, then the cell's whole result. Everything else it prints goes
to stderr, which the parent writes to the cell's log; stdin is /dev/null, so nothing a model loads can ask for input.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.errors import BadInput, EngineUnavailable
from engines.stats import GenerationStats

from .env import environment
from .imports import no_collection, skip_final_collection
from .results import clean_floats
from .schema import CellConfig, CellResult, Metrics

# Exact greedy equality with `resident` is required where arithmetic is exact enough to promise it; in lower
# precision a verification pass over gamma + 1 tokens rounds differently from one token at a time, so there the
# cell is valid when the engine's own teacher-forced top-1 agreement reaches LOW_PRECISION_TOP1_MIN.
EXACT_DTYPES = ("float32", "float64")
LOW_PRECISION_TOP1_MIN = 0.99
PROGRESS_PREFIX = "@@smb "  # cell process -> parent messages on stdout
_channel = None  # where report() writes: the process's original stdout once serve() moved print() to stderr


def report(**fields) -> None:
    print(PROGRESS_PREFIX + json.dumps(fields), file=_channel or sys.stdout, flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ================================================================================================================
# One cell, phase by phase
# ================================================================================================================


class Clock:
    """Wall time per phase: each lap goes to the phase named."""

    def __init__(self, result: CellResult):
        self.result, self.last = result, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.result.phase_s[phase] = round(self.result.phase_s.get(phase, 0.0) + now - self.last, 3)
        self.last = now


@dataclass
class Cell:
    """What the phases of one cell share."""

    config: CellConfig
    result: CellResult
    clock: Clock
    hw: object = None  # engines.hardware.HardwareProfile
    settings: object = None  # engines.runtime.SamplingSettings
    engine: object = None
    loaded: object = None  # workloads.models.LoadedModel
    prompts: list = field(default_factory=list)
    ref: tuple | None = None  # (tokens, teacher-forced logits) of `resident`
    ref_error: str | None = None
    notes: list[str] = field(default_factory=list)
    turns: "Turns | None" = None


def measure_cell(cell: CellConfig, run_dir: Path | None = None, save_outputs: bool = False,
                 env: dict | None = None, cells_before: int = 0, turns: "Turns | None" = None) -> CellResult:
    """Measure one cell in this process; never raises (a failure becomes a failed or skipped CellResult).
    `env`: the environment the parent read once for the whole run (reading it takes seconds on a GPU machine).
    `cells_before`: how many cells this process measured before this one (a shared worker's). `turns`: measure
    each iteration only when the parent says so (`Turns`)."""
    t0 = time.perf_counter()
    result = CellResult(config=cell, status="failed", valid=False,
                        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        process=dict(pid=os.getpid(), cells_before=cells_before,
                                     peak_rss_reset=_reset_peak_rss() if cells_before else None))
    try:
        result.environment = dict(env) if env else environment()
        result.phase_s["environment"] = round(time.perf_counter() - t0, 3)
        _measure(Cell(cell, result, Clock(result), turns=turns), run_dir, save_outputs)
    except (EngineUnavailable, BadInput) as exc:
        # this engine cannot run here (accelerate without CUDA), or not in a combination that the checks before
        # the run cannot see (resident under an expert budget)
        _stamp(result, "skipped", str(exc))
    except BaseException as exc:  # noqa: BLE001 - MemoryError and friends are a cell failure too
        _stamp(result, "failed", one_line(exc), traceback.format_exc())
        if isinstance(exc, KeyboardInterrupt):
            raise
    result.wall_s = time.perf_counter() - t0
    return result


def _stamp(result: CellResult, status: str, error: str, detail: str | None = None) -> None:
    result.status, result.valid, result.error, result.error_detail = status, False, error, detail
    result.invalid_reason = f"{status}: {error}"


def _measure(c: Cell, run_dir: Path | None, save_outputs: bool) -> None:
    from .metrics import compute

    _load(c)
    _reference(c, run_dir / "reference" if run_dir else None)
    try:
        _warm_up(c)
        gens, nvml = _measure_iterations(c)
        metrics, samples = compute(gens)
        metrics.nvml = nvml
        _memory(c, metrics)
        _bound(c, metrics, run_dir)
        _equivalence(c, metrics, gens)
        info = c.engine.model_info
        c.result.model_info = asdict(info) if info is not None else {"name": c.loaded.name,
                                                                     "source": c.loaded.source}
        if save_outputs:
            c.result.outputs = {"prompts": c.prompts, "tokens": [g.tokens for g in gens],
                                "reference_tokens": c.ref[0] if c.ref is not None else None}
    finally:
        c.engine.close()
        c.clock.lap("close")
    c.result.metrics, c.result.samples, c.result.status = metrics, samples, "ok"
    reasons = _validity(c, metrics)
    c.result.valid, c.result.invalid_reason = not reasons, "; ".join(reasons) or None
    if c.notes:
        c.result.engine_stats["notes"] = c.notes


def _load(c: Cell) -> None:
    """The engine (its options checked), the model and the prompts."""
    import torch
    from engines import registry
    from engines.hardware import HardwareProfile
    from engines.runtime import SamplingSettings
    from workloads.models import load_model
    from workloads.prompts import load_workload

    cell = c.config
    if cell.cpu_threads:
        torch.set_num_threads(cell.cpu_threads)
    c.hw = HardwareProfile.parse(cell.hardware)
    c.settings = SamplingSettings(max_new_tokens=cell.max_new_tokens, temperature=cell.temperature,
                                  top_p=cell.top_p, seed=cell.seed)
    c.engine = registry.create(cell.engine, **cell.engine_options)
    report(phase="load")
    c.clock.lap("imports_and_device")  # transformers and the engines imported, the device initialised
    c.loaded = load_model(cell.model, getattr(torch, cell.dtype), cell.model_layers, cell.seed)
    workload = load_workload(cell.workload, model=c.loaded, batch_size=cell.batch_size, prompt_len=cell.prompt_len,
                             output_len=cell.max_new_tokens, seed=cell.seed)
    c.result.workload_info = workload.metadata()
    c.prompts = [list(p) for p in workload]
    c.clock.lap("load_model")


def _reference(c: Cell, cache_dir: Path | None) -> None:
    try:
        c.ref = reference_outputs(c.config, c.hw, c.prompts, c.settings, cache_dir)
    except Exception as exc:  # noqa: BLE001 - the cell is still measured, its equivalence is absent
        c.ref_error = one_line(exc)
    c.clock.lap("reference")


def reference_outputs(cell: CellConfig, hw, prompts, settings, cache_dir: Path | None):
    """Tokens and teacher-forced logits of `resident` on the cell's device without an expert budget, cached in
    the run directory so that every engine of the same (model, prompts, settings, device) shares one reference."""
    import torch
    from engines import registry
    from engines.hardware import HardwareProfile
    from harness.equivalence import reference
    from workloads.models import load_model

    ident = json.dumps(dict(model=cell.model, layers=cell.model_layers, dtype=cell.dtype, seed=cell.seed,
                            device=hw.device, prompts=prompts, settings=asdict(settings)), sort_keys=True)
    path = cache_dir / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".pt") if cache_dir else None
    if path is not None and path.exists():
        try:
            data = torch.load(path, weights_only=True)
            return data["tokens"], data["logits"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            pass
    report(phase="reference")
    engine = registry.create("resident")
    try:
        engine.load(load_model(cell.model, getattr(torch, cell.dtype), cell.model_layers, cell.seed),
                    HardwareProfile(spec=hw.device, device=hw.device))
        tokens, logits = reference(engine, prompts, settings)
    finally:
        engine.close()
    if path is not None:  # a cache that cannot be written (a full disk) costs the next cell a recompute
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"tokens": tokens, "logits": logits}, tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return tokens, logits


class Calibration:
    """The cell's calibration prompts (workloads.prompts.load_calibration), loaded when an engine first asks for
    them in its prepare; `info` says what they were, for the cell's workload_info."""

    def __init__(self, c: Cell):
        self.c, self.info, self.prompts = c, None, None

    def __call__(self) -> list[list[int]]:
        from workloads.prompts import load_calibration
        if self.prompts is None:
            cell = self.c.config
            workload = load_calibration(cell.workload, cell.calibration, model=self.c.loaded,
                                        batch_size=cell.batch_size, prompt_len=cell.prompt_len,
                                        output_len=cell.max_new_tokens, seed=cell.seed)
            self.prompts, self.info = [list(p) for p in workload], workload.metadata()
        return self.prompts


def _warm_up(c: Cell) -> None:
    import torch
    from engines.base import prepare_engine
    c.engine.load(c.loaded, c.hw)
    c.clock.lap("engine_load")
    calibration = Calibration(c)
    prepare_engine(c.engine, c.prompts, c.settings, calibration)
    if calibration.info is not None:  # the profiling pass ran on these, never on the measured prompts
        c.result.workload_info["calibration"] = calibration.info
    c.clock.lap("prepare")
    per_iter_tokens = c.config.batch_size * c.config.max_new_tokens
    for i in range(c.config.warmup):
        c.engine.generate(c.prompts, c.settings)
        report(phase="warmup", iteration=i + 1, tokens=(i + 1) * per_iter_tokens)
    if c.hw.is_cuda:
        torch.cuda.synchronize(c.hw.device)
        torch.cuda.reset_peak_memory_stats(c.hw.device)
    c.clock.lap("warmup")


def _measure_iterations(c: Cell) -> tuple[list, dict]:
    """Generate until both minimums are met, the NVML tracker (closed again here) around it; (Generations,
    NVML summary)."""
    cell, gens = c.config, []
    with _nvml_tracker(c) as tracker, GcTimer() as gc_timer:
        with tracker.track() if tracker is not None else contextlib.nullcontext():
            t_begin = time.perf_counter()
            while len(gens) < cell.min_iterations or \
                    time.perf_counter() - t_begin - (c.turns.waited_s if c.turns else 0.0) < cell.min_duration_s:
                if c.turns is not None:
                    c.turns.wait(len(gens) + 1)
                gc_before = gc_timer.total_ms
                gens.append(c.engine.generate(c.prompts, c.settings))
                gens[-1].stats = GenerationStats.of(gens[-1].stats)
                gens[-1].stats.host_gc_ms = gc_timer.total_ms - gc_before
                report(phase="measure", iteration=len(gens), tokens=sum(len(t) for g in gens for t in g.tokens))
        c.clock.lap("measure")
        return gens, _nvml_summary(c, tracker, sum(len(t) for g in gens for t in g.tokens))


@contextlib.contextmanager
def _nvml_tracker(c: Cell):
    """An NVML tracker on CUDA (harness.nvml), closed when the cell's measurement ends; None elsewhere."""
    if not c.hw.is_cuda:
        yield None
        return
    if c.turns is not None:  # the device's counters would count the other process's iterations too
        c.notes.append("nvml not recorded: measured in turns with another process on the same device")
        yield None
        return
    try:
        from harness.nvml import NvmlTracker
        tracker = NvmlTracker(device_index=int(c.hw.device.split(":")[1]), interval_s=0.01,
                              keep_trace=c.config.nvml_trace)
    except Exception as exc:  # noqa: BLE001 - absent module or NVML: the nvml metrics stay absent
        c.notes.append(f"nvml not recorded: {one_line(exc)}")
        yield None
        return
    with tracker:
        yield tracker


def _nvml_summary(c: Cell, tracker, output_tokens: int) -> dict:
    if tracker is not None:
        try:
            return dict(tracker.summary(output_tokens))
        except Exception as exc:  # noqa: BLE001
            c.notes.append(f"nvml summary failed: {one_line(exc)}")
            return {}
    if c.hw.is_cuda:
        return {}
    from harness.nvml import empty_summary  # every NVML metric present in the file, absent (null), with the reason
    out = empty_summary(output_tokens=output_tokens)
    out["nvml_absent"] = f"hardware {c.hw.spec!r} is not an NVIDIA GPU: NVML metrics not measured"
    return out


def _memory(c: Cell, metrics: Metrics) -> None:
    import torch
    if c.hw.is_cuda:
        metrics.peak_device_mem_bytes = int(torch.cuda.max_memory_allocated(c.hw.device))
    metrics.host_rss_bytes_max = _peak_rss_bytes(c.result.process)
    c.result.engine_stats = dict(c.engine.setup_stats() or {})
    metrics.setup_h2d_bytes = c.result.engine_stats.get("setup_h2d_bytes")


def _bound(c: Cell, metrics: Metrics, run_dir: Path | None) -> None:
    """The cell against its hardware bound (harness/bounds.py), from the run's bandwidth probe of its GPU. Absent
    with the disk tier: its copies are bound by the disk, which the probe does not measure."""
    if c.hw.is_cuda and c.hw.host == "memory":
        from harness import bounds
        rates = bounds.for_run(run_dir, c.hw.device)
        bounds.apply(metrics, rates)
        c.result.environment["hardware_bounds"] = rates


def _equivalence(c: Cell, metrics: Metrics, gens: list) -> None:
    """Against `resident`: every measured iteration must match; the one that matches least is reported."""
    from harness.equivalence import check_engine
    from harness.equivalence import compare as compare_tokens
    if c.ref is None:
        return
    report(phase="equivalence")
    worst = min(gens, key=lambda g: compare_tokens(c.ref[0], g.tokens).exact_match_rate)
    eq = check_engine(c.engine, c.prompts, c.settings, c.ref[0], c.ref[1], tokens=worst.tokens)
    metrics.equivalent, metrics.exact_match_rate = eq.equivalent, eq.exact_match_rate
    metrics.first_divergence = eq.first_divergence
    metrics.teacher_forced_top1, metrics.max_abs_logit_diff = eq.teacher_forced_top1, eq.max_abs_logit_diff
    c.clock.lap("equivalence")


def _validity(c: Cell, metrics: Metrics) -> list[str]:
    """Why the measured cell cannot be trusted (empty: valid)."""
    reasons = []
    if c.ref is None:
        reasons.append(f"equivalence not checked ({c.ref_error})")
    elif c.settings.greedy and not metrics.equivalent:
        div = [d for d in metrics.first_divergence or [] if d is not None]
        differ = (f"greedy outputs differ from resident (exact match {metrics.exact_match_rate:.2f}, "
                  f"first divergence at token {min(div) if div else '?'})")
        top1 = metrics.teacher_forced_top1
        if c.config.dtype in EXACT_DTYPES:
            reasons.append(differ)
        elif (top1 or 0.0) < LOW_PRECISION_TOP1_MIN:
            reasons.append(f"{differ}; teacher-forced top-1 {top1} < {LOW_PRECISION_TOP1_MIN}")
        else:  # low precision: forwards of other shapes round differently, so near-ties may flip
            c.notes.append(f"{differ}; accepted in {c.config.dtype}: teacher-forced top-1 {top1:.4f}")
    if not metrics.output_tokens:
        reasons.append("no output tokens")
    return reasons


# ================================================================================================================
# Process-level measurements
# ================================================================================================================


class GcTimer:
    """Wall time Python's cyclic garbage collector spends while active (gc.callbacks), in ms."""

    def __init__(self):
        self.total_ms, self._t0 = 0.0, None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.total_ms += (time.perf_counter() - self._t0) * 1e3
            self._t0 = None

    def __enter__(self):
        import gc
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        import gc
        gc.callbacks.remove(self._callback)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux: write 5 to /proc/self/clear_refs), so that a cell measured
    in a shared worker reports its own peak, not an earlier cell's. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(process: dict) -> int | None:
    """Peak resident set of this process since it started or since the reset; None (not measured) for a cell
    in a shared worker whose peak could not be reset, since the peak then may be an earlier cell's."""
    try:
        if not process.get("cells_before") or process.get("peak_rss_reset"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    if process.get("cells_before"):  # the process-lifetime peak below may be an earlier cell's
        return None
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ================================================================================================================
# The process: jobs in, messages out
# ================================================================================================================


class Turns:
    """A cell measured in turns with another cell process (`specmoe-bench continuous`: the base commit's and the
    candidate's): before each measured iteration the process says so (a `turn` message) and waits for the parent's
    "go" line on its jobs pipe; the parent lets one side's iteration run while the other side's process waits."""

    def __init__(self, jobs):
        self.jobs, self.waited_s = jobs, 0.0

    def wait(self, iteration: int) -> None:
        t0 = time.perf_counter()
        report(turn=iteration)
        line = self.jobs.readline()
        if line.strip() != "go":
            raise RuntimeError(f"waiting for its turn at iteration {iteration}, the cell got {line.strip()!r} "
                               "from its parent instead of 'go'")
        self.waited_s += time.perf_counter() - t0


def serve(jobs) -> int:
    """For each job line `{"id", "config", "run_dir", "save_outputs", "environment"[, "turns"]}` measure the cell
    and answer `{"id", "result"}`; it ends at the end of its input. A process of one cell is a job stream of one
    line. `turns`: true to measure its iterations in turns (`Turns`, the "go" lines come on the same pipe)."""
    import gc

    with no_collection():
        import torch

        import engines.registry  # noqa: F401 - the imports a fresh cell process would pay, paid once here
        import workloads.models  # noqa: F401
    threads, done = torch.get_num_threads(), 0
    for line in jobs:
        if not line.strip():
            continue
        job = json.loads(line)
        torch.set_num_threads(threads)  # an earlier cell's cpu_threads does not carry over
        run_dir = Path(job["run_dir"]) if job.get("run_dir") else None
        result = measure_cell(CellConfig(**job["config"]), run_dir, bool(job.get("save_outputs")),
                              job.get("environment"), cells_before=done,
                              turns=Turns(jobs) if job.get("turns") else None)
        report(id=job["id"], result=clean_floats(result.to_dict()))
        done += 1
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m harness.cell --jobs-fd N: measure the cells sent on file descriptor N (see `serve`)."""
    global _channel
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--jobs-fd" or not argv[1].isdigit():
        print("usage: python -m harness.cell --jobs-fd N", file=sys.stderr)
        return 2
    # Messages keep the original stdout to themselves; whatever anything else prints goes to stderr (the log).
    _channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    with os.fdopen(int(argv[1])) as jobs:
        rc = serve(jobs)
    skip_final_collection()
    return rc


if __name__ == "__main__":
    sys.exit(main())
