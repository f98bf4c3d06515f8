"""Regression check of a candidate against a baseline: matched cells, metric by metric, each in its own direction.
A timing change is called a regression only when it passes the ratio threshold *and* the samples differ
significantly (Mann-Whitney U, asv's rule); timings mean something only between runs of one machine in one job
(`.ci/run` measures base and candidate iteration by iteration in turns, and compares them pair by pair: `paired`).
Metrics that are deterministic on the CPU are compared exactly there; those that vary by design are left out with
the reason.
It is over 500 lines because it holds the comparison rules, the comparison of runs pooled per side (several runs of
a base against several of a candidate, as harness/continuous.py runs them) and the two renderings (Markdown,
github-action-benchmark JSON) that CI reads; each is a few short functions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from engines.errors import BadInput
from harness.results import RunDir, check_writable, warn
from harness.schema import CellResult, metric_fact, metric_value

# Directions, units and CPU exactness are the metric facts on the schema (harness.schema.metric_fact); `rule_for`
# below is the one place that turns them into how a metric is compared.
ALWAYS_EXACT = {"equivalent"}  # a reference match lost is a regression on any hardware
# Compared when no --metric is given.
DEFAULT_METRICS = ["tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms_p50", "speedup_over_offload",
                   "h2d_bytes_per_token", "expert_hit_rate", "tokens_per_step", "acceptance_rate", "equivalent",
                   "exact_match_rate", "nvml.joules_per_token"]

ALPHA = 0.05  # significance level of the two-sided Mann-Whitney U test (the Wilcoxon signed-rank test, paired)
MIN_SAMPLES = 4  # per side: with 3 vs 3 samples the smallest two-sided p-value is 0.1, so 0.05 is unreachable
MIN_PAIRS = 6  # paired: with 5 pairs the smallest two-sided Wilcoxon p-value is 0.0625
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


# -- how each metric is compared ------------------------------------------------------------------------------

TIMING_UNITS = {"tokens/s", "ms", "GB/s"}  # read off a clock: they measure the machine as much as the code
# Engine options that choose by measured time, so the counts of a cell that has them on follow the timing noise.
# option -> (the value that makes a cell choose by measured times, why its counts then vary from run to run)
TIMING_DRIVEN_OPTIONS = {
    "adaptive": (True, "speculation is switched on or off by measured tokens/s, so its counts follow the timing "
                       "noise; set adaptive = false to compare them exactly"),
    "gamma": ("auto", "the draft length is chosen from measured step times, so its counts follow the timing noise; "
                      "set a fixed gamma to compare them exactly"),
}
SAME_IN_EVERY_MODE = {"equivalent", "exact_match_rate", "output_tokens"}  # the tokens do not depend on the switch
REFERENCE_ENGINE = "offload"  # between-engine ratios are over naive offload, as in the paper (MoE-OnDemand)
RATIO_OF = "tokens_per_s"
SPEEDUP = f"speedup_over_{REFERENCE_ENGINE}"  # a cell's tokens/s over offload's in the same run: cancels the machine


@dataclass(frozen=True)
class Rule:
    """How one metric of one pair of cells is compared."""
    how: str  # "exact" (any change flagged) | "timing" | "threshold" (ratio, Mann-Whitney U) | "left out"
    better: str | None  # "higher" | "lower" | None: no better direction, any change is flagged
    why: str = ""


def rule_for(metric: str, base: CellResult, cand: CellResult) -> Rule:
    """The one place that decides how a metric is compared; units, directions and CPU exactness come from the
    metric facts on the schema (harness.schema.metric_fact)."""
    if metric == SPEEDUP:
        return Rule("timing", "higher")
    fact = metric_fact(metric)
    if metric in ALWAYS_EXACT:
        return Rule("exact", fact.better, "a match with the reference lost is a regression on any hardware")
    if metric.startswith("nvml.") or fact.unit in TIMING_UNITS:
        return Rule("timing", fact.better)
    by_design = varies_by_design(base) or varies_by_design(cand)
    if by_design and fact.cpu_exact and metric not in SAME_IN_EVERY_MODE:
        return Rule("left out", fact.better, by_design)
    if fact.cpu_exact and base.config.hardware == "cpu" and cand.config.hardware == "cpu":
        return Rule("exact", fact.better, "deterministic: exact comparison")
    if fact.better is None:
        return Rule("exact", None, "a count with no better direction: exact comparison")
    return Rule("threshold", fact.better)


def varies_by_design(r: CellResult) -> str | None:
    """Why this cell's counts vary from run to run by design (an option on that chooses by timing), else None."""
    defaults, speculates = engine_defaults(r.config.engine)
    options = defaults | r.config.engine_options
    for name, (value, why) in TIMING_DRIVEN_OPTIONS.items():
        if speculates and name in options and options[name] == value and type(options[name]) is type(value):
            return f"left out: {r.config.engine} {name}={value} ({why})"
    return None


