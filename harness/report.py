"""`specmoe-bench report RUN`: the comparison tables and figures of one run, as Markdown with PNG files and as one
self-contained HTML page. The report is a list of blocks rendered twice, so the two formats never disagree.
"""
from __future__ import annotations

import base64
import html
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from engines.errors import BadInput
from engines.hardware import byte_unit
from harness.results import DEFAULT_RESULTS_DIR, RunDir, check_writable_dir, series_name, varying_settings, warn
from harness.schema import CellResult, format_value, metric_fact, metric_value

REFERENCE_ENGINE = "offload"  # speedups are over naive offload, as in the paper (MoE-OnDemand)
ENGINE_ORDER = ["resident", "offload", "overlap", "caching", "lru", "nospec", "specmoe", "accelerate"]
NO_NVML_WHY = "no NVIDIA GPU or NVML unavailable"


def no_nvml(cells: list[CellResult]) -> str:
    """Why a run has no NVML readings: the reason its cells recorded (harness.nvml's `nvml_absent`), if one."""
    why = next((r.metrics.nvml.get("nvml_absent") for r in cells
                if isinstance((r.metrics.nvml or {}).get("nvml_absent"), str)), None)
    return f"no NVML samples in this run ({why or NO_NVML_WHY})"


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "h3" | "p" | "note" | "table" | "figure"
    text: str = ""  # heading, paragraph, or figure caption
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None  # figure PNG


# -- the cells of a run, grouped into panels (model x hardware) and series (engine with options) ---------------


def panel_of(r: CellResult, varying: list[str]) -> str:
    extra = ", ".join(f"{n}={getattr(r.config, n)}" for n in varying)
    return f"{r.config.model} on {r.config.hardware}" + (f" ({extra})" if extra else "")


def _engine_rank(series: str) -> tuple[int, str]:
    base = series.split("[")[0]
    return (ENGINE_ORDER.index(base) if base in ENGINE_ORDER else len(ENGINE_ORDER), series)


Points = dict[str, dict[str, list[tuple[int, float, float | None]]]]  # panel -> series -> [(batch, value, err)]


def collect(cells: list[CellResult], value: Callable[[CellResult], float | None],
            err: Callable[[CellResult], float | None] = lambda r: None) -> Points:
    varying = varying_settings(cells)
    out: Points = {}
    for r in cells:
        v = value(r)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out.setdefault(panel_of(r, varying), {}).setdefault(series_name(r), []).append(
            (r.config.batch_size, float(v), err(r)))
    for series in out.values():
        for pts in series.values():
            pts.sort()
    return out


def sample_sd(r: CellResult, metric: str) -> float | None:
    xs = r.samples.get(metric) or []
    return statistics.stdev(xs) if len(xs) > 1 else None


def speedups(cells: list[CellResult]) -> Points:
    """tokens/s of each series over the reference engine's at the same panel and batch size."""
    tps = collect(cells, lambda r: r.metrics.tokens_per_s)
    out: Points = {}
    for panel, series in tps.items():
        ref = {b: v for b, v, _ in series.get(REFERENCE_ENGINE, [])}
        for name, pts in series.items():
            if name == REFERENCE_ENGINE:
                continue
            sp = [(b, v / ref[b], None) for b, v, _ in pts if ref.get(b)]
            if sp:
                out.setdefault(panel, {})[name] = sp
    return out


def nvml_timeline(r: CellResult) -> dict[str, list[float]] | None:
    """Readings over time kept in the cell's NVML summary: {"t_s": [...], "<metric>_bytes_per_s": [...], ...}."""
    tl = (r.metrics.nvml or {}).get("timeline")
    if not isinstance(tl, dict) or not tl.get("t_s"):
        return None
    return tl


# -- figures ---------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


MARKERS = "os^DvPX*<>"
LINESTYLES = ["-", "--", "-.", ":"]
CPU_TIMES = "CPU times, not GPU times"


def _styles(names) -> dict[str, dict]:
    """Series -> how it is drawn, fixed for the whole run so an engine looks the same in every figure. Engines whose
    values coincide (offload and overlap move the same bytes; nospec and specmoe often) must stay visible: markers
    are hollow, and consecutive series alternate large markers on thick lines with small markers on thin lines,
    each with its own shape and dash pattern, so one drawn over the other shows as a ring inside a ring."""
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    ordered = sorted(set(names), key=_engine_rank)
    return {name: dict(color=cmap(i % 10), marker=MARKERS[i % len(MARKERS)], mfc="none", mew=1.6,
                       ms=12 if i % 2 == 0 else 6, lw=2.6 if i % 2 == 0 else 1.2, ls=LINESTYLES[i % len(LINESTYLES)])
            for i, name in enumerate(ordered)}


