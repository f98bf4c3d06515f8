"""Results that survive: a run directory with one JSON file per cell, written atomically as each cell finishes,
read back into one tidy pandas table (a row per cell) and rendered by the one table renderer of the project.

    results/runs/<run-id>/run.json           the matrix, environment, start time, the cells planned
    results/runs/<run-id>/cells/<key>.json   one CellResult per cell (schema harness.schema)
    results/runs/<run-id>/reference/         cached `resident` outputs for equivalence
    results/runs/<run-id>/logs/<key>.log     the cell process's stderr
    results/runs/<run-id>/run.lock           held (flock) by the process running it, so a second run refuses

Every command that reads a run (show, export, report, regress, resume) goes through RunDir: a corrupt or truncated
cell file is skipped with a one-line warning naming it, and resume measures that cell again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from engines.errors import BadInput

from .schema import METRIC_FIELDS, CellConfig, CellResult, metric_fact

DEFAULT_RESULTS_DIR = Path("results/runs")
FINISHED = ("ok", "skipped", "failed")


class ResultNotSaved(RuntimeError):
    """A measured cell's result could not be written to its run directory; the message says where it went."""


def warn(text: str) -> None:
    """One line on stderr: something was passed over, and the command goes on."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and os.replace: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=_json_default, allow_nan=False) + "\n")


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def clean_floats(obj):
    """NaN/inf are not JSON: a value that is not a number was not measured, so it becomes None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_floats(v) for v in obj]
    return obj


def cell_filename(cell: CellConfig) -> str:
    return re.sub(r"[^A-Za-z0-9._=,%\[\]+-]", "_", cell.key()) + ".json"


def sort_cells(results: list[CellResult]) -> list[CellResult]:
    """Cells in a reading order: by engine, model, hardware, workload, then batch size as a number."""
    def order(r: CellResult):
        c = r.config
        return (c.engine, c.model, c.hardware, c.workload, c.dtype, c.model_layers or 0, c.batch_size, c.key())
    return sorted(results, key=order)


def new_run_id(label: str) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + re.sub(r"[^A-Za-z0-9_-]", "_", label)


