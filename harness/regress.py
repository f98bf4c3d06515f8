"""Regression check of a candidate run against a baseline: matched cells, metric by metric, each in its own
direction. A timing change is called a regression only when it passes the ratio threshold *and* the per-iteration
samples differ significantly (Mann-Whitney U, asv's rule); metrics that are deterministic on the CPU are compared
exactly there, so any change in them is flagged.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from engines.errors import BadInput
from harness.results import RunDir, check_writable, warn
from harness.schema import METRIC_FACTS, CellResult, metric_value

# Read from the metric facts on the schema (harness.schema.METRIC_FACTS): metric -> which way is better, "exact"
# for a count with no better direction (any change is flagged); those counted, not timed, are exact on the CPU.
DIRECTION: dict[str, str] = {n: f.better or "exact" for n, f in METRIC_FACTS.items() if f.compared}
DETERMINISTIC_ON_CPU = {n for n, f in METRIC_FACTS.items() if f.cpu_exact and f.compared}
NOT_COMPARED = {n for n, f in METRIC_FACTS.items() if not f.compared and not n.startswith("nvml.")}
ALWAYS_EXACT = {"equivalent"}  # a reference match lost is a regression on any hardware
# Compared when no --metric is given.
DEFAULT_METRICS = ["tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms_p50", "h2d_bytes_per_token",
                   "expert_hit_rate", "tokens_per_step", "acceptance_rate", "equivalent", "exact_match_rate",
                   "nvml.joules_per_token"]

ALPHA = 0.05  # significance level of the two-sided Mann-Whitney U test
MIN_SAMPLES = 4  # per side: with 3 vs 3 samples the smallest two-sided p-value is 0.1, so 0.05 is unreachable
# Environment keys that differ between any two runs and say nothing about comparability.
ENV_IGNORED = {"host", "hostname", "executable", "git_commit", "git_dirty", "git_describe", "started_at",
               "finished_at", "pid", "command", "argv", "timestamp", "run_id"}

# -- loading: the one run-directory API (harness.results.RunDir) ------------------------------------------


def load_run(ref: str | Path) -> list[CellResult]:
    """Every readable cell result of a run: a run directory (results/baselines/cpu) or a run id under
    results/runs. A corrupt cell file is skipped with a warning naming it."""
    cells = RunDir.open(ref).results()
    if not cells:
        raise BadInput(f"run {str(ref)!r}: no cell results in it")
    return cells


def load_run_meta(ref: str | Path) -> dict:
    """run.json of a run ({} when absent, or corrupt: then with a warning saying so)."""
    return RunDir.open(ref).read_meta(on_corrupt=warn)


# -- comparison ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    cell: str
    metric: str
    baseline: float | bool | None
    candidate: float | bool | None
    status: str  # regression | changed | improvement | ok | not significant | absent | failed | ...
    p_value: float | None = None
    note: str = ""

    @property
    def flagged(self) -> bool:
        """Rows that make `regress` exit non-zero."""
        return self.status in ("regression", "changed", "failed")

    @property
    def change(self) -> float | None:
        """Relative change (candidate - baseline) / baseline, None where undefined."""
        b, c = self.baseline, self.candidate
        if b is None or c is None or isinstance(b, bool) or b == 0:
            return None
        return (c - b) / abs(b)


def parse_threshold(text: str | float) -> float:
    """'10%' or '0.1' -> 0.1."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise BadInput(f"--threshold {text!r}: give a percentage like 10% or a fraction like 0.1") from None
    if not 0 < value < 10:
        raise BadInput(f"--threshold {text!r}: must be greater than 0% and less than 1000%")
    return value


def parse_thresholds(values: tuple[str, ...] | list[str]) -> tuple[float, dict[str, float]]:
    """('350%', 'tpot_ms_p50=40%') -> (3.5, {'tpot_ms_p50': 0.4}); the last plain value is the default (10%)."""
    default, per_metric = 0.10, {}
    for v in values:
        name, eq, pct = str(v).partition("=")
        if eq:
            check_metrics([name.strip()])
            per_metric[name.strip()] = parse_threshold(pct)
        else:
            default = parse_threshold(v)
    return default, per_metric