def draw_panels(rows: list[tuple[Points, str]], title: str, styles: dict[str, dict], hline: float | None = None,
                cpu_times: set[str] = frozenset()):
    """One column per panel, one row per metric; x is batch size on a log2 axis. None when nothing to draw.
    cpu_times: panels whose values are times measured on the CPU, which the image itself says."""
    panels = sorted({p for pts, _ in rows for p in pts})
    if not panels:
        return None
    plt = _plt()
    ncols = len(panels)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(5.2 * ncols, 3.9 * len(rows)), squeeze=False)
    for i, (pts, ylabel) in enumerate(rows):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            series = pts.get(panel, {})
            if not series:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{panel}:\nnot measured", ha="center", va="center", transform=ax.transAxes)
                continue
            batches = sorted({b for s in series.values() for b, _, _ in s})
            for name in sorted(series, key=_engine_rank):
                xs, ys, es = zip(*series[name])
                yerr = [e or 0.0 for e in es] if any(e for e in es) else None
                ax.errorbar(xs, ys, yerr=yerr, capsize=3, label=name, alpha=0.9, **styles[name])
            if hline is not None:
                ax.axhline(hline, color="grey", ls="--", lw=1, label=f"{REFERENCE_ENGINE} (1.0x)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches)
            ax.set_xticklabels([str(b) for b in batches])
            ax.minorticks_off()
            ax.set_xlabel("batch size (sequences)")
            ax.set_ylabel(ylabel)
            ax.set_title(panel + (f"\n{CPU_TIMES}" if panel in cpu_times else ""), fontsize=10,
                         color="firebrick" if panel in cpu_times else "black")
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.05, 1e-9))  # every metric drawn is >= 0
            ax.legend(fontsize=8)
    fig.suptitle(title + (f" ({CPU_TIMES})" if cpu_times & set(panels) else ""))
    fig.tight_layout()
    return fig


def panel_figure(path: Path, rows: list[tuple[Points, str]], title: str, styles: dict[str, dict],
                 hline: float | None = None, cpu_times: set[str] = frozenset()) -> bool:
    """draw_panels saved as a PNG; False when nothing to draw."""
    fig = draw_panels(rows, title, styles, hline, cpu_times)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return True


def scale_points(pts: Points, factor: float) -> Points:
    return {p: {s: [(b, v / factor, None if e is None else e / factor) for b, v, e in xs] for s, xs in ser.items()}
            for p, ser in pts.items()}