@functools.lru_cache(maxsize=None)
def engine_defaults(engine: str) -> tuple[dict, bool]:
    """An engine's option defaults ({} where its class cannot be loaded here: then the cell's options alone), and
    whether it speculates at all (nospec, `speculate = False`, has nothing to switch on or off)."""
    try:
        from engines import registry
        cls = registry.engine_class(engine)
    except Exception:  # noqa: BLE001 - an engine not installed here
        return {}, True
    return {f.name: f.default for f in dataclasses.fields(cls.Options)}, getattr(cls, "speculate", True) is not False


def check_metrics(names: list[str]) -> list[str]:
    for n in names:
        if n != SPEEDUP and not metric_fact(n).compared:
            raise BadInput(f"metric {n!r} is not compared (a property of the method, not of the engine)")
    return names


# -- comparison ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    cell: str
    metric: str
    baseline: float | bool | None
    candidate: float | bool | None
    status: str  # regression | changed | improvement | ok | not significant | not confirmed | absent | left out |
    #              failed | skipped
    p_value: float | None = None
    note: str = ""
    better: str | None = None  # the metric's direction, for github-action-benchmark
    candidate_sd: float | None = None  # sample standard deviation of the candidate's samples

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


class Side:
    """One side of a comparison: one run, or the rounds of one commit measured in one job, pooled cell by cell."""

    def __init__(self, runs: list[list[CellResult]], metas: list[dict] | None = None):
        self.runs, self.metas = runs, metas or [{} for _ in runs]
        self.by_key: dict[str, list[CellResult]] = {}
        for run in runs:
            for r in run:
                self.by_key.setdefault(r.config.key(), []).append(r)

    @classmethod
    def of(cls, side: "Side | list[CellResult]", meta: dict | None = None) -> "Side":
        return side if isinstance(side, Side) else cls([side], [meta or {}])

    def samples(self, key: str, metric: str, per_run: bool, better: str | None = None) -> list[float]:
        """per_run False: the per-iteration samples (a run's cell value where it kept none). per_run True: one
        sample per run, its best iteration (`best_of`): it is between runs that a busy machine's noise shows (the
        iterations of one run share what else ran then), and runs are the independent samples."""
        runs = []
        for r in self.by_key[key]:
            v = metric_value(r, metric)
            xs = r.samples.get(metric) or ([v] if v is not None else [])
            runs += [xs] if xs else []
        return [best_of(xs, better) for xs in runs] if per_run else [x for xs in runs for x in xs]

    def ratio_samples(self, key: str, per_run: bool) -> list[float]:
        """The cell's tokens/s over the reference engine's in the same run, which cancels how fast the machine was
        while that run ran: each iteration over the median of the reference's, or (per_run) the run's best
        iteration over the reference's best."""
        out = []
        for run in self.runs:
            cells = {r.config.key(): r for r in run if r.status == "ok"}
            r = cells.get(key)
            ref = cells.get(dataclasses.replace(r.config, engine=REFERENCE_ENGINE, engine_options={}).key()) \
                if r is not None else None
            if r is None or ref is None or r is ref:
                continue
            ref_xs = ref.samples.get(RATIO_OF) or [metric_value(ref, RATIO_OF)]
            xs = r.samples.get(RATIO_OF) or [metric_value(r, RATIO_OF)]
            if None in ref_xs or None in xs or not statistics.median(ref_xs):
                continue
            if per_run:
                out.append(best_of(xs, "higher") / best_of(ref_xs, "higher"))
            else:
                out += [x / statistics.median(ref_xs) for x in xs]
        return out

    def environment(self) -> dict:
        out = dict(self.metas[0].get("environment") or {}) if self.metas else {}
        first = next((r.environment for run in self.runs for r in run if r.environment), None)
        return out | (first or {})


