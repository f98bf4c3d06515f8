"""The `specmoe-bench` command line: run a matrix, compare engines, list what exists, show and export runs.

Bad input (a malformed matrix, an unknown name, an unwritable path) prints one line `error: ...` and exits 2.
A run exits 1 when a cell failed (its failure is in its result file), 0 otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import click

from engines.errors import BadInput

from . import matrix as matrix_mod
from .imports import skip_final_collection
from .results import DEFAULT_RESULTS_DIR, ResultNotSaved, RunDir, check_writable, comparable_key, comparison_table, \
    invalid_notes, new_run_id, render_table, row, sort_cells, warn
from .schema import CellConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """Benchmark offloaded Mixture-of-Experts inference: SpecMoE against the baselines, across a
    batch-size x model x hardware matrix. Every cell runs in its own process and writes one JSON file."""


results_dir_option = click.option(
    "--results-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RESULTS_DIR,
    show_default=True, help="Directory that holds one sub-directory per run.")


process_per_option = click.option(
    "--process-per", type=click.Choice(matrix_mod.PROCESS_PER), default=None,
    help="cell: every cell in a new process (the default); model: the cells of one model share a process, which "
         "saves each cell the imports and device start-up (seconds on a GPU); a cell that fails still costs only "
         "itself. Same as process_per in a matrix's [settings].")


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("matrix_file", required=False, metavar="MATRIX.toml")
@click.option("--default", "use_default", is_flag=True,
              help="Run the default matrix: matrices/gpu.toml on a machine with CUDA, matrices/cpu.toml otherwise.")
@click.option("--dry-run", is_flag=True, help="Print the cells the matrix expands to and exit without measuring.")
@click.option("--run-id", help="Name of the run directory; an existing run of that name is resumed. "
                               "Default: UTC time and matrix name.")
@click.option("--resume", "resume", metavar="RUN", help="Resume a run (id or directory) with the cells it planned; "
                                                       "finished cells are skipped.")
@click.option("--retry-failed", is_flag=True, help="When resuming, run again the cells that failed or were skipped "
                                                   "(by default every finished cell is kept).")
@click.option("--save-outputs", is_flag=True, help="Store the prompt token ids and generated token ids of every "
                                                   "sequence in each cell file.")
@click.option("--trace", is_flag=True, help="Keep every NVML reading of each measured region (the bandwidth "
                                            "timeline that `report` draws) in the cell files; same as "
                                            "nvml_trace = true in [settings].")
@click.option("--only", "only", multiple=True, metavar="AXIS=V1,V2",
              help="Run only the cells whose AXIS (engine, model, batch_size, hardware, workload) is one of the "
                   "values; repeat to narrow further. Example: --only model=small --only batch_size=1,16")
@process_per_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output; only the final table.")
@results_dir_option
def run(matrix_file, use_default, dry_run, run_id, resume, retry_failed, save_outputs, trace, only, process_per,
        quiet, results_dir):
    """Expand a matrix file into cells and measure each in its own process.

    Results go to RESULTS_DIR/<run-id>/cells/<cell>.json as each cell finishes; running the same --run-id
    again (or --resume) skips the cells already finished."""
    if resume:
        if matrix_file or use_default:
            raise BadInput("give either MATRIX.toml / --default or --resume RUN, not both")
        rundir = RunDir.open(resume, results_dir)
        meta = rundir.read_meta()
        if "cells" not in meta:
            raise BadInput(f"run {rundir.path}: run.json lists no cells, so it cannot be resumed; "
                           "run its matrix again with --run-id " + rundir.id)
        cells = stored_cells(meta, rundir.path / "run.json")
        matrix_mod.validate_cells(cells, str(rundir.path / "run.json"))
        m = matrix_mod.Matrix(cells=cells, source=meta.get("source", str(rundir.path)), text=meta.get("matrix", ""))
        results_dir, run_id = rundir.path.parent, rundir.id
    else:
        if use_default and matrix_file:
            raise BadInput("give either MATRIX.toml or --default, not both")
        if not use_default and not matrix_file:
            raise BadInput("give a matrix file (for example matrices/cpu.toml) or --default")
        path = matrix_mod.default_matrix_path() if use_default else Path(matrix_file)
        m = matrix_mod.load(path, check_hardware=not dry_run)
    if only:
        m.cells = matrix_mod.only(m.cells, only)
    if trace:
        m.cells = [dataclasses.replace(c, nvml_trace=True) for c in m.cells]
    if process_per:
        m.cells = [dataclasses.replace(c, process_per=process_per) for c in m.cells]
    if dry_run:
        click.echo(render_table(["#", "engine", "options", "model", "batch", "hardware", "workload", "cell"],
                                [[str(i + 1), c.engine, json.dumps(c.engine_options) if c.engine_options else "",
                                  c.model, str(c.batch_size), c.hardware, c.workload, c.key()]
                                 for i, c in enumerate(m.cells)]))
        click.echo(f"{len(m.cells)} cells from {m.source}")
        return 0
    label = Path(m.source).stem if m.source.endswith(".toml") else m.source
    return _execute(m, results_dir, run_id or new_run_id(label), save_outputs, retry_failed, quiet)


class RunInterrupted(Exception):
    """Ctrl-C during a run: the finished cells are saved; the message says how to resume."""


def stored_cells(meta: dict, where: Path) -> list[CellConfig]:
    """The cells a run.json planned; BadInput naming the file when one is not a cell of this schema."""
    try:
        return [CellConfig(**c) for c in meta.get("cells", [])]
    except (TypeError, BadInput) as exc:
        raise BadInput(f"{where}: a planned cell is not a cell of this schema ({exc})") from None


def _execute(m, results_dir: Path, run_id: str, save_outputs: bool, retry_failed: bool, quiet: bool,
             engines_order: list[str] | None = None, json_path: Path | None = None) -> int:
    rundir = RunDir.create(results_dir, run_id)
    with rundir.lock():
        try:
            results, meta = _measure_run(m, rundir, save_outputs, retry_failed, quiet, engines_order)
        except KeyboardInterrupt:
            raise RunInterrupted(f"interrupted; the finished cells are saved in {rundir.path}; run again with "
                                 f"--resume {rundir.id} (or the same --run-id) to measure the rest") from None
    click.echo(comparison_table(results, meta["engines"]))
    notes = invalid_notes(results)
    if notes:
        click.echo("\n" + "\n".join(notes))
    if json_path is not None:
        rows = compare_rows(results, meta["engines"][0], rundir.id)
        try:
            Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
        except OSError as exc:
            raise BadInput(f"--json {json_path}: cannot be written ({exc.strerror or exc}); "
                           f"every cell is saved in {rundir.path}") from None
        click.echo(f"rows: {json_path}")
    failed = sum(r.status == "failed" for r in results)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "failed", "skipped")}
    click.echo(f"\nresults: {rundir.path}  ({', '.join(f'{v} {k}' for k, v in counts.items())}; "
               f"{sum(r.status == 'ok' and not r.valid for r in results)} invalid)")
    return 1 if failed else 0


def _measure_run(m, rundir: RunDir, save_outputs: bool, retry_failed: bool, quiet: bool,
                 engines_order: list[str] | None):
    """run.json written (the cells planned, merged with a resumed run's), then every unfinished cell measured."""
    from .env import environment
    from .progress import Progress
    from .runner import prepare_models, run_matrix

    old = rundir.read_meta()  # a corrupt run.json stops here: rewriting it would lose the cells it planned
    prepare_models(m.cells, progress=not quiet, echo=lambda text: click.echo(text, err=True))
    planned = old.get("cells", [])
    keys = {c.key() for c in stored_cells(old, rundir.path / "run.json")}
    planned += [dataclasses.asdict(c) for c in m.cells if c.key() not in keys]
    meta = dict(run_id=rundir.id, source=m.source, matrix=m.text, command=sys.argv,
                created_at=old.get("created_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                engines=engines_order or list(dict.fromkeys(c.engine for c in m.cells)),
                environment=environment(), cells=planned)
    if old:
        meta["resumed_at"] = old.get("resumed_at", []) + [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())]
    rundir.write_meta(meta)
    if not quiet:
        click.echo(f"run {rundir.id}: {len(m.cells)} cells -> {rundir.path}", err=True)
    results = run_matrix(m.cells, rundir, Progress(quiet=quiet), save_outputs=save_outputs,
                         retry_failed=retry_failed, env=meta["environment"])
    return results, meta


def compare_rows(results, first_engine: str, run_id: str) -> list[dict]:
    """One flat row per cell, plus each throughput/traffic metric's ratio to the first engine's same cell."""
    base = {comparable_key(r.config): r for r in results if r.config.engine == first_engine and r.status == "ok"}
    out = []
    for r in results:
        d = row(r, run_id)
        b = base.get(comparable_key(r.config))
        for k in ("tokens_per_s", "decode_tokens_per_s", "h2d_bytes_per_token"):
            v, bv = getattr(r.metrics, k), getattr(b.metrics, k) if b is not None else None
            d[f"{k}_ratio"] = v / bv if v is not None and bv else None
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------


def parse_batch_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise BadInput(f"--batch-sizes {text!r}: {part!r} is not a whole number; write e.g. 1,8,64")
        if int(part) < 1:
            raise BadInput(f"--batch-sizes {text!r}: batch size {part} must be at least 1")
        out.append(int(part))
    return list(dict.fromkeys(out))


def default_model() -> str:
    from workloads.models import known_models
    return "tiny" if "tiny" in known_models() else "tiny-mixtral-random"


def default_workload() -> str:
    return "code-heldout"


def default_hardware() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_options(values: tuple[str, ...], engines: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for v in values:
        key, eq, value = v.partition("=")
        engine, dot, name = key.partition(".")
        if not eq or not dot or not name:
            raise BadInput(f"--option {v!r}: write ENGINE.OPTION=VALUE, e.g. lru.capacity=50%")
        if engine not in engines:
            raise BadInput(f"--option {v!r}: engine {engine!r} is not among --engines {','.join(engines)}")
        out.setdefault(engine, {})[name] = value  # its engine's Options class coerces it (matrix.validate_cells)
    return out


@cli.command()
@click.option("--engines", required=True, metavar="A,B,...",
              help="Engines to compare, comma-separated; ratios are to the first one (e.g. specmoe,offload).")
@click.option("--model", "models", multiple=True, metavar="MODEL",
              help="Model name, checkpoint directory or hub id; repeat for several. "
                   "Default: the trained 'tiny' model (tiny-mixtral-random where it does not exist).")
@click.option("--batch-sizes", default="1,8", show_default=True, metavar="N,N,...", help="Batch sizes to run.")
@click.option("--hardware", "hardware", multiple=True, metavar="SPEC",
              help="cpu, cuda, cuda:N or cuda:budget=24GiB, each optionally with :host=disk[@DIR] (experts "
                   "served from a file on local disk); repeat for several. Default: cuda if present, else cpu.")
@click.option("--workload", default=None,
              help="Prompt set (see `list workloads`). Default: code-heldout (held-out source code, real text for the "
                   "trained models), synthetic-ids where the workloads module is absent.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt length in tokens.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens generated per sequence.")
@click.option("--iterations", type=click.IntRange(min=1), default=3, show_default=True,
              help="Minimum number of measured iterations per cell.")
@click.option("--min-duration-s", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Minimum measured time per cell; iterations continue until both minimums are met.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Untimed generate calls before measuring.")
@click.option("--layers", "model_layers", type=click.IntRange(min=1), default=None,
              help="Load only this many decoder layers (large presets).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight dtype.")
@click.option("--timeout-s", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="A cell's process is killed after this many seconds and the cell recorded as failed.")
@click.option("--cpu-threads", type=click.IntRange(min=1), default=None,
              help="torch threads in each cell process (default: torch's choice). 1 keeps small CPU runs steady on "
                   "a busy machine.")
@click.option("--option", "options", multiple=True, metavar="ENGINE.KEY=VALUE",
              help="An engine option, e.g. lru.capacity=50%; repeatable. `list engines` shows the options.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the rows (one per cell, every metric) to this JSON file.")
@click.option("--run-id", help="Name of the run directory (an existing one is resumed).")
@click.option("--save-outputs", is_flag=True, help="Store prompt and generated token ids in each cell file.")
@process_per_option
@click.option("--quiet", "-q", is_flag=True, help="No progress output; only the final table.")
@results_dir_option
def compare(engines, models, batch_sizes, hardware, workload, prompt_len, max_new_tokens, iterations,
            min_duration_s, warmup, model_layers, dtype, timeout_s, cpu_threads, options, json_path, run_id,
            save_outputs, process_per, quiet, results_dir):
    """Run ENGINES on the same cells and print one table, engines side by side, each metric with its ratio to
    the first engine listed. The cells are stored as a run under RESULTS_DIR like any other run."""
    from engines.registry import parse_engine_list

    names = parse_engine_list(engines)
    bs = parse_batch_sizes(batch_sizes)
    workload = workload or default_workload()
    opts = parse_options(options, names)
    if json_path is not None:
        check_writable(json_path)
    cells = [CellConfig(engine=e, model=mdl, batch_size=b, hardware=hw, workload=workload,
                        engine_options=dict(opts.get(e, {})), model_layers=model_layers, dtype=dtype,
                        prompt_len=prompt_len, max_new_tokens=max_new_tokens, warmup=warmup,
                        min_iterations=iterations, min_duration_s=min_duration_s, timeout_s=timeout_s,
                        cpu_threads=cpu_threads, process_per=process_per or "cell")
             for mdl in (models or (default_model(),)) for hw in (hardware or (default_hardware(),))
             for b in bs for e in names]
    matrix_mod.validate_cells(cells, "compare")
    m = matrix_mod.Matrix(cells=cells, source="compare")
    return _execute(m, results_dir, run_id or new_run_id("compare-" + "-".join(names)), save_outputs,
                    retry_failed=False, quiet=quiet, engines_order=names, json_path=json_path)


# ---------------------------------------------------------------------------------------------------------------
# list, show, export
# ---------------------------------------------------------------------------------------------------------------


@cli.command(name="list")
@click.argument("what", type=click.Choice(["engines", "models", "workloads", "hardware"]))
def list_cmd(what):
    """List the engines, models, workloads or hardware profiles this installation knows."""
    if what == "engines":
        from engines import registry
        rows = []
        for name, target in registry.available().items():
            try:
                cls = registry.engine_class(name)
                opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options)) or "-"
                rows.append([name, cls.summary, opts])
            except Exception as exc:  # noqa: BLE001 - a broken plug-in is listed with its error
                rows.append([name, f"(cannot be loaded: {type(exc).__name__}: {exc})", target])
        click.echo(render_table(["engine", "what it is", "options (default)"], rows))
    elif what == "models":
        from workloads.cli import list_models_rows
        click.echo(_rows_table(list_models_rows()))
    elif what == "workloads":
        from workloads.cli import list_workloads_rows
        click.echo(_rows_table(list_workloads_rows()))
    else:
        import torch
        rows = [["cpu", "functional: bytes and hit rates are real, times are not GPU times", ""]]
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append([f"cuda:{i}" if i else "cuda", p.name, f"{p.total_memory / 2**30:.0f} GiB"])
        here = "" if torch.cuda.is_available() else "no CUDA device here"
        rows.append(["cuda:budget=SIZE", "emulates a GPU of SIZE running the whole model: its non-expert weights "
                                         "first, experts in the rest, e.g. cuda:budget=24GiB", here])
        rows.append(["cuda:budget=P%", "engines may keep P% of the model's expert bytes on the device, "
                                       "e.g. cuda:budget=25%", here])
        rows.append(["...:host=disk[@DIR]", "after any of these: experts served from a file on local disk in DIR "
                                            "(default: the cache directory), past the page cache", ""])
        click.echo(render_table(["hardware", "what it is", "memory"], rows))


def _rows_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    header = list(dict.fromkeys(k for r in rows for k in r))
    return render_table(header, [[_cell_text(r.get(k)) for k in header] for r in rows])


def _cell_text(v) -> str:
    return "-" if v is None else str(v)


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--flat", is_flag=True, help="One row per cell with its status instead of engines side by side.")
@results_dir_option
def show(run_ref, flat, results_dir):
    """Reprint a stored run's table. RUN is a run id under --results-dir or a run directory."""
    rundir = RunDir.open(run_ref, results_dir)
    results = rundir.results()
    meta = rundir.read_meta(on_corrupt=warn)
    if flat:
        click.echo(flat_table(results))
    else:
        engines = meta.get("engines")
        present = list(dict.fromkeys(r.config.engine for r in results))
        order = [e for e in engines if e in present] + [e for e in present if e not in engines] if engines else None
        click.echo(comparison_table(results, order))
        notes = invalid_notes(results)
        if notes:
            click.echo("\n" + "\n".join(notes))
    planned = len(meta.get("cells", [])) or len(results)
    env = (results[0].environment if results else None) or meta.get("environment") or {}
    click.echo(f"\nrun {rundir.id}: {len(results)}/{planned} cells in {rundir.path}; "
               f"host {env.get('host')}, {env.get('gpu_name') or 'no GPU'}, torch {env.get('torch')}, "
               f"commit {(env.get('git_commit') or '?')[:10]}{' (dirty)' if env.get('git_dirty') else ''}")


FLAT_METRICS = ["tokens_per_s", "ttft_ms", "h2d_bytes_per_token", "tokens_per_step", "acceptance_rate", "equivalent"]


def flat_table(results) -> str:
    """One row per cell with its status, batch sizes in numeric order, each metric printed per its facts."""
    from .schema import metric_fact
    header = ["engine", "model", "batch_size", "hardware", "status", "valid"] + FLAT_METRICS
    rows = [[r.config.engine, r.config.model, str(r.config.batch_size), r.config.hardware, r.status,
             str(r.valid)] + [metric_fact(m).text(getattr(r.metrics, m)) for m in FLAT_METRICS]
            for r in sort_cells(results)]
    return render_table(header, rows)


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as CSV.")
@click.option("--parquet", "parquet_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the table as Parquet.")
@results_dir_option
def export(run_ref, csv_path, parquet_path, results_dir):
    """Export a run as one tidy table (a row per cell, a column per config field and metric)."""
    from .results import export as export_run
    if not csv_path and not parquet_path:
        raise BadInput("export: give --csv PATH and/or --parquet PATH")
    for p in (csv_path, parquet_path):
        if p is not None:
            check_writable(p)
    for p in export_run(RunDir.open(run_ref, results_dir), csv_path, parquet_path):
        click.echo(f"wrote {p}")


def _add_optional_commands() -> None:
    """Commands that live with their own modules; a module that is absent or broken costs only its command."""
    for module, attr, name in (("workloads.cli", "model_group", "model"),
                               ("harness.calibrate", "calibrate_command", "calibrate"),
                               ("harness.regress", "regress_command", "regress"),
                               ("harness.continuous", "continuous_command", "continuous"),
                               ("harness.report", "report_command", "report")):
        try:
            mod = __import__(module, fromlist=[attr])
            cli.add_command(getattr(mod, attr), name)
        except Exception:  # noqa: BLE001
            pass


_add_optional_commands()


def main(argv: list[str] | None = None) -> None:
    """The program (argv None: the process's own command line, and the process ends after it), or one command
    run inside another program (a test) with `argv`."""
    try:
        _main(argv)
    finally:
        if argv is None:
            skip_final_collection()  # torch, transformers and the engines, imported to check the cells


def _main(argv: list[str] | None) -> None:
    try:
        rc = cli.main(args=argv, prog_name="specmoe-bench", standalone_mode=False)
    except BadInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RunInterrupted as exc:
        click.echo(f"\n{exc}", err=True)
        sys.exit(130)
    except ResultNotSaved as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