def timeline_figure(path: Path, r: CellResult, tl: dict[str, list[float]]) -> bool:
    t = tl["t_s"]
    rates = {k: v for k, v in tl.items() if k.endswith("_bytes_per_s") and v and len(v) == len(t)}
    pcts = {k: v for k, v in tl.items() if k.endswith("_pct") and v and len(v) == len(t)}
    if not rates and not pcts:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1 + bool(pcts) if rates else 1, 1, figsize=(9, 3.4 * (1 + bool(pcts and rates))),
                             squeeze=False)
    ax_i = 0
    if rates:
        ax = axes[ax_i][0]
        ax_i += 1
        for k, v in sorted(rates.items()):
            ax.plot(t, [math.nan if x is None else x / 1e9 for x in v], label=k.replace("_bytes_per_s", ""))
        ax.set_ylabel("bandwidth (GB/s)")
        ax.set_xlabel("time since the measured region began (s)")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if pcts:
        ax = axes[ax_i][0]
        for k, v in sorted(pcts.items()):
            ax.plot(t, [math.nan if x is None else x for x in v], label=k.replace("_pct", ""))
        ax.set_ylabel("utilisation (%)")
        ax.set_xlabel("time since the measured region began (s)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"NVML readings over time: {r.config.key()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- tables ----------------------------------------------------------------------------------------------------


def fmt(v: float | None, metric: str) -> str:
    """A value as the CLI prints it: the metric's own format (harness.schema), or "x" for a speedup."""
    return format_value(v, "x" if metric == "x" else metric_fact(metric).format)


def pivot(pts: Points, panel: str, metric: str) -> tuple[list[str], list[list[str]]] | None:
    series = pts.get(panel)
    if not series:
        return None
    names = sorted(series, key=_engine_rank)
    batches = sorted({b for s in series.values() for b, _, _ in s})
    table = {(n, b): v for n in names for b, v, _ in series[n]}
    return ["batch"] + names, [[str(b)] + [fmt(table.get((n, b)), metric) for n in names] for b in batches]


# -- the report ------------------------------------------------------------------------------------------------


TABLES = [("Output tokens/s", "tokens_per_s"), (f"Speedup over {REFERENCE_ENGINE}", "x"),
          ("Host-to-device bytes per output token", "h2d_bytes_per_token"), ("Expert hit rate", "expert_hit_rate"),
          ("Tokens per step per sequence", "tokens_per_step"), ("Acceptance rate", "acceptance_rate"),
          ("TTFT (ms)", "ttft_ms"), ("TPOT p50 (ms)", "tpot_ms_p50"),
          ("Exact match with `resident`", "exact_match_rate"),
          ("Energy per output token (J)", "nvml.joules_per_token")]  # (title, metric; "x": speedup)
SPECULATION = ("tokens_per_step", "acceptance_rate")  # drawn and tabulated for the engines that draft only


def build_report(run: Path, cells: list[CellResult], meta: dict, out: Path, nvml_cell: str | None = None) -> list[Block]:
    ok = [r for r in cells if r.status == "ok"]
    blocks = _intro_blocks(run, cells, meta)
    if not ok:
        blocks.append(Block("note", "no cell finished ok: nothing to tabulate or draw"))
        return blocks + _problem_blocks(cells)
    spec_cells = [r for r in ok if r.metrics.acceptance_rate is not None or r.metrics.drafted_tokens]
    pts = {metric: collect(spec_cells if metric in SPECULATION else ok, lambda r, m=metric: metric_value(r, m))
           for _, metric in TABLES if metric != "x"}
    pts["tokens_per_s"] = collect(ok, lambda r: r.metrics.tokens_per_s, lambda r: sample_sd(r, "tokens_per_s"))
    pts["x"] = speedups(ok)
    blocks += _figure_blocks(ok, pts, out, nvml_cell)
    blocks.append(Block("h2", "Tables"))  # one group per panel
    for panel in sorted(pts["tokens_per_s"].keys() | pts["h2d_bytes_per_token"].keys()):
        blocks.append(Block("h3", panel))
        headline = summary_table(panel, pts)
        if headline:
            blocks.append(headline)
        for title, metric in TABLES:
            t = pivot(pts[metric], panel, metric)
            if t:
                blocks.append(Block("table", title, header=t[0], rows=t[1]))
    return blocks + _problem_blocks(cells)


def _intro_blocks(run: Path, cells: list[CellResult], meta: dict) -> list[Block]:
    ok = [r for r in cells if r.status == "ok"]
    blocks = [Block("h1", f"specmoe-bench report: {meta.get('run_id') or run.name}")]
    counts = {s: sum(r.status == s for r in cells) for s in ("ok", "failed", "skipped")}
    invalid = [r for r in ok if not r.valid]
    blocks.append(Block("p", f"{len(cells)} cells: {counts['ok']} ok ({len(invalid)} of them flagged invalid), "
                             f"{counts['failed']} failed, {counts['skipped']} skipped. Engines: "
                             f"{', '.join(sorted({series_name(r) for r in cells}, key=_engine_rank))}. "
                             f"Speedups are over `{REFERENCE_ENGINE}` at the same model, hardware and batch size."))
    env = next((r.environment for r in cells if r.environment), None) or meta.get("environment") or {}
    if env:
        keys = ["git_commit", "torch", "transformers", "gpu_name", "driver", "cpu_count", "platform"]
        blocks.append(Block("p", "Environment: " + "; ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None)))
    if any(r.config.hardware == "cpu" for r in ok):
        blocks.append(Block("note", "hardware `cpu` is functional: bytes, hit rates, tokens per step and acceptance "
                                    "are real; times are CPU times, not GPU times."))
    return blocks


def _figure_blocks(ok: list[CellResult], pts: dict[str, Points], out: Path, nvml_cell: str | None) -> list[Block]:
    styles = _styles(series_name(r) for r in ok)
    cpu = {panel_of(r, varying_settings(ok)) for r in ok if r.config.hardware == "cpu"}  # their times say so
    blocks = [Block("h2", "Figures")]
    out.mkdir(parents=True, exist_ok=True)

    def figure(name: str, caption: str, rows: list, title: str, absent: str, hline: float | None = None,
               times: bool = False) -> None:
        drawn = panel_figure(out / name, rows, title, styles, hline=hline, cpu_times=cpu if times else frozenset())
        blocks.append(Block("figure", caption, path=out / name) if drawn else Block("note", absent))

    figure("throughput.png", "Output tokens/s (end to end, prefill included) vs batch size; bars: sd over iterations",
           [(pts["tokens_per_s"], "output tokens/s")], "Throughput", "no tokens/s measured in this run",
           times=True)
    figure("speedup.png", f"Speedup in tokens/s over `{REFERENCE_ENGINE}`",
           [(pts["x"], f"speedup over {REFERENCE_ENGINE} (x)")], f"Speedup over {REFERENCE_ENGINE}",
           f"no `{REFERENCE_ENGINE}` cells to compare against: speedup not drawn", hline=1.0, times=True)
    bpt = pts["h2d_bytes_per_token"]
    unit, size = byte_unit(max((v for ser in bpt.values() for p in ser.values() for _, v, _ in p), default=0))
    figure("h2d_bytes_per_token.png", "Host-to-device expert bytes per output token (counted by the engine)",
           [(scale_points(bpt, size), f"H2D {unit} per output token")], "Host-to-device traffic per token",
           "no host-to-device byte counts in this run")
    figure("speculation.png", "Tokens per step per sequence (bonus token included) and draft acceptance rate",
           [(pts["tokens_per_step"], "tokens per step per sequence"),
            (scale_points(pts["acceptance_rate"], 0.01), "acceptance rate (%)")], "Speculation",
           "no speculative engine in this run (no drafted tokens): tokens per step and acceptance not drawn")
    figure("energy_per_token.png", "Energy per output token (NVML energy counter)",
           [(pts["nvml.joules_per_token"], "energy per output token (J)")], "Energy per token",
           f"{no_nvml(ok)}: energy per token not drawn")
    return blocks + _timeline_blocks(ok, out, nvml_cell)


def summary_table(panel: str, pts: dict[str, Points]) -> Block | None:
    """Every engine at the panel's largest batch size: the headline numbers side by side."""
    tps, sp, bpt, tpstep, match = (pts[m] for m in ("tokens_per_s", "x", "h2d_bytes_per_token", "tokens_per_step",
                                                     "exact_match_rate"))
    series = tps.get(panel, {})
    if not series:
        return None
    batch = max(b for pts in series.values() for b, _, _ in pts)

    def at(pts: Points, name: str) -> float | None:
        return next((v for b, v, _ in pts.get(panel, {}).get(name, []) if b == batch), None)

    ref_bytes = at(bpt, REFERENCE_ENGINE)
    rows = []
    for name in sorted(series, key=_engine_rank):
        nbytes = at(bpt, name)
        vs_ref = None if nbytes is None or not ref_bytes else f"{nbytes / ref_bytes - 1:+.1%}"
        rows.append([name, fmt(at(tps, name), "tokens_per_s"),
                     fmt(at(sp, name), "x") if name != REFERENCE_ENGINE else "1.00x", fmt(nbytes, "h2d_bytes_per_token"),
                     vs_ref or "-", fmt(at(tpstep, name), "tokens_per_step"), fmt(at(match, name), "exact_match_rate")])
    return Block("table", f"At batch size {batch}", rows=rows,
                 header=["engine", "tokens/s", f"speedup over {REFERENCE_ENGINE}", "H2D bytes/token",
                         f"bytes vs {REFERENCE_ENGINE}", "tokens/step", "exact match"])


def _timeline_blocks(ok: list[CellResult], out: Path, nvml_cell: str | None) -> list[Block]:
    with_tl = [r for r in ok if nvml_timeline(r)]
    if nvml_cell is not None:
        chosen = [r for r in ok if r.config.key() == nvml_cell]
        if not chosen:
            raise BadInput(f"--nvml-cell {nvml_cell!r}: no ok cell with that key in this run "
                           f"(keys look like {ok[0].config.key()})")
        if not nvml_timeline(chosen[0]):
            return [Block("note", f"{no_nvml(ok)}, so nothing is drawn for cell {nvml_cell}")]
        cell = chosen[0]
    elif with_tl:
        # default: the largest batch of the full system, else of any engine
        cell = max(with_tl, key=lambda r: (r.config.engine == "specmoe", r.config.batch_size))
    elif any(metric_value(r, "nvml.samples") for r in ok):
        return [Block("note", "NVML bandwidth over time: this run kept NVML summaries only, no readings over time "
                              "(the tracker's keep_trace was off), so nothing is drawn")]
    else:
        return [Block("note", f"NVML bandwidth over time: {no_nvml(ok)}, so nothing is drawn")]
    drawn = timeline_figure(out / "nvml_timeline.png", cell, nvml_timeline(cell))
    if not drawn:
        return [Block("note", f"NVML bandwidth over time: no bandwidth series recorded for {cell.config.key()}")]
    return [Block("figure", f"NVML bandwidth over time for {cell.config.key()}", path=out / "nvml_timeline.png")]


def _problem_blocks(cells: list[CellResult]) -> list[Block]:
    blocks = []
    bad = [r for r in cells if r.status != "ok"]
    if bad:
        blocks += [Block("h2", "Failed and skipped cells"),
                   Block("table", "", header=["cell", "status", "reason"],
                         rows=[[r.config.key(), r.status, (r.error or "").splitlines()[0] if r.error else "-"]
                               for r in bad])]
    invalid = [r for r in cells if r.status == "ok" and not r.valid]
    if invalid:
        blocks += [Block("h2", "Cells flagged invalid"),
                   Block("table", "", header=["cell", "reason"],
                         rows=[[r.config.key(), r.invalid_reason or "-"] for r in invalid])]
    return blocks


# -- renderers -------------------------------------------------------------------------------------------------


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "note":
            lines += [f"> {b.text}", ""]
        elif b.kind == "figure":
            lines += [f"![{b.text}]({b.path.relative_to(out).as_posix()})", "", f"*{b.text}*", ""]
        elif b.kind == "table":
            if b.text:
                lines += [f"**{b.text}**", ""]
            right = [i > 0 and all(_numeric(r[i]) for r in b.rows) for i in range(len(b.header))]
            lines.append("| " + " | ".join(b.header) + " |")
            lines.append("| " + " | ".join("---:" if r else "---" for r in right) + " |")
            lines += ["| " + " | ".join(row) + " |" for row in b.rows]
            lines.append("")
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    return text == "-" or text[:1].isdigit() or text[:1] in "-+" and text[1:2].isdigit()


def _inline_md(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if b.kind == "h1"), "specmoe-bench report")
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_md(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_md(b.text)}</p>")
        elif b.kind == "note":
            body.append(f'<p class="note">{_inline_md(b.text)}</p>')
        elif b.kind == "figure":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline_md(b.text)}</figcaption></figure>")
        elif b.kind == "table":
            right = [i > 0 and all(_numeric(r[i]) for r in b.rows) for i in range(len(b.header))]
            head = "".join(f"<th>{_inline_md(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f'<td{" class=num" if right[i] else ""}>{_inline_md(c)}</td>'
                                            for i, c in enumerate(r)) + "</tr>" for r in b.rows)
            caption = f"<caption>{_inline_md(b.text)}</caption>" if b.text else ""
            body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 1em 1.5em 0;display:inline-table;vertical-align:top}"
             "caption{font-weight:bold;text-align:left;padding:0.2em 0}"
             "td,th{border:1px solid #ccc;padding:0.2em 0.6em}td.num{text-align:right}th{background:#f3f3f3}"
             ".note{border-left:4px solid #e0a800;padding-left:0.6em;color:#555}"
             "img{max-width:100%}figcaption{color:#555;font-size:0.9em}code{background:#f3f3f3}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run: str | Path, out: str | Path | None = None, nvml_cell: str | None = None,
                 results_dir: Path = DEFAULT_RESULTS_DIR) -> list[Path]:
    """Write report.md, report.html and the PNG figures; returns the paths written."""
    rundir = RunDir.open(run, results_dir)
    out_dir = Path(out) if out else rundir.path / "report"
    check_writable_dir(out_dir)
    cells = rundir.results()
    if not cells:
        raise BadInput(f"run {str(run)!r}: no cell results in {rundir.cells_dir}")
    md, page = out_dir / "report.md", out_dir / "report.html"
    try:
        blocks = build_report(rundir.path, cells, rundir.read_meta(on_corrupt=warn), out_dir, nvml_cell)
        md.write_text(render_markdown(blocks, out_dir))
        page.write_text(render_html(blocks))
    except OSError as exc:
        raise BadInput(f"output directory {out_dir}: cannot be written ({exc.strerror or exc})") from None
    return [md, page] + [b.path for b in blocks if b.kind == "figure"]


@click.command("report", help="Write a Markdown report, a self-contained HTML page and PNG figures for one run.")
@click.argument("run", metavar="RUN")
@click.option("--out", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Directory for report.md, report.html and the PNGs. Default: RUN/report.")
@click.option("--nvml-cell", default=None, metavar="CELL_KEY",
              help="Cell whose NVML readings over time are drawn. Default: the largest-batch specmoe cell that "
                   "has them, else any cell that has them.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RESULTS_DIR,
              show_default=True, help="Directory that holds one sub-directory per run (where a run id is looked up).")
def report_command(run, out, nvml_cell, results_dir):
    try:
        paths = write_report(run, out, nvml_cell, results_dir)
    except BadInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {paths[0]} and {paths[1]} with {len(paths) - 2} figure(s) in {paths[0].parent}")


if __name__ == "__main__":
    report_command()