def best_of(xs: list[float], better: str | None) -> float:
    """A run's best iteration: the fastest (least time, most tokens/s). Other work on the machine only ever adds
    time, so on a busy machine it is the iteration least disturbed (tests/test_ci.py's cells under two busy loops on
    2 cores, 40 iterations a run: one cell's tokens/s spread 1.03-1.07x over 5 runs this way, 1.09-1.14x as run
    medians); code made 30% slower makes every iteration slower, the best one too. What it cannot see: a slowdown of a few iterations
    only (a stall now and then), which the per-iteration samples of one run a side still show."""
    return max(xs) if better == "higher" else min(xs) if better == "lower" else statistics.median(xs)


def compare_exact(cell: str, metric: str, rule: Rule, bvals: list, cvals: list) -> Row:
    b = bvals[0]
    changed = [c for c in cvals if c != b] + [x for x in bvals if x != b]
    runs = f" ({len(bvals)} vs {len(cvals)} runs)" if len(bvals) + len(cvals) > 2 else ""
    if not changed:
        return Row(cell, metric, b, cvals[0], "ok", note="exact" + runs, better=rule.better)
    c = next((c for c in cvals if c != b), cvals[0])
    worse = rule.better is None or (c < b if rule.better == "higher" else c > b)
    varies = " and varies between runs of one side" if len(set(map(repr, bvals))) > 1 or \
        len(set(map(repr, cvals))) > 1 else ""
    return Row(cell, metric, b, c, "regression" if worse else "changed", better=rule.better,
               note=rule.why + varies + runs + ("" if worse else "; better, update the baseline"))


def compare_samples(cell: str, metric: str, better: str, xs: list[float], ys: list[float], threshold: float,
                    per_run: bool = False) -> Row:
    """A measured metric: the medians of the samples (one stalled iteration must not move them) past the ratio
    threshold, and called only when Mann-Whitney U says the two sets of samples differ (p < ALPHA)."""
    b, c = statistics.median(xs), statistics.median(ys)
    sd = statistics.stdev(ys) if len(ys) > 1 else None
    row = functools.partial(Row, cell, metric, b, c, better=better, candidate_sd=sd)
    unit = "runs' best iterations" if per_run else "samples"
    of = f"medians of {len(xs)} vs {len(ys)} {unit}; "
    if b == c:
        return row("ok", note=of + "unchanged")
    if b == 0 or c == 0:  # worse > 1: the candidate is worse by that factor
        worse = math.inf if (c == 0) == (better == "higher") else 0.0
    else:
        worse = c / b if better == "lower" else b / c
    if 1 / (1 + threshold) <= worse <= 1 + threshold:
        return row("ok", note=of + f"within {threshold:.0%}")
    verdict = "regression" if worse > 1 else "improvement"
    if len(xs) < MIN_SAMPLES or len(ys) < MIN_SAMPLES:
        return row("not significant", note=f"{verdict} by ratio; not tested: n too small ({len(xs)} vs {len(ys)} "
                                           f"{unit}, need {MIN_SAMPLES} a side)")
    from scipy.stats import mannwhitneyu
    p = float(mannwhitneyu(xs, ys, alternative="two-sided").pvalue)
    if p >= ALPHA:
        return row("not significant", p, note=f"{verdict} by ratio; {of}p={p:.3g}")
    return row(verdict, p, note=f"{of}p={p:.3g}")