class RunDir:
    """One run on disk, the one API for writing and reading it. Creating it checks that the location can be
    written before anything is measured."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name
        self.cells_dir = self.path / "cells"
        self.reference_dir = self.path / "reference"
        self.logs_dir = self.path / "logs"

    @classmethod
    def create(cls, results_dir: Path, run_id: str) -> "RunDir":
        if not re.fullmatch(r"[A-Za-z0-9._-]+", run_id) or run_id in (".", ".."):
            raise BadInput(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only")
        run = cls(Path(results_dir) / run_id)
        try:
            for d in (run.cells_dir, run.reference_dir, run.logs_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = run.path / f".probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise BadInput(f"results directory {run.path}: cannot be written ({exc.strerror or exc})") from None
        return run

    @classmethod
    def open(cls, ref: str | Path, results_dir: Path = DEFAULT_RESULTS_DIR) -> "RunDir":
        """A run id (under results_dir) or a path to a run directory."""
        for candidate in (Path(ref), Path(results_dir) / str(ref)):
            if (candidate / "cells").is_dir():
                return cls(candidate)
        known = sorted(p.name for p in Path(results_dir).glob("*") if (p / "cells").is_dir())
        hint = f"; runs under {results_dir}: {', '.join(known[-5:])}" if known else f"; {results_dir} holds no runs"
        raise BadInput(f"run {str(ref)!r}: not a run id or run directory (no such directory{hint})")

    @contextlib.contextmanager
    def lock(self):
        """Hold run.lock for as long as this process runs the run; BadInput at once when a live process holds it.
        The kernel drops the lock of a process that died, so a stale lock file is simply taken over."""
        fd = os.open(self.path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise BadInput(f"run {self.id} in {self.path} is in use by process {holder}; wait for it to end or "
                           "give another --run-id") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock; the file stays, so no second process can lock a vanished inode

    # -- run.json ---------------------------------------------------------------------------------------------

    def write_meta(self, meta: dict) -> None:
        try:
            atomic_write_json(self.path / "run.json", meta)
        except OSError as exc:
            raise BadInput(f"{self.path / 'run.json'}: cannot be written ({exc.strerror or exc}); nothing was "
                           "measured") from None

    def read_meta(self, on_corrupt=None) -> dict:
        """run.json ({} when there is none). A corrupt one raises BadInput saying so, or, given `on_corrupt`, is
        reported through it and read as {}."""
        f = self.path / "run.json"
        try:
            meta = json.loads(f.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            return meta
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            why = f"{f}: corrupt or unreadable run file ({exc})"
            if on_corrupt is None:
                raise BadInput(why) from None
            on_corrupt(why)
            return {}

    # -- cells ------------------------------------------------------------------------------------------------

    def cell_path(self, cell: CellConfig) -> Path:
        return self.cells_dir / cell_filename(cell)

    def finished(self, cell: CellConfig, on_corrupt=None) -> CellResult | None:
        """The stored result of a cell, or None when it has not finished; a file that cannot be read is reported
        through `on_corrupt` (one line naming it) and counts as not finished, so the cell is measured again."""
        path = self.cell_path(cell)
        if not path.exists():
            return None
        try:
            result = read_cell(path)
        except BadInput as exc:
            if on_corrupt is not None:
                on_corrupt(str(exc))
            return None
        return result if result.status in FINISHED else None

    def write_cell(self, result: CellResult) -> Path:
        path = self.cell_path(result.config)
        atomic_write_json(path, clean_floats(result.to_dict()))
        return path

    def results(self, on_corrupt=warn) -> list[CellResult]:
        """Every readable cell result, in file-name order; one that cannot be read is skipped and reported
        through `on_corrupt` (a warning on stderr by default)."""
        out = []
        for p in sorted(self.cells_dir.glob("*.json")):
            try:
                out.append(read_cell(p))
            except BadInput as exc:
                on_corrupt(f"skipped {exc}")
        return out


def read_cell(path: Path) -> CellResult:
    """One cell result file; BadInput naming the file (and where it breaks) when it is not one."""
    f = Path(path)
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise BadInput(f"{f}: corrupt or truncated result file ({exc.msg} at line {exc.lineno}, "
                       f"column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{f}: cannot read result file ({exc})") from None
    if not isinstance(data, dict) or "config" not in data:
        raise BadInput(f"{f}: not a cell result (no 'config' object)")
    try:
        return CellResult.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{f}: not a cell result of this schema ({exc})") from None


# -- the tidy table ---------------------------------------------------------------------------------------------

CONFIG_COLUMNS = ["engine", "model", "batch_size", "hardware", "workload", "engine_options", "model_layers", "dtype",
                  "prompt_len", "max_new_tokens", "temperature", "seed"]


def row(result: CellResult, run_id: str | None = None) -> dict:
    """One flat row per cell: config, status, every metric (None when absent), NVML keys as nvml_*."""
    c = result.config
    r = {"run_id": run_id, "cell": c.key()}
    for k in CONFIG_COLUMNS:
        v = getattr(c, k)
        r[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
    r.update(status=result.status, valid=result.valid, invalid_reason=result.invalid_reason, error=result.error)
    m = result.metrics
    for k in METRIC_FIELDS:
        v = getattr(m, k)
        r[k] = json.dumps(v) if isinstance(v, list) else v
    for k, v in sorted((m.nvml or {}).items()):
        if isinstance(v, (int, float, str, bool)) or v is None:
            r[f"nvml_{k}"] = v
    mi = result.model_info or {}
    r["model_source"] = mi.get("source")
    env = result.environment or {}
    r.update(gpu_name=env.get("gpu_name"), git_commit=env.get("git_commit"), git_dirty=env.get("git_dirty"),
             host=env.get("host"), wall_s=result.wall_s)
    return r


def load_table(run: RunDir):
    """A whole run as one pandas DataFrame, one row per cell."""
    import pandas as pd
    rows = [row(r, run.id) for r in sort_cells(run.results())]
    return pd.DataFrame(rows)


def export(run: RunDir, csv: Path | None = None, parquet: Path | None = None) -> list[Path]:
    for path in (csv, parquet):
        if path is not None:
            check_writable(path)
    df = load_table(run)
    written = []
    for path, write in ((csv, lambda p: df.to_csv(p, index=False)), (parquet, lambda p: df.to_parquet(p, index=False))):
        if path is None:
            continue
        try:
            write(path)
        except OSError as exc:
            raise BadInput(f"output path {path}: cannot be written ({exc.strerror or exc})") from None
        written.append(Path(path))
    return written


def check_writable(path: str | Path, make_parents: bool = False) -> None:
    """Raise BadInput now, before the work, if the file `path` could not be written later: by trying (a new
    file is created and removed again), since permissions alone do not tell (/proc, a read-only mount, root).
    make_parents: the command creates missing directories, so the nearest existing one must take them."""
    p = Path(path)
    if p.is_dir():
        raise BadInput(f"output path {p}: is a directory")
    parent = p.parent
    if make_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"output path {p}: directory {p.parent} does not exist")
    probe = p if p.parent == parent else parent / f".probe-{os.getpid()}"
    existed = probe.exists()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_APPEND | (0 if existed else os.O_CREAT | os.O_EXCL), 0o644))
        if not existed:
            probe.unlink()
    except OSError as exc:
        raise BadInput(f"output path {p}: not writable ({exc.strerror or exc})") from None


def check_writable_dir(path: str | Path) -> None:
    """The same for an output directory (created if missing, as the command would)."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"output directory {d}: cannot be created ({exc.strerror or exc})") from None
    check_writable(d / "report.md")


# -- rendering: the one text table renderer ----------------------------------------------------------------------

