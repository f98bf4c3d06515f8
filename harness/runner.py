"""Cells run in their own process: a crash, an out-of-memory or a hang costs that cell only.

Parent side: `run_matrix` walks the cells, skips those already finished in the run directory, starts
`python -m harness.runner CELL.json OUT.json` for each other cell under a timeout, and writes the cell's result
file as soon as the cell ends (the child's result, or a failure written by the parent with the reason).
With `process_per = "model"`, consecutive cells of one model share a worker process
(`python -m harness.runner --worker`, cells sent on its stdin) that skips the imports and device start-up a fresh
process pays; a cell that fails, hangs or kills it still costs that cell only, and the next cell gets a new worker.
Child side: `measure_cell` loads the model and engine, warms up, then generates until both the minimum number of
iterations and the minimum duration are reached, checks equivalence against `resident`, and stamps the cell
valid or invalid with the reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from engines.errors import BadInput, EngineUnavailable

from .env import REPO_ROOT, environment
from .results import RunDir, atomic_write_json, cell_filename, clean_floats, read_cell
from .schema import CellConfig, CellResult

# Exact greedy equality with `resident` is required where arithmetic is exact enough to promise it; in lower
# precision a verification pass over gamma + 1 tokens rounds differently from one token at a time, so there the
# cell is valid when the engine's own teacher-forced top-1 agreement reaches LOW_PRECISION_TOP1_MIN.
EXACT_DTYPES = ("float32", "float64")
LOW_PRECISION_TOP1_MIN = 0.99
PROGRESS_PREFIX = "@@smb "  # child -> parent progress lines on stdout; anything else there goes to the log
BUILTIN_WORKLOADS = {"synthetic-ids": "seeded random token ids, lengths within +-25% of prompt_len"}


# ================================================================================================================
# Workloads: the prompts of a cell
# ================================================================================================================


def _workload_module():
    try:
        from workloads import prompts
        return prompts
    except ImportError:
        return None


def workload_names() -> list[str]:
    names = list(BUILTIN_WORKLOADS)
    mod = _workload_module()
    if mod is not None and hasattr(mod, "known_workloads"):
        names += [n for n in mod.known_workloads() if n not in names]
    return names


def check_workload(name: str) -> None:
    if name in BUILTIN_WORKLOADS:
        return
    mod = _workload_module()
    if mod is None:
        raise BadInput(f"unknown workload {name!r}: only {', '.join(BUILTIN_WORKLOADS)} is built in "
                       "(workloads/prompts.py, which provides the others, is not installed)")
    if hasattr(mod, "check_workload"):
        mod.check_workload(name)
    elif hasattr(mod, "known_workloads") and name not in mod.known_workloads():
        from workloads.models import did_you_mean
        names = workload_names()
        raise BadInput(f"unknown workload {name!r}{did_you_mean(name, names)}; available: {', '.join(names)}")


def synthetic_prompts(batch_size: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Sequence i is the same at every batch size (seeded by seed and i); id 0 is left out as the pad id."""
    import torch
    out = []
    jitter = prompt_len // 4
    for i in range(batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        n = prompt_len + int(torch.randint(-jitter, jitter + 1, (1,), generator=g)) if jitter else prompt_len
        out.append(torch.randint(1, vocab_size, (max(1, n),), generator=g).tolist())
    return out


def make_prompts(cell: CellConfig, loaded) -> list[list[int]]:
    if cell.workload == "synthetic-ids":
        config = loaded.model.config
        vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
        return synthetic_prompts(cell.batch_size, cell.prompt_len, vocab, cell.seed)
    mod = _workload_module()
    if mod is None:
        raise BadInput(f"workload {cell.workload!r} needs workloads/prompts.py, which is not installed")
    return mod.load_workload(cell.workload, batch_size=cell.batch_size, prompt_len=cell.prompt_len,
                             output_len=cell.max_new_tokens, model=loaded, seed=cell.seed)


# ================================================================================================================
# Child side: one cell, measured in this process
# ================================================================================================================


def report(**fields) -> None:
    print(PROGRESS_PREFIX + json.dumps(fields), flush=True)


def _settings(cell: CellConfig):
    from engines.runtime import SamplingSettings
    return SamplingSettings(max_new_tokens=cell.max_new_tokens, temperature=cell.temperature, top_p=cell.top_p,
                            seed=cell.seed)


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
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"tokens": tokens, "logits": logits}, tmp)
        os.replace(tmp, path)
    return tokens, logits


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def measure_cell(cell: CellConfig, run_dir: Path | None = None, save_outputs: bool = False,
                 env: dict | None = None, cells_before: int = 0) -> CellResult:
    """Measure one cell in this process; never raises (a failure becomes a failed or skipped CellResult).
    `env`: the environment the parent read once for the whole run (reading it takes seconds on a GPU machine).
    `cells_before`: how many cells this process measured before this one (a shared worker's)."""
    t0 = time.perf_counter()
    result = CellResult(config=cell, status="failed", valid=False,
                        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        process=dict(pid=os.getpid(), cells_before=cells_before,
                                     peak_rss_reset=_reset_peak_rss() if cells_before else None))
    try:
        result.environment = dict(env) if env else environment()
        result.phase_s["environment"] = round(time.perf_counter() - t0, 3)
        _measure(cell, result, run_dir, save_outputs)
    except (EngineUnavailable, BadInput) as exc:  # cannot run here, or not in this combination (resident + budget)
        result.status, result.valid, result.error = "skipped", False, str(exc)
        result.invalid_reason = "skipped: " + str(exc)
    except BaseException as exc:  # noqa: BLE001 - MemoryError and friends are a cell failure too
        result.status, result.valid = "failed", False
        result.error = _one_line(exc)
        result.error_detail = traceback.format_exc()
        result.invalid_reason = "failed: " + result.error
        if isinstance(exc, KeyboardInterrupt):
            raise
    result.wall_s = time.perf_counter() - t0
    return result