def paired_ratios(base: Side, cand: Side, key: str, metric: str) -> list[float]:
    """Runs measured in pairs (`continuous`: run i of each side in one round, iteration j of one side right after
    iteration j of the other, in turns): candidate over base, iteration by iteration. Each pair shares what else the
    machine was doing in that second, so the ratio cancels it."""
    out = []
    for brun, crun in zip(base.runs, cand.runs):
        b = next((r for r in brun if r.config.key() == key), None)
        c = next((r for r in crun if r.config.key() == key), None)
        if b is not None and c is not None:
            out += [y / x for x, y in zip(b.samples.get(metric) or [], c.samples.get(metric) or []) if x > 0 < y]
    return out


def compare_paired(cell: str, metric: str, better: str, xs: list[float], ys: list[float], ratios: list[float],
                   threshold: float) -> Row:
    """A timing of runs measured in pairs: the median of the pairs' candidate/base ratios past the threshold, and
    called only when the Wilcoxon signed-rank test on their logarithms says it is not 1 (p < ALPHA). Shown: the
    medians of each side's iterations. Why (tests/test_ci.py's `.ci/run` under two busy loops on 2 cores, 5 rounds
    and 5 confirmation rounds): the cell made 30% slower was 0.77 and 0.75 of the base as paired medians of 100
    pairs (p < 1e-14), the identical cell 0.997 and 1.001; compared as 5 vs 5 runs' best iterations (Mann-Whitney
    U) the slow cell was flagged in the first pass (p 0.008) and missed in the confirmation (-27%, p 0.22)."""
    b, c = statistics.median(xs), statistics.median(ys)
    row = functools.partial(Row, cell, metric, b, c, better=better,
                            candidate_sd=statistics.stdev(ys) if len(ys) > 1 else None)
    if len(ratios) < MIN_PAIRS:
        return row("not significant", note=f"not tested: n too small ({len(ratios)} iteration pairs, need "
                                           f"{MIN_PAIRS})")
    r = statistics.median(ratios)
    worse = r if better == "lower" else 1 / r
    of = f"median of {len(ratios)} iteration pairs measured in turns, candidate/base {r:.3f}; "
    if 1 / (1 + threshold) <= worse <= 1 + threshold:
        return row("ok", note=of + f"within {threshold:.0%}")
    verdict = "regression" if worse > 1 else "improvement"
    from scipy.stats import wilcoxon
    p = float(wilcoxon([math.log(x) for x in ratios]).pvalue)
    if p >= ALPHA:
        return row("not significant", p, note=f"{verdict} by ratio; {of}Wilcoxon p={p:.3g}")
    return row(verdict, p, note=f"{of}Wilcoxon p={p:.3g}")


def compare_metric(cell: str, metric: str, base: Side, cand: Side, threshold: float, paired: bool = False) -> Row:
    bs, cs = base.by_key[cell], cand.by_key[cell]
    rule = rule_for(metric, bs[0], cs[0])
    bvals, cvals = [metric_value(r, metric) for r in bs], [metric_value(r, metric) for r in cs]
    if rule.how == "left out":
        return Row(cell, metric, bvals[0], cvals[0], "left out", note=rule.why, better=rule.better)
    if None in bvals or None in cvals:
        b_none, c_none = None in bvals, None in cvals
        side = "both" if b_none and c_none else ("baseline" if b_none else "candidate")
        return Row(cell, metric, bvals[0], cvals[0], "absent", note=f"not measured in {side}", better=rule.better)
    if rule.how == "exact":
        return compare_exact(cell, metric, rule, bvals, cvals)
    if paired:
        return compare_paired(cell, metric, rule.better, base.samples(cell, metric, False),
                              cand.samples(cell, metric, False), paired_ratios(base, cand, cell, metric), threshold)
    per_run = max(len(bs), len(cs)) > 1
    return compare_samples(cell, metric, rule.better, base.samples(cell, metric, per_run, rule.better),
                           cand.samples(cell, metric, per_run, rule.better), threshold, per_run)