def check_metrics(names: list[str]) -> list[str]:
    import difflib
    for n in names:
        if n not in DIRECTION:
            close = difflib.get_close_matches(n, list(DIRECTION), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadInput(f"unknown metric {n!r}{hint}; known metrics: {', '.join(DIRECTION)}")
    return names


def compare_metric(cell: str, metric: str, base: CellResult, cand: CellResult, threshold: float) -> Row:
    b, c = metric_value(base, metric), metric_value(cand, metric)
    if b is None or c is None:
        side = "both" if b is None and c is None else ("baseline" if b is None else "candidate")
        return Row(cell, metric, b, c, "absent", note=f"not measured in {side}")
    direction = DIRECTION[metric]
    cpu = base.config.hardware == "cpu" and cand.config.hardware == "cpu"
    if metric in ALWAYS_EXACT or (cpu and metric in DETERMINISTIC_ON_CPU) or direction == "exact":
        if b == c:
            return Row(cell, metric, b, c, "ok", note="exact")
        worse = direction == "exact" or (c < b if direction == "higher" else c > b)
        return Row(cell, metric, b, c, "regression" if worse else "changed",
                   note="deterministic: exact comparison" + ("" if worse else "; better, update the baseline"))
    xs, ys = base.samples.get(metric) or [], cand.samples.get(metric) or []
    enough = len(xs) >= MIN_SAMPLES and len(ys) >= MIN_SAMPLES
    if enough:  # medians: one iteration stalled by another process must not move the ratio
        b, c = statistics.median(xs), statistics.median(ys)
    of = f"medians of {len(xs)} vs {len(ys)}; " if enough else ""
    if b == c:
        return Row(cell, metric, b, c, "ok", note=of + "unchanged")
    # worse > 1 means the candidate is worse by that factor
    if b == 0 or c == 0:
        worse = math.inf if (c == 0) == (direction == "higher") else 0.0
    else:
        worse = c / b if direction == "lower" else b / c
    if 1 / (1 + threshold) <= worse <= 1 + threshold:
        return Row(cell, metric, b, c, "ok", note=of + f"within {threshold:.0%}")
    verdict = "regression" if worse > 1 else "improvement"
    if not enough:
        return Row(cell, metric, b, c, "not significant",
                   note=f"{verdict} by ratio; n too small ({len(xs)} vs {len(ys)} samples, need {MIN_SAMPLES})")
    from scipy.stats import mannwhitneyu
    p = float(mannwhitneyu(xs, ys, alternative="two-sided").pvalue)
    if p >= ALPHA:
        return Row(cell, metric, b, c, "not significant", p, note=f"{verdict} by ratio; {of}p={p:.3g}")
    return Row(cell, metric, b, c, verdict, p, note=f"{of}p={p:.3g}")


def environment_warnings(base: list[CellResult], cand: list[CellResult], base_meta: dict,
                         cand_meta: dict) -> list[str]:
    """One line per environment key whose value differs (torch version, GPU, CPU count, ...)."""

    def env(cells, meta):
        out = dict(meta.get("environment") or {})
        for r in cells:
            if r.environment:
                out.update(r.environment)
                break
        return out

    eb, ec = env(base, base_meta), env(cand, cand_meta)
    lines = []
    for k in sorted(set(eb) & set(ec) - ENV_IGNORED):
        if eb[k] != ec[k] and not isinstance(eb[k], (dict, list)):
            lines.append(f"warning: environments differ: {k} = {eb[k]!r} in the baseline, {ec[k]!r} in the candidate")
        elif isinstance(eb[k], (dict, list)) and json.dumps(eb[k], sort_keys=True) != json.dumps(ec[k], sort_keys=True):
            lines.append(f"warning: environments differ: {k} differs between baseline and candidate")
    return lines


@dataclass
class Comparison:
    rows: list[Row]
    warnings: list[str]
    only_baseline: list[str]
    only_candidate: list[str]

    @property
    def failed(self) -> bool:
        return any(r.flagged for r in self.rows)


def compare_runs(base: list[CellResult], cand: list[CellResult], threshold: float,
                 metrics: list[str] | None = None, base_meta: dict | None = None,
                 cand_meta: dict | None = None, per_metric: dict[str, float] | None = None) -> Comparison:
    """threshold: for every timing metric, unless per_metric names its own."""
    per_metric = per_metric or {}
    metrics = check_metrics(metrics or DEFAULT_METRICS)
    bmap = {r.config.key(): r for r in base}
    cmap = {r.config.key(): r for r in cand}
    common = [k for k in bmap if k in cmap]
    if not common:
        raise BadInput(f"baseline and candidate have no cells in common ({len(bmap)} vs {len(cmap)} cells; "
                       "cells match on engine, model, batch size, hardware, workload, lengths and seed)")
    rows = []
    for key in common:
        b, c = bmap[key], cmap[key]
        if b.status != "ok" or c.status != "ok":
            if b.status == "ok":
                rows.append(Row(key, "status", None, None, "failed",
                                note=f"cell {c.status} in the candidate: {c.error or ''}".strip()))
            else:
                rows.append(Row(key, "status", None, None, "skipped",
                                note=f"cell {b.status} in the baseline" + (f", {c.status} in the candidate"
                                                                            if c.status != "ok" else "")))
            continue
        rows += [compare_metric(key, m, b, c, per_metric.get(m, threshold)) for m in metrics]
    return Comparison(rows, environment_warnings(base, cand, base_meta or {}, cand_meta or {}),
                      [k for k in bmap if k not in cmap], [k for k in cmap if k not in bmap])


# -- rendering -----------------------------------------------------------------------------------------------


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"


def render_markdown(comp: Comparison, threshold: float, per_metric: dict[str, float] | None = None) -> str:
    lines = list(comp.warnings)
    lines += ["", f"| cell | metric | baseline | candidate | change | status | note |",
              "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    hidden = 0
    for r in comp.rows:
        if r.status == "absent" and r.baseline is None and r.candidate is None:
            hidden += 1  # not measured by either run (no speculation, no NVML): counted below, not listed
            continue
        change = "-" if r.change is None else f"{r.change:+.1%}" if abs(r.change) >= 1e-3 or r.change == 0 \
            else f"{r.change:+.4%}"
        status = f"**{r.status}**" if r.flagged else r.status
        lines.append(f"| {r.cell} | {r.metric} | {fmt_value(r.baseline)} | {fmt_value(r.candidate)} | {change} "
                     f"| {status} | {r.note} |")
    n_flag = sum(r.flagged for r in comp.rows)
    counts = {}
    for r in comp.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    own = "".join(f", {m} {t:.0%}" for m, t in (per_metric or {}).items())
    lines += ["", f"threshold {threshold:.0%} on timings{own}, compared as medians of the per-iteration samples where each "
                  f"side has at least {MIN_SAMPLES} (else the cell means), and called only when Mann-Whitney U "
                  f"gives p < {ALPHA}; deterministic CPU metrics compared exactly",
              "summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
              + (f" ({hidden} absent in both runs, not listed)" if hidden else "")]
    if comp.only_baseline:
        lines.append(f"note: {len(comp.only_baseline)} cell(s) only in the baseline: {', '.join(comp.only_baseline)}")
    if comp.only_candidate:
        lines.append(f"note: {len(comp.only_candidate)} cell(s) only in the candidate: "
                     f"{', '.join(comp.only_candidate)}")
    if any(r.flagged and r.note.startswith("deterministic") for r in comp.rows):
        lines.append("note: a deterministic metric changed; if the change is intended (the engine or the workload "
                     "changed on purpose), record a new baseline (results/baselines/README.md says how)")
    lines.append(f"result: {'REGRESSION' if comp.failed else 'no regression'} ({n_flag} flagged)")
    return "\n".join(lines).lstrip("\n") + "\n"


def unit_of(metric: str) -> str:
    return METRIC_FACTS[metric].unit


def github_benchmark_json(cand: list[CellResult], comp: Comparison) -> tuple[list[dict], list[dict]]:
    """Entries for github-action-benchmark: (customBiggerIsBetter, customSmallerIsBetter). The candidate's values;
    `range` is the sample standard deviation where samples exist."""
    cmap = {r.config.key(): r for r in cand}
    bigger, smaller = [], []
    for r in comp.rows:
        if r.metric == "status" or r.candidate is None:
            continue
        samples = cmap[r.cell].samples.get(r.metric) or []
        entry = {"name": f"{r.cell} {r.metric}", "unit": unit_of(r.metric), "value": float(r.candidate),
                 "extra": f"baseline {fmt_value(r.baseline)}; {r.status}" + (f"; {r.note}" if r.note else "")}
        if len(samples) > 1:
            mean = sum(samples) / len(samples)
            sd = math.sqrt(sum((x - mean) ** 2 for x in samples) / (len(samples) - 1))
            entry["range"] = f"± {sd:.4g}"
        (smaller if DIRECTION[r.metric] == "lower" else bigger).append(entry)
    return bigger, smaller


def github_json_paths(path: str | Path) -> list[Path]:
    """PATH.bigger.json and PATH.smaller.json, a trailing .json of PATH dropped."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".json" else p
    return [stem.parent / f"{stem.name}.{name}.json" for name in ("bigger", "smaller")]


def write_github_json(path: str | Path, cand: list[CellResult], comp: Comparison) -> list[Path]:
    bigger, smaller = github_benchmark_json(cand, comp)
    out = []
    for f, entries in zip(github_json_paths(path), (bigger, smaller)):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(entries, indent=2) + "\n")
        out.append(f)
    return out


# -- command -------------------------------------------------------------------------------------------------


@click.command("regress", help="Compare a candidate run with a baseline run cell by cell; print a Markdown table "
                               "and exit 1 on a regression (2 on bad input).")
@click.option("--baseline", required=True, metavar="RUN",
              help="Baseline run directory (results/runs/<id> or results/baselines/<name>) or run id.")
@click.option("--candidate", required=True, metavar="RUN", help="Candidate run directory or run id.")
@click.option("--threshold", "thresholds", multiple=True, default=["10%"], show_default=True, metavar="PCT|METRIC=PCT",
              help="Ratio a timing metric must move by before it can be a regression, e.g. 10% or 0.1; "
                   "METRIC=PCT gives one metric its own (repeatable), e.g. --threshold 50% --threshold ttft_ms=80%.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help=f"Compare only this metric (repeatable). Default: {', '.join(DEFAULT_METRICS)}.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also write github-action-benchmark input: PATH.bigger.json (tool customBiggerIsBetter) and "
                   "PATH.smaller.json (customSmallerIsBetter), a trailing .json of PATH dropped.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the Markdown table to FILE.")
def regress_command(baseline, candidate, thresholds, metrics, json_out, out):
    try:
        thr, per_metric = parse_thresholds(thresholds)
        check_metrics(list(metrics))
        for path in ([out] if out else []) + (github_json_paths(json_out) if json_out else []):
            check_writable(path, make_parents=True)
        base, cand = load_run(baseline), load_run(candidate)
        comp = compare_runs(base, cand, thr, list(metrics) or None, load_run_meta(baseline), load_run_meta(candidate),
                            per_metric)
    except BadInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    text = render_markdown(comp, thr, per_metric)
    click.echo(text, nl=False)
    try:
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text)
        if json_out:
            for f in write_github_json(json_out, cand, comp):
                click.echo(f"wrote {f}")
    except OSError as exc:  # checked before, so only a fault now (a full disk); the table is printed above
        click.echo(f"error: {exc.filename}: cannot be written ({exc.strerror or exc})", err=True)
        sys.exit(2)
    sys.exit(1 if comp.failed else 0)


if __name__ == "__main__":
    regress_command()