# Metrics shown side by side per engine; each prints per its facts (harness.schema.METRIC_FACTS).
COMPARE_METRICS = ["tokens_per_s", "steady_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms_p50",
                   "tpot_ms_p99", "h2d_bytes_per_token", "h2d_gb_per_s", "expert_hit_rate", "tokens_per_step",
                   "acceptance_rate", "bound_tokens_per_s", "pct_of_bound", "bound", "equivalent"]
GPU_ONLY = {"bound_tokens_per_s", "pct_of_bound", "bound"}  # rows left out of a table in which no cell has them


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i >= 1 and _numeric(c) else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _numeric(text) -> bool:
    return bool(re.fullmatch(r"-?[0-9][0-9.,]*(e[+-]?[0-9]+)?(%| (B|KiB|MiB|GiB|TiB))?( \([0-9.]+x\))?", str(text)))


def comparison_table(results: list[CellResult], engines: list[str] | None = None) -> str:
    """Engines side by side, one row per (model, hardware, workload, batch size, metric); each engine's value
    followed by its ratio to the first engine (for every metric except booleans). Cells are grouped as `report`
    groups them: an engine with its options is one column, and cells that differ in any other setting (dtype,
    layers, lengths, ...) are rows of their own, so no cell overwrites another."""
    if not results:
        return "(no cells)"
    columns = list(dict.fromkeys(series_name(r) for r in results))
    if engines is not None:  # the order asked for, by engine; an engine's option variants stay together
        columns = sorted(columns, key=lambda s: (engines.index(s.split("[")[0]) if s.split("[")[0] in engines
                                                 else len(engines), columns.index(s)))
    varying = [n for n in varying_settings(results) if n != "workload"]  # the workload is in the label
    groups: dict[tuple, dict[str, CellResult]] = {}
    for r in results:
        groups.setdefault(comparable_key(r.config), {})[series_name(r)] = r
    header = ["model", "hardware", "batch", "metric"] + [e if i == 0 else f"{e} (x {columns[0]})"
                                                         for i, e in enumerate(columns)]
    rows = []
    for key, by_series in sorted(groups.items(), key=lambda kv: [str(x) if not isinstance(x, int) else
                                                                  f"{x:012d}" for x in kv[0]]):
        c = next(iter(by_series.values())).config
        label = c.model if c.workload == "synthetic-ids" else f"{c.model} [{c.workload}]"
        label += "".join(f" {n}={getattr(c, n)}" for n in varying)
        hw, batch = c.hardware, c.batch_size
        shown = [m for m in COMPARE_METRICS
                 if m not in GPU_ONLY or any(getattr(r.metrics, m) is not None for r in by_series.values())]
        for i, metric in enumerate(shown):
            cells = [_compare_cell(by_series, s, columns[0], metric, first_row=i == 0) for s in columns]
            rows.append([label if i == 0 else "", hw if i == 0 else "", str(batch) if i == 0 else "", metric] + cells)
    return render_table(header, rows)


def _compare_cell(by_series: dict[str, CellResult], series: str, first: str, metric: str, first_row: bool) -> str:
    r = by_series.get(series)
    if r is None:
        return ""
    if r.status != "ok":
        return _status_note(r) if first_row else ""
    fact = metric_fact(metric)
    v = getattr(r.metrics, metric)
    text = fact.text(v)
    base = by_series.get(first)
    b = getattr(base.metrics, metric) if base is not None and base.status == "ok" else None
    if series != first and fact.format not in ("bool", "text") and v is not None and b:
        text += f" ({v / b:.2f}x)"
    return text


def comparable_key(c: CellConfig) -> tuple:
    """What two cells of different engines must share to be compared side by side: every setting but the
    engine and its options (batch size last, so that sorting by it orders the batch sizes)."""
    return (c.model, c.hardware, c.workload, c.dtype, c.model_layers or 0, c.prompt_len, c.max_new_tokens,
            c.temperature, c.top_p, c.seed, c.batch_size)


def series_name(r: CellResult) -> str:
    """The engine with its options, spelled as in the cell key: lru[capacity=3]."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(r.config.engine_options.items()))
    return r.config.engine + (f"[{opts}]" if opts else "")


def varying_settings(results: list[CellResult]) -> list[str]:
    """Config fields besides engine, options, batch, model and hardware that differ across the cells: they split
    what is compared (a table's rows, a report's panels)."""
    names = ["workload", "dtype", "model_layers", "prompt_len", "max_new_tokens", "temperature", "seed"]
    return [n for n in names if len({getattr(r.config, n) for r in results}) > 1]


def _status_note(r: CellResult) -> str:
    """Empty for a measured cell; otherwise a short word for the table (the reason is listed under it)."""
    return "" if r.status == "ok" else f"{r.status} (see below)"


def invalid_notes(results: list[CellResult]) -> list[str]:
    out = []
    for r in results:
        if r.status == "ok" and not r.valid:
            out.append(f"invalid  {r.config.key()}: {r.invalid_reason}")
        elif r.status != "ok":
            out.append(f"{r.status:8s} {r.config.key()}: {r.error}")
    return out