def compare_ratio(cell: str, base: Side, cand: Side, threshold: float, paired: bool = False) -> Row | None:
    """The cell's tokens/s over the reference engine's in the same runs, baseline against candidate. paired: each
    iteration pair's candidate/base ratio of the cell's tokens/s over the median such ratio of the reference's."""
    per_run = max(len(base.by_key[cell]), len(cand.by_key[cell])) > 1
    xs, ys = base.ratio_samples(cell, per_run), cand.ratio_samples(cell, per_run)
    if not xs or not ys:
        return None
    if not paired:
        return compare_samples(cell, SPEEDUP, "higher", xs, ys, threshold, per_run)
    ref = dataclasses.replace(base.by_key[cell][0].config, engine=REFERENCE_ENGINE, engine_options={}).key()
    ref_ratios = paired_ratios(base, cand, ref, RATIO_OF)
    ratios = [r / statistics.median(ref_ratios) for r in paired_ratios(base, cand, cell, RATIO_OF)] \
        if ref_ratios else []
    return compare_paired(cell, SPEEDUP, "higher", xs, ys, ratios, threshold)


def environment_warnings(base: Side, cand: Side) -> list[str]:
    """One line per environment key whose value differs (torch version, GPU, CPU count, ...)."""
    eb, ec = base.environment(), cand.environment()
    lines = []
    for k in sorted(set(eb) & set(ec) - ENV_IGNORED):
        if eb[k] != ec[k] and not isinstance(eb[k], (dict, list)):
            lines.append(f"warning: environments differ: {k} = {eb[k]!r} in the baseline, {ec[k]!r} in the candidate")
        elif isinstance(eb[k], (dict, list)) and json.dumps(eb[k], sort_keys=True) != json.dumps(ec[k], sort_keys=True):
            lines.append(f"warning: environments differ: {k} differs between baseline and candidate")
    return lines


TIMINGS = ("yes", "no", "only")  # --timings: compare them too, leave them out, compare only them


@dataclass
class Comparison:
    rows: list[Row]
    warnings: list[str]
    only_baseline: list[str]
    only_candidate: list[str]
    timings: str = "yes"
    timing_rows_left_out: int = 0
    paired: bool = False

    @property
    def failed(self) -> bool:
        return any(r.flagged for r in self.rows)


def compare_runs(base: Side | list[CellResult], cand: Side | list[CellResult], threshold: float,
                 metrics: list[str] | None = None, base_meta: dict | None = None,
                 cand_meta: dict | None = None, per_metric: dict[str, float] | None = None,
                 timings: str = "yes", paired: bool = False) -> Comparison:
    """threshold: for every measured metric, unless per_metric names its own. A side is one run (a list of cells)
    or a Side of several runs of one commit. paired: run i of one side was measured in turns with run i of the
    other, iteration by iteration (`continuous`), so timings are compared pair by pair (`compare_paired`; the
    between-engine ratio still run by run). timings: "no" leaves timings and NVML readings out (the baseline was
    measured on another machine or day), "only" compares nothing else (plus the between-engine ratios)."""
    per_metric = per_metric or {}
    base, cand = Side.of(base, base_meta), Side.of(cand, cand_meta)
    metrics = check_metrics(metrics or DEFAULT_METRICS)
    common = [k for k in base.by_key if k in cand.by_key]
    if not common:
        raise BadInput(f"baseline and candidate have no cells in common ({len(base.by_key)} vs {len(cand.by_key)} "
                       "cells; cells match on engine, model, batch size, hardware, workload, lengths and seed)")
    rows, left_out = [], 0
    for key in common:
        bs, cs = base.by_key[key], cand.by_key[key]
        bad_c = next((c for c in cs if c.status != "ok"), None)
        bad_b = next((b for b in bs if b.status != "ok"), None)
        if bad_c is not None and bad_b is None:
            rows.append(Row(key, "status", None, None, "failed",
                            note=f"cell {bad_c.status} in the candidate: {bad_c.error or ''}".strip()))
            continue
        if bad_b is not None:
            rows.append(Row(key, "status", None, None, "skipped", note=f"cell {bad_b.status} in the baseline" + (
                f", {bad_c.status} in the candidate" if bad_c is not None else "")))
            continue
        for m in metrics:
            is_timing = rule_for(m, bs[0], cs[0]).how == "timing"
            if (timings == "no" and is_timing) or (timings == "only" and not is_timing):
                left_out += timings == "no"
                continue
            if m == SPEEDUP:  # without a threshold of its own it takes that of the tokens/s it is made of
                row = compare_ratio(key, base, cand, per_metric.get(m, per_metric.get(RATIO_OF, threshold)), paired)
            else:
                row = compare_metric(key, m, base, cand, per_metric.get(m, threshold), paired and is_timing)
            rows += [row] if row is not None else []
    return Comparison(rows, environment_warnings(base, cand), [k for k in base.by_key if k not in cand.by_key],
                      [k for k in cand.by_key if k not in base.by_key], timings, left_out, paired)


