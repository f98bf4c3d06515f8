"""The parent side of a run: launch the cell processes (harness.cell), enforce each cell's timeout, route their
output to the cell logs, and write each cell's result file the moment the cell ends.

Cells run in processes of their own, so a crash, an out-of-memory or a hang costs that cell only. One launcher,
`CellProcess`, serves both process modes: with `process_per = "cell"` every cell gets a new process; with "model",
consecutive cells of one model share one (the imports and device start-up paid once), and a cell that fails,
hangs or kills it still costs only itself: the next cell gets a new process.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from engines.errors import BadInput

from .cell import PROGRESS_PREFIX
from .env import REPO_ROOT, environment
from .results import ResultNotSaved, RunDir, cell_filename
from .schema import CellConfig, CellResult

# The cell process's command line (its jobs pipe is added); tests put a stand-in here to exercise the parent alone.
CELL_COMMAND = [sys.executable, "-m", "harness.cell"]
RETRY_DELAY_S = 1.0  # before the one retry of a result file that could not be written


def _child_env(tree: Path = REPO_ROOT) -> dict:
    """The environment of a child that imports harness, engines and workloads from `tree` (this one by default)."""
    env = dict(os.environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(tree)] + rest)
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
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
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


class CellProcess:
    """One cell process (harness.cell), fed one job line per cell on a pipe of its own. Its stdout carries the
    messages (progress, then each cell's result); its stderr goes to the current cell's log; its stdin is
    /dev/null. `key`: the cells that may share it (`worker_key`), None for a process of one cell. `tree`: the source
    tree whose harness.cell it runs, from that directory (`continuous` runs the base commit's, in a worktree); by
    default this tree's, from the current directory (a model given as a relative path is found from there)."""

    def __init__(self, key: tuple | None = None, tree: Path | None = None):
        self.key = key
        self.log = None
        self.on_progress = None
        self.results: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(CELL_COMMAND + ["--jobs-fd", str(read_end)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=_child_env(tree or REPO_ROOT), cwd=tree, pass_fds=(read_end,),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self.jobs = os.fdopen(write_end, "w")
        self.pumps = [threading.Thread(target=_route_output, args=(stream, self._write_log, on_message), daemon=True)
                      for stream, on_message in ((self.proc.stdout, self._on_message), (self.proc.stderr, None))]
        for t in self.pumps:
            t.start()

    def _on_message(self, msg: dict) -> None:
        if "result" in msg:
            self.results.put(msg["result"])
        else:
            with self.lock:
                on_progress = self.on_progress
            if on_progress is not None:
                on_progress(msg)

    def _write_log(self, line: str) -> None:
        with self.lock:
            if self.log is not None:
                self.log.write(line)
                self.log.flush()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def measure(self, job: dict, log, timeout_s: float, on_progress) -> tuple[str, dict | None]:
        """Send one cell and wait for it: ("finished", its result as a dict), ("timeout", None) (the process was
        killed) or ("exited", None) (the process died; its exit status is in `self.proc.returncode`)."""
        with self.lock:
            self.log, self.on_progress = log, on_progress
        try:
            try:
                self.jobs.write(json.dumps(job) + "\n")
                self.jobs.flush()
            except OSError:  # it died before this cell
                self.proc.wait()
                return "exited", None
            return self._wait(time.monotonic() + timeout_s)
        except BaseException:  # Ctrl-C in the parent: take the cell process down with us
            self.kill()
            raise
        finally:
            with self.lock:
                self.log, self.on_progress = None, None

    def _wait(self, deadline: float) -> tuple[str, dict | None]:
        while True:
            with contextlib.suppress(queue.Empty):
                return "finished", self.results.get(timeout=0.2)
            if not self.alive:
                for t in self.pumps:  # what it printed last belongs to this cell's log
                    t.join(timeout=5)
                with contextlib.suppress(queue.Empty):
                    return "finished", self.results.get_nowait()
                return "exited", None
            if time.monotonic() > deadline:
                self.kill()
                return "timeout", None

    def stop(self) -> None:
        """End of its cells: close its input (it exits), or kill it if it does not go within 30 s."""
        with contextlib.suppress(OSError):
            self.jobs.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.jobs.close()


def _route_output(stream, write_log, on_message=None) -> None:
    """Route a cell process's output: messages (PROGRESS_PREFIX + JSON) to `on_message`, everything else (and
    everything when `on_message` is None) to `write_log`."""
    for line in stream:
        if on_message is not None and line.startswith(PROGRESS_PREFIX):
            with contextlib.suppress(ValueError):
                on_message(json.loads(line[len(PROGRESS_PREFIX):]))
        else:
            write_log(line)


def worker_key(cell: CellConfig) -> tuple | None:
    """Cells with the same key may share a process; None: the cell gets a process of its own."""
    return (cell.model, cell.model_layers, cell.dtype) if cell.process_per == "model" else None


def run_cell(cell: CellConfig, run: RunDir, save_outputs: bool = False, on_progress=None,
             environment_info: dict | None = None, process: CellProcess | None = None,
             config: dict | None = None, turns: bool = False, timeout_s: float | None = None) -> CellResult:
    """Run one cell in a cell process (a new one, or the shared `process`) and write its result file before
    returning it. `environment_info`: the run's environment, read once by the caller, else the cell reads its own.
    `config`: the cell as the process's own tree expanded it, where that is another tree (its fields may differ).
    `turns`: its iterations wait for the parent's "go" (harness.cell.Turns; `on_progress` gets the `turn` messages).
    `timeout_s`: instead of the cell's own."""
    log_path = run.logs_dir / f"{cell_filename(cell)[:-5]}.log"
    job = {"id": cell.key(), "config": config or asdict(cell), "run_dir": str(run.path.resolve()),
           "save_outputs": save_outputs, "environment": environment_info}
    if turns:
        job["turns"] = True
    t0 = time.perf_counter()
    own = process is None
    with open(log_path, "w") as log:
        process = process or CellProcess()
        try:
            status, data = process.measure(job, log, timeout_s or cell.timeout_s, on_progress)
        finally:
            if own:
                process.stop()
    result = _outcome(cell, status, data, process.proc.returncode, time.perf_counter() - t0, log_path,
                      timeout_s or cell.timeout_s)
    save_result(run, result)
    return result


def _outcome(cell: CellConfig, status: str, data: dict | None, returncode: int | None, wall: float,
             log_path: Path, timeout_s: float) -> CellResult:
    """The cell's result: what the cell process sent, or a failure saying why there is none."""
    if status == "timeout":
        return _failure(cell, f"timed out after {timeout_s:g} s (timeout_s); the cell process was killed",
                        _tail(log_path), wall)
    if data is not None:
        try:
            result = CellResult.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            return _failure(cell, f"the cell process sent an unreadable result ({exc})", _tail(log_path), wall)
        if result.wall_s is not None:  # process start, imports and exit, outside the child's own clock
            result.phase_s["process"] = round(wall - result.wall_s, 3)
            result.wall_s = wall
        return result
    if returncode is not None and returncode < 0:
        rc = -returncode
        name = signal.Signals(rc).name if rc in signal.Signals._value2member_map_ else str(rc)
        why = " (the kernel's out-of-memory killer sends this; see dmesg)" if rc == signal.SIGKILL else ""
        return _failure(cell, f"the cell process was killed by {name}{why}", _tail(log_path), wall)
    return _failure(cell, f"the cell process exited with code {returncode} without sending a result",
                    _tail(log_path), wall)


def save_result(run: RunDir, result: CellResult) -> None:
    """Write the cell's result file, retrying once; a result that still cannot be written is kept elsewhere (a
    file in the system's temporary directory, else stderr) and ResultNotSaved says where, so nothing is lost."""
    try:
        run.write_cell(result)
        return
    except OSError:
        time.sleep(RETRY_DELAY_S)  # a disk briefly full (a log rotated, a cache cleaned) gets one more chance
    try:
        run.write_cell(result)
        return
    except OSError as exc:
        error = exc
    text = json.dumps(result.to_dict(), indent=1, default=str) + "\n"
    where = Path(tempfile.gettempdir()) / f"specmoe-bench-unsaved-{run.id}-{cell_filename(result.config)}"
    try:
        where.write_text(text)
    except OSError:
        sys.stderr.write(text)
        where = "stderr (above)"
    raise ResultNotSaved(f"the result of cell {result.config.key()} could not be written to {run.cell_path(result.config)} "
                         f"({error.strerror or error}); it is kept in {where}; copy it there once the disk has room, "
                         f"then resume with --run-id {run.id}")


def run_matrix(cells: list[CellConfig], run: RunDir, progress, save_outputs: bool = False,
               retry_failed: bool = False, env: dict | None = None) -> list[CellResult]:
    """Run every cell that has not finished in `run`; return the results of all cells, in matrix order.
    Cells that may share a process (`worker_key`) run one after another, in matrix order among themselves.
    retry_failed: measure failed and skipped cells again too."""
    results, shared = {}, None
    env = env or environment()  # once per run: the same for every cell, and seconds to read on a GPU machine
    first: dict = {}
    groups = [first.setdefault(worker_key(c) or ("cell", i), i) for i, c in enumerate(cells)]
    progress.start(len(cells))
    try:
        for i in sorted(range(len(cells)), key=lambda i: (groups[i], i)):
            cell = cells[i]
            done = run.finished(cell, on_corrupt=lambda why: progress.note(f"{why}; measuring the cell again"))
            if done is not None and not (retry_failed and done.status in ("failed", "skipped")):
                progress.cell_done(cell, done, resumed=True)
                results[i] = done
                continue
            progress.cell_start(cell)
            key = worker_key(cell)
            if shared is not None and (key != shared.key or not shared.alive):
                shared.stop()
                shared = None
            if key is not None and shared is None:
                shared = CellProcess(key)
            result = run_cell(cell, run, save_outputs, on_progress=progress.cell_progress, environment_info=env,
                              process=shared)
            if shared is not None and result.status == "failed":  # a fresh process for the next cell
                shared.stop()
                shared = None
            progress.cell_done(cell, result)
            results[i] = result
    except BaseException:
        if shared is not None:
            shared.kill()
        raise
    if shared is not None:
        shared.stop()
    _record_bounds(run)
    progress.finish()
    return [results[i] for i in range(len(cells))]


def _record_bounds(run: RunDir) -> None:
    """The hardware-bound probes the cells made, into run.json (harness/bounds.py)."""
    from harness import bounds
    found = bounds.recorded(run.path)
    if found:
        with contextlib.suppress(OSError, ValueError, BadInput):
            meta = run.read_meta()
            if meta:
                meta["hardware_bounds"] = found
                run.write_meta(meta)