def _measure(cell: CellConfig, result: CellResult, run_dir: Path | None, save_outputs: bool) -> None:
    last = [time.perf_counter()]

    def lap(phase: str) -> None:  # the wall time since the previous lap goes to `phase`
        now = time.perf_counter()
        result.phase_s[phase] = round(result.phase_s.get(phase, 0.0) + now - last[0], 3)
        last[0] = now

    import torch
    from engines import registry
    from engines.hardware import HardwareProfile
    from harness.equivalence import check_engine
    from harness.equivalence import compare as compare_tokens
    from workloads.models import load_model

    from .metrics import compute

    if cell.cpu_threads:
        torch.set_num_threads(cell.cpu_threads)
    hw = HardwareProfile.parse(cell.hardware)
    settings = _settings(cell)
    engine = registry.create(cell.engine, **cell.engine_options)
    report(phase="load")
    lap("imports_and_device")  # transformers and the engines imported, the device initialised
    loaded = load_model(cell.model, getattr(torch, cell.dtype), cell.model_layers, cell.seed)
    prompts = make_prompts(cell, loaded)
    result.workload_info = dict(prompts.metadata()) if hasattr(prompts, "metadata") else \
        dict(workload=cell.workload, description=BUILTIN_WORKLOADS.get(cell.workload))
    prompts = [list(p) for p in prompts]
    lap("load_model")
    ref, ref_error = None, None
    try:
        ref = reference_outputs(cell, hw, prompts, settings, run_dir / "reference" if run_dir else None)
    except Exception as exc:  # noqa: BLE001 - the cell is still measured, its equivalence is absent
        ref_error = _one_line(exc)
    lap("reference")

    notes = []
    try:
        engine.load(loaded, hw)
        lap("engine_load")
        engine.prepare(prompts, settings)
        lap("prepare")
        per_iter_tokens = cell.batch_size * cell.max_new_tokens
        for i in range(cell.warmup):
            engine.generate(prompts, settings)
            report(phase="warmup", iteration=i + 1, tokens=(i + 1) * per_iter_tokens)
        if hw.is_cuda:
            torch.cuda.synchronize(hw.device)
            torch.cuda.reset_peak_memory_stats(hw.device)
        lap("warmup")
        tracker, tracker_ctx = _nvml_tracker(hw, cell, notes)
        gens = []
        with tracker_ctx, GcTimer() as gc_timer:
            t_begin = time.perf_counter()
            while len(gens) < cell.min_iterations or time.perf_counter() - t_begin < cell.min_duration_s:
                gc_before = gc_timer.total_ms
                gens.append(engine.generate(prompts, settings))
                gens[-1].stats = dict(gens[-1].stats or {}, host_gc_ms=gc_timer.total_ms - gc_before)
                report(phase="measure", iteration=len(gens), tokens=sum(len(t) for g in gens for t in g.tokens))
        lap("measure")
        metrics, samples = compute(gens)
        output_tokens = sum(len(t) for g in gens for t in g.tokens)
        if tracker is not None:
            try:
                metrics.nvml = dict(tracker.summary(output_tokens))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"nvml summary failed: {_one_line(exc)}")
        elif not hw.is_cuda:  # every NVML metric present in the file, absent (null), with the reason
            from harness.nvml import empty_summary
            metrics.nvml = empty_summary(output_tokens=output_tokens)
            metrics.nvml["nvml_absent"] = f"hardware {hw.spec!r} is not an NVIDIA GPU: NVML metrics not measured"
        if hw.is_cuda:
            metrics.peak_device_mem_bytes = int(torch.cuda.max_memory_allocated(hw.device))
            from harness import bounds
            rates = bounds.for_run(run_dir, hw.device)
            bounds.apply(metrics, rates)
            result.environment["hardware_bounds"] = rates
        metrics.host_rss_bytes_max = _peak_rss_bytes(result.process)
        setup = dict(engine.setup_stats() or {})
        metrics.setup_h2d_bytes = setup.get("setup_h2d_bytes")
        if ref is not None:
            report(phase="equivalence")
            # every measured iteration must match; the one that matches least is the one reported
            worst = min(gens, key=lambda g: compare_tokens(ref[0], g.tokens).exact_match_rate)
            eq = check_engine(engine, prompts, settings, ref[0], ref[1], tokens=worst.tokens)
            metrics.equivalent, metrics.exact_match_rate = eq.equivalent, eq.exact_match_rate
            metrics.first_divergence = eq.first_divergence
            metrics.teacher_forced_top1, metrics.max_abs_logit_diff = eq.teacher_forced_top1, eq.max_abs_logit_diff
            lap("equivalence")
        info = engine.model_info
        result.model_info = asdict(info) if info is not None else {"name": loaded.name, "source": loaded.source}
        result.engine_stats = setup
        if save_outputs:
            result.outputs = {"prompts": prompts, "tokens": [g.tokens for g in gens],
                              "reference_tokens": ref[0] if ref is not None else None}
    finally:
        engine.close()
        lap("close")

    result.metrics, result.samples, result.status = metrics, samples, "ok"
    reasons = []
    if ref is None:
        reasons.append(f"equivalence not checked ({ref_error})")
    elif settings.greedy and not metrics.equivalent:
        div = [d for d in metrics.first_divergence or [] if d is not None]
        differ = (f"greedy outputs differ from resident (exact match {metrics.exact_match_rate:.2f}, "
                  f"first divergence at token {min(div) if div else '?'})")
        if cell.dtype in EXACT_DTYPES:
            reasons.append(differ)
        elif (metrics.teacher_forced_top1 or 0.0) < LOW_PRECISION_TOP1_MIN:
            reasons.append(f"{differ}; teacher-forced top-1 {metrics.teacher_forced_top1} < {LOW_PRECISION_TOP1_MIN}")
        else:  # low precision: forwards of other shapes round differently, so near-ties may flip
            notes.append(f"{differ}; accepted in {cell.dtype}: teacher-forced top-1 {metrics.teacher_forced_top1:.4f}")
    if not metrics.output_tokens:
        reasons.append("no output tokens")
    result.valid = not reasons
    result.invalid_reason = "; ".join(reasons) or None
    if notes:
        result.engine_stats["notes"] = notes


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