def check_same_cells(label: str, cells: list[CellResult], matrix_label: str, matrix_keys: list[str]) -> None:
    """A baseline recorded from another matrix (other cells) cannot be the reference of this one: bad input."""
    have, want = {r.config.key() for r in cells}, set(matrix_keys)
    if have == want:
        return
    extra, missing = sorted(have - want), sorted(want - have)
    parts = ([f"{len(extra)} of its {len(have)} cells are not in {matrix_label} (e.g. {extra[0]})"] if extra else []) \
        + ([f"{len(missing)} cells of {matrix_label} are not in it (e.g. {missing[0]})"] if missing else [])
    raise BadInput(f"baseline {label} was recorded from another matrix than {matrix_label}: {'; '.join(parts)}; "
                   "record it again from this matrix (results/baselines/README.md says how)")


def parse_threshold(text: str | float) -> float:
    """'10%' or '0.1' -> 0.1."""
    s = str(text).strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise BadInput(f"--threshold {text!r}: not a percentage; give one like 10% (or a fraction like 0.1)") from None
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
    how = []
    if comp.timings != "no" and comp.paired:
        how.append(f"threshold {threshold:.0%} on timings{own}, compared as the median of the candidate/base ratios "
                   f"of iterations measured in turns (base and candidate one after the other), and called only when "
                   f"the Wilcoxon signed-rank test on those gives p < {ALPHA}; `{SPEEDUP}`: tokens/s over "
                   f"{REFERENCE_ENGINE}'s in the same run (shown: a run's best over its best; tested: each pair's "
                   f"ratio over the median pair ratio of {REFERENCE_ENGINE}'s)")
    elif comp.timings != "no":
        how.append(f"threshold {threshold:.0%} on timings{own}, compared as medians of the per-iteration samples "
                   f"(of each run's best iteration where a side has several runs), and called only when "
                   f"Mann-Whitney U on those gives p < {ALPHA}; `{SPEEDUP}`: tokens/s over {REFERENCE_ENGINE}'s in "
                   f"the same run (each iteration over its median; a run's best over its best)")
    if comp.timings != "only":
        how.append("deterministic CPU metrics compared exactly")
    lines += ["", "; ".join(how)]
    if comp.timing_rows_left_out:
        lines.append(f"timings left out ({comp.timing_rows_left_out} rows, --timings no): times and NVML readings are "
                     "compared only between runs of one machine in one job")
    untested = sum("not tested" in r.note for r in comp.rows)
    if untested:
        lines.append(f"timings not tested in {untested} row(s): fewer than {MIN_SAMPLES} samples a side (iterations "
                     f"of one run, or runs), with which Mann-Whitney U cannot reach p < {ALPHA}; measure at least "
                     f"{MIN_SAMPLES} iterations (min_iterations), or at least {MIN_SAMPLES} runs a side")
    lines.append("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                 + (f" ({hidden} absent in both runs, not listed)" if hidden else ""))
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
    return "x" if metric == SPEEDUP else metric_fact(metric).unit


def github_benchmark_json(rows: list[Row]) -> tuple[list[dict], list[dict]]:
    """Entries for github-action-benchmark's custom tools: (customBiggerIsBetter, customSmallerIsBetter), each
    {name, unit, value, range, extra} with value a number and range and extra strings, as that action reads them.
    The candidate's values; metrics with no better direction (counts of the method) are left out."""
    bigger, smaller = [], []
    for r in rows:
        if r.metric == "status" or r.candidate is None or r.better is None or r.status == "left out":
            continue
        entry = {"name": f"{r.cell} {r.metric}", "unit": unit_of(r.metric), "value": float(r.candidate)}
        if r.candidate_sd is not None:
            entry["range"] = f"± {r.candidate_sd:.4g}"
        entry["extra"] = f"baseline {fmt_value(r.baseline)}; {r.status}" + (f"; {r.note}" if r.note else "")
        (smaller if r.better == "lower" else bigger).append(entry)
    return bigger, smaller


def github_json_paths(path: str | Path) -> list[Path]:
    """PATH.bigger.json and PATH.smaller.json, a trailing .json of PATH dropped."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix == ".json" else p
    return [stem.parent / f"{stem.name}.{name}.json" for name in ("bigger", "smaller")]


def write_github_json(path: str | Path, rows: list[Row]) -> list[Path]:
    out = []
    for f, entries in zip(github_json_paths(path), github_benchmark_json(rows)):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(entries, indent=2) + "\n")
        out.append(f)
    return out


def load_side(runs: tuple[str, ...] | list[str]) -> Side:
    return Side([load_run(r) for r in runs], [load_run_meta(r) for r in runs])


# -- command -------------------------------------------------------------------------------------------------


@click.command("regress", help="Compare a candidate run with a baseline run cell by cell; print a Markdown table "
                               "and exit 1 on a regression (2 on bad input).")
@click.option("--baseline", "baselines", required=True, multiple=True, metavar="RUN",
              help="Baseline run directory (results/runs/<id> or results/baselines/<name>) or run id. Repeat for "
                   "several runs of one commit (rounds of one job): each run's best iteration is one sample.")
@click.option("--candidate", "candidates", required=True, multiple=True, metavar="RUN",
              help="Candidate run directory or run id; repeatable like --baseline.")
@click.option("--threshold", "thresholds", multiple=True, default=["10%"], show_default=True, metavar="PCT|METRIC=PCT",
              help="Ratio a timing metric must move by before it can be a regression, e.g. 10% or 0.1; "
                   "METRIC=PCT gives one metric its own (repeatable), e.g. --threshold 50% --threshold ttft_ms=80%.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help=f"Compare only this metric (repeatable). Default: {', '.join(DEFAULT_METRICS)}.")
@click.option("--timings", type=click.Choice(TIMINGS), default="yes", show_default=True,
              help="no: leave timings and NVML readings out (a baseline measured on another machine or day, whose "
                   "times measure that machine); only: compare nothing else.")
@click.option("--matrix", "matrix_file", type=click.Path(dir_okay=False), default=None, metavar="MATRIX.toml",
              help="The matrix the candidate ran; a baseline recorded from another matrix is bad input.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also write github-action-benchmark input: PATH.bigger.json (tool customBiggerIsBetter) and "
                   "PATH.smaller.json (customSmallerIsBetter), a trailing .json of PATH dropped.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the Markdown table to FILE.")
def regress_command(baselines, candidates, thresholds, metrics, timings, matrix_file, json_out, out):
    try:
        thr, per_metric = parse_thresholds(thresholds)
        check_metrics(list(metrics))
        for path in ([out] if out else []) + (github_json_paths(json_out) if json_out else []):
            check_writable(path, make_parents=True)
        base, cand = load_side(baselines), load_side(candidates)
        if matrix_file:
            from harness.matrix import load
            keys = [c.key() for c in load(matrix_file, check_hardware=False).cells]
            for label, run in zip(baselines, base.runs):
                check_same_cells(label, run, matrix_file, keys)
        comp = compare_runs(base, cand, thr, list(metrics) or None, per_metric=per_metric, timings=timings)
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
            for f in write_github_json(json_out, comp.rows):
                click.echo(f"wrote {f}")
    except OSError as exc:  # checked before, so only a fault now (a full disk); the table is printed above
        click.echo(f"error: {exc.filename}: cannot be written ({exc.strerror or exc})", err=True)
        sys.exit(2)
    sys.exit(1 if comp.failed else 0)


if __name__ == "__main__":
    regress_command()