def _nvml_tracker(hw, cell: CellConfig, notes: list):
    """An NVML tracker around the measured region on CUDA (harness.nvml), else a no-op context."""
    if not hw.is_cuda:
        return None, contextlib.nullcontext()
    try:
        from harness.nvml import NvmlTracker
        tracker = NvmlTracker(device_index=int(hw.device.split(":")[1]), interval_s=0.01,
                               keep_trace=cell.nvml_trace)
        return tracker, tracker.track()
    except Exception as exc:  # noqa: BLE001 - absent module or NVML: the nvml metrics stay absent
        notes.append(f"nvml not recorded: {_one_line(exc)}")
        return None, contextlib.nullcontext()


def _measure_spec(spec_path: Path, out_path: Path, cells_before: int = 0) -> None:
    spec = json.loads(spec_path.read_text())
    run_dir = Path(spec["run_dir"]) if spec.get("run_dir") else None
    result = measure_cell(CellConfig(**spec["config"]), run_dir, bool(spec.get("save_outputs")),
                          spec.get("environment"), cells_before)
    atomic_write_json(out_path, clean_floats(result.to_dict()))


def worker(lines) -> int:
    """A shared cell process: for each line `{"spec": CELL.json, "out": OUT.json}` measure the cell, write its
    result, then say so on stdout; it ends at the end of its input."""
    import gc

    import torch

    import engines.registry  # noqa: F401 - the imports a fresh cell process would pay, paid once here
    import workloads.models  # noqa: F401
    threads, done = torch.get_num_threads(), 0
    for line in lines:
        if not line.strip():
            continue
        job = json.loads(line)
        torch.set_num_threads(threads)  # an earlier cell's cpu_threads does not carry over
        _measure_spec(Path(job["spec"]), Path(job["out"]), cells_before=done)
        done += 1
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        report(cell_finished=job["out"])
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m harness.runner CELL.json OUT.json: measure one cell, write its CellResult to OUT.json.
    python -m harness.runner --worker: measure the cells named on stdin, one JSON line each (see `worker`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--worker"]:
        return worker(sys.stdin)
    if len(argv) != 2:
        print("usage: python -m harness.runner CELL.json OUT.json | python -m harness.runner --worker",
              file=sys.stderr)
        return 2
    _measure_spec(Path(argv[0]), Path(argv[1]))
    return 0


# ================================================================================================================
# Parent side: one process per cell, a timeout, results written as cells finish
# ================================================================================================================


def _child_env() -> dict:
    env = dict(os.environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + rest)
    return env


_PREPARE = """
import sys
from engines.errors import BadInput
from workloads.train import trained_checkpoint
try:
    print(trained_checkpoint(sys.argv[1], progress=sys.argv[2] == "1"))
except BadInput as exc:
    sys.exit(str(exc))
"""


def prepare_models(cells: list[CellConfig], progress: bool, echo) -> None:
    """Train (or find cached) the project's own checkpoints once, before any cell, so that a first-use training of
    a few minutes neither counts against a cell's timeout nor runs in several cells. It runs in a process of its
    own, so the GPU memory training takes is given back before the first cell."""
    try:
        from workloads.models import TRAINED
    except ImportError:
        return
    for name in dict.fromkeys(c.model for c in cells):
        if name not in TRAINED:
            continue
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _PREPARE, name, "1" if progress else "0"], env=_child_env(),
                             stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:  # its cells will fail with the reason; the run goes on
            echo(f"model {name!r} could not be prepared (exit status {out.returncode}); its cells will say why")
        elif progress:
            path = (out.stdout.strip().splitlines() or ["?"])[-1]
            echo(f"model {name!r}: checkpoint {path} ({time.perf_counter() - t0:.1f} s)")


def _die_with_parent() -> None:
    """In the child before exec: its own process group (so a timeout kills all it started), and SIGKILL when
    the parent dies, so a killed run leaves no orphan that could finish a cell behind the next run's back."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _failure(cell: CellConfig, error: str, detail: str | None, wall_s: float) -> CellResult:
    return CellResult(config=cell, status="failed", valid=False, invalid_reason="failed: " + error, error=error,
                      error_detail=detail, wall_s=wall_s,
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall_s)))


def _tail(path: Path, n: int = 40) -> str | None:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) or None
    except OSError:
        return None


class Worker:
    """A cell process shared by consecutive cells of one model (process_per = "model"): `python -m harness.runner
    --worker`, fed one cell per line on its stdin. Its stdout and stderr go to the current cell's log file."""

    def __init__(self, key: tuple):
        self.key = key
        self.log = None
        self.on_progress = None
        self.finished: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "harness.runner", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.pumps = [threading.Thread(target=_read_progress, args=(stream, self._write_log, on_message),
                                       daemon=True)
                      for stream, on_message in ((self.proc.stdout, self._on_message), (self.proc.stderr, None))]
        for t in self.pumps:
            t.start()

    def _on_message(self, msg: dict) -> None:
        if "cell_finished" in msg:
            self.finished.put(msg["cell_finished"])
        elif self.on_progress is not None:
            self.on_progress(msg)

    def _write_log(self, line: str) -> None:
        with self.lock:
            if self.log is not None:
                self.log.write(line)
                self.log.flush()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def measure(self, spec_path: Path, out_path: Path, log, timeout_s: float, on_progress) -> str:
        """Send one cell and wait for it: "finished", "timeout" (the worker was killed) or "exited" (the worker
        died; its exit status is in `self.proc.returncode`)."""
        with self.lock:
            self.log, self.on_progress = log, on_progress
        try:
            self.proc.stdin.write(json.dumps({"spec": str(spec_path), "out": str(out_path)}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it died before this cell
            self.proc.wait()
            return self._detach("exited")
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with contextlib.suppress(queue.Empty):
                    self.finished.get(timeout=0.2)
                    return self._detach("finished")
                if not self.alive:
                    for t in self.pumps:  # what it printed last belongs to this cell's log
                        t.join(timeout=5)
                    return self._detach("finished" if not self.finished.empty() else "exited")
                if time.monotonic() > deadline:
                    self.kill()
                    return self._detach("timeout")
        except BaseException:  # Ctrl-C in the parent: take the worker down with us
            self.kill()
            raise

    def _detach(self, status: str) -> str:
        with self.lock:
            self.log, self.on_progress = None, None
        return status

    def stop(self) -> None:
        """End of its cells: close its input (it exits), or kill it if it does not go within 30 s."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def worker_key(cell: CellConfig) -> tuple | None:
    """Cells with the same key may share a worker; None: the cell gets a process of its own."""
    return (cell.model, cell.model_layers, cell.dtype) if cell.process_per == "model" else None


def run_cell(cell: CellConfig, run: RunDir, save_outputs: bool = False, on_progress=None,
             environment_info: dict | None = None, worker: Worker | None = None) -> CellResult:
    """Run one cell in a child process (a new one, or `worker`) and write its result file (atomically) before
    returning it. `environment_info`: the run's environment, read once by the caller, else the cell reads its own."""
    stem = cell_filename(cell)[:-5]
    spec_path, out_path = run.tmp_dir / f"{stem}.cell.json", run.tmp_dir / f"{stem}.result.json"
    log_path = run.logs_dir / f"{stem}.log"
    out_path.unlink(missing_ok=True)
    atomic_write_json(spec_path, {"config": asdict(cell), "run_dir": str(run.path.resolve()),
                                  "save_outputs": save_outputs, "environment": environment_info})
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        if worker is not None:
            timed_out = worker.measure(spec_path, out_path, log, cell.timeout_s, on_progress) == "timeout"
            returncode = worker.proc.returncode
        else:
            timed_out, returncode = _run_process(spec_path, out_path, log, cell.timeout_s, on_progress)
    wall = time.perf_counter() - t0
    result = None
    if timed_out:
        result = _failure(cell, f"timed out after {cell.timeout_s:g} s (timeout_s); the cell process was killed",
                          _tail(log_path), wall)
    elif out_path.exists():
        try:
            result = read_cell(out_path)
            if result.wall_s is not None:  # process start, imports and exit, outside the child's own clock
                result.phase_s["process"] = round(wall - result.wall_s, 3)
                result.wall_s = wall
        except (OSError, ValueError, TypeError, KeyError) as exc:
            result = _failure(cell, f"the cell process wrote an unreadable result ({exc})", _tail(log_path), wall)
    if result is None:
        rc = returncode
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
            why = " (the kernel's out-of-memory killer sends this; see dmesg)" if -rc == signal.SIGKILL else ""
            error = f"the cell process was killed by {name}{why}"
        else:
            error = f"the cell process exited with code {rc} without writing a result"
        result = _failure(cell, error, _tail(log_path), wall)
    run.write_cell(result)
    spec_path.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    return result


def _run_process(spec_path: Path, out_path: Path, log, timeout_s: float, on_progress) -> tuple[bool, int]:
    """One cell in a new process; returns (timed out, exit status)."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.runner", str(spec_path), str(out_path)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=_child_env(), start_new_session=True,
                            preexec_fn=_die_with_parent)
    def write_log(line: str) -> None:
        log.write(line)
        log.flush()

    reader = threading.Thread(target=_read_progress, args=(proc.stdout, write_log, on_progress or (lambda msg: None)),
                              daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except BaseException:  # Ctrl-C in the parent: take the cell process down with us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    reader.join(timeout=5)
    return timed_out, proc.returncode


def _read_progress(stream, write_log, on_message=None) -> None:
    """Route a cell process's output: progress lines (PROGRESS_PREFIX + JSON) to `on_message`, everything else (and
    everything when `on_message` is None) to `write_log`."""
    for line in stream:
        if on_message is not None and line.startswith(PROGRESS_PREFIX):
            with contextlib.suppress(ValueError):
                on_message(json.loads(line[len(PROGRESS_PREFIX):]))
        else:
            write_log(line)


def _record_bounds(run: RunDir) -> None:
    """The hardware-bound probes the cells made, into run.json (harness/bounds.py)."""
    from harness import bounds
    found = bounds.recorded(run.path)
    if found:
        with contextlib.suppress(OSError, ValueError):
            meta = run.read_meta()
            if meta:
                meta["hardware_bounds"] = found
                run.write_meta(meta)


def run_matrix(cells: list[CellConfig], run: RunDir, progress, save_outputs: bool = False,
               retry_failed: bool = False, env: dict | None = None) -> list[CellResult]:
    """Run every cell that has not finished in `run`; return the results of all cells, in matrix order.
    Cells that may share a worker process (`worker_key`) run one after another, in matrix order among themselves."""
    results, worker = {}, None
    env = env or environment()  # once per run: the same for every cell, and seconds to read on a GPU machine
    first: dict = {}
    groups = [first.setdefault(worker_key(c) or ("cell", i), i) for i, c in enumerate(cells)]
    order = sorted(range(len(cells)), key=lambda i: (groups[i], i))
    progress.start(len(cells))
    for i in order:
        cell = cells[i]
        done = run.finished(cell)
        if done is not None and not (retry_failed and done.status == "failed"):
            progress.cell_done(cell, done, resumed=True)
            results[i] = done
            continue
        progress.cell_start(cell)
        key = worker_key(cell)
        if worker is not None and (key != worker.key or not worker.alive):
            worker.stop()
            worker = None
        if key is not None and worker is None:
            worker = Worker(key)
        try:
            result = run_cell(cell, run, save_outputs, on_progress=progress.cell_progress, environment_info=env,
                              worker=worker)
        except BaseException:
            if worker is not None:
                worker.kill()
            raise
        if worker is not None and result.status == "failed":  # a fresh process for the next cell
            worker.stop()
            worker = None
        progress.cell_done(cell, result)
        results[i] = result
    if worker is not None:
        worker.stop()
    _record_bounds(run)
    progress.finish()
    return [results[i] for i in range(len(cells))]


if __name__ == "__main__":
    sys.exit(main())
