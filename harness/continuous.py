"""`specmoe-bench continuous`: asv's `continuous` for this harness. The base commit (checked out in a git worktree)
and the candidate (this working tree) run one matrix in turns, A B B A A B ..., on the same machine in the same job;
their timings are compared with each other (each run's best iteration one sample, ratio threshold and Mann-Whitney
U), never with times taken on another day, and the candidate's counted metrics are compared exactly with a committed
baseline.
A timing flagged as a regression is measured again before it fails the job: the cells it was flagged in (with the
reference engine, for the between-engine ratio) run another `--confirm-rounds` rounds in turns, and it stands only
when those rounds flag it too. Identical code can separate 5 runs to 5 now and then on a shared machine (a slow
phase, a different core): the first check of this job once flagged `nospec` batch 1 at +44% TTFT, p 0.0079, between
two commits whose CPU code was the same. Were the runs exchangeable, one pass would flag a timing of identical code
with probability at most 0.05 and two passes at most 0.0025; a shared machine's slow stretches are not
exchangeable, which is why one pass is not enough. Code made 30% slower is flagged in both.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from engines.errors import BadInput

from . import regress
from .env import REPO_ROOT
from .results import atomic_write_text


def git(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def resolve_base(ref: str) -> str:
    """The commit a ref names; BadInput when it names none (a typo, or a shallow clone without the parent)."""
    out = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if out.returncode != 0:
        hint = " (a shallow clone? fetch at least 2 commits, or give --base REF)" if ref.startswith("HEAD") else ""
        raise BadInput(f"--base {ref!r}: no such commit in {REPO_ROOT}{hint}")
    return out.stdout.strip()


def check_inputs(matrix_file: str, base: str, rounds: int, thresholds: tuple[str, ...], baseline: str | None):
    """Everything that can be wrong with the command line, found before anything is measured."""
    from .matrix import load
    if rounds < 1:
        raise BadInput(f"--rounds {rounds}: measure each side at least once (4 or more for a significance test)")
    m = load(matrix_file)
    sha = resolve_base(base)
    thr = regress.parse_thresholds(thresholds)
    if baseline:
        regress.check_same_cells(baseline, regress.load_run(baseline), matrix_file, [c.key() for c in m.cells])
    return m, sha, thr


def measure(tree: Path, matrix_file: Path, run_id: str, job_dir: Path, only: tuple[str, ...] = ()) \
        -> tuple[bool, float]:
    """One run of the matrix with the code of `tree` (its harness, engines and workloads imported from there);
    `only`: `run --only` arguments that narrow it to some cells."""
    t0 = time.perf_counter()
    with open(job_dir / f"{run_id}.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(matrix_file), "--run-id", run_id,
                             "--results-dir", str(job_dir), "--quiet", *only], cwd=tree, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL).returncode
    # exit 1: a cell failed, and its failure is in its cell file, which `regress` reports; other codes: no run
    return rc in (0, 1) and (job_dir / run_id / "cells").is_dir(), time.perf_counter() - t0


def sides_in_turn(round_no: int, worktree: Path) -> list[tuple[str, Path]]:
    """A B, then B A (A B B A A B ...): whatever drifts through the job (the machine warming, other work starting
    or ending) falls on both sides alike, not on whichever side always runs second."""
    order = [("base", worktree), ("candidate", REPO_ROOT)]
    return order if round_no % 2 else order[::-1]


def run_continuous(matrix_file: str, base: str, rounds: int, thresholds: tuple[str, ...], baseline: str | None,
                   job_dir: Path, echo=click.echo, confirm_rounds: int | None = None) -> int:
    m, sha, (thr, per_metric) = check_inputs(matrix_file, base, rounds, thresholds, baseline)
    confirm_rounds = rounds if confirm_rounds is None else confirm_rounds
    matrix_path, job_dir = Path(matrix_file).resolve(), job_dir.resolve()  # the base runs from another directory
    job_dir.mkdir(parents=True, exist_ok=True)
    worktree = Path(tempfile.mkdtemp(prefix="specmoe-base-"))
    echo(f"base {base} = {sha[:10]} in a worktree at {worktree}; candidate: the working tree {REPO_ROOT}")
    try:
        out = git("worktree", "add", "--detach", "--force", str(worktree), sha)
        if out.returncode != 0:
            raise BadInput(f"--base {base!r}: git worktree add failed: {out.stderr.strip()}")
        runs = measure_rounds(rounds, worktree, matrix_path, job_dir, echo)
        timings, confirm = compare_timings(runs, thr, per_metric), None
        suspects = {(r.cell, r.metric) for r in timings.rows if r.status == "regression"} if timings else set()
        if suspects and confirm_rounds > 0:
            only = only_args(regress.load_side(runs["candidate"]), {cell for cell, _ in suspects},
                             {c.engine for c in m.cells})
            echo(f"{len(suspects)} timing(s) flagged: measuring {' '.join(only)} again, {confirm_rounds} more rounds "
                 "in turns; a timing fails only if these rounds flag it too")
            confirm = measure_rounds(confirm_rounds, worktree, matrix_path, job_dir, echo, "confirm", only)
    finally:
        git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(worktree, ignore_errors=True)
        git("worktree", "prune")
    return report(runs, timings, baseline, thr, per_metric, job_dir, sha, echo, confirm)


def measure_rounds(rounds: int, worktree: Path, matrix_path: Path, job_dir: Path, echo, label: str = "",
                   only: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """`rounds` runs of each side in turns; the run directories of each side that ran."""
    runs: dict[str, list[str]] = {"base": [], "candidate": []}
    for r in range(1, rounds + 1):
        for side, tree in sides_in_turn(r, worktree):
            run_id = "-".join([label, side, str(r)] if label else [side, str(r)])
            ok, wall = measure(tree, matrix_path, run_id, job_dir, only)
            echo(f"{label + ' ' if label else ''}round {r}/{rounds}: {side} {'measured' if ok else 'FAILED to run'} in {wall:.0f} s "
                 f"({job_dir / run_id})")
            if ok:
                runs[side].append(str(job_dir / run_id))
    return runs


def compare_timings(runs: dict[str, list[str]], thr: float, per_metric: dict) -> regress.Comparison | None:
    if not runs["base"] or not runs["candidate"]:
        return None
    return regress.compare_runs(regress.load_side(runs["base"]), regress.load_side(runs["candidate"]), thr,
                                per_metric=per_metric, timings="only")


def only_args(cand: regress.Side, cells: set[str], engines: set[str]) -> tuple[str, ...]:
    """`run --only` arguments covering these cells, and the reference engine's cells beside them (the
    between-engine ratio needs them in the same runs); the product of the axes may hold a few more cells."""
    configs = [cand.by_key[c][0].config for c in sorted(cells)]
    axes = {"engine": {c.engine for c in configs} | ({regress.REFERENCE_ENGINE} & engines),
            "model": {c.model for c in configs}, "batch_size": {str(c.batch_size) for c in configs},
            "hardware": {c.hardware for c in configs}}
    return tuple(arg for axis, values in axes.items() for arg in ("--only", f"{axis}={','.join(sorted(values))}"))


def confirmed(first: regress.Comparison, again: regress.Comparison, rounds: int) -> None:
    """A first-pass timing regression stands only where the confirmation rounds flag it too; the others become
    `not confirmed` (not flagged), with both passes' notes."""
    seen = {(r.cell, r.metric): r for r in again.rows}
    for row in first.rows:
        if row.status != "regression":
            continue
        later = seen.get((row.cell, row.metric))
        if later is not None and later.status == "regression":
            row.note += f"; confirmed by {rounds} more rounds: {later.note}"
        else:
            row.status = "not confirmed"
            again_says = f"{later.status} ({later.note})" if later is not None else "not measured again"
            row.note += f"; {rounds} more rounds of this cell: {again_says}: a one-off of this machine, not the code"


def report(runs: dict[str, list[str]], timings: regress.Comparison | None, baseline: str | None, thr: float,
           per_metric: dict, job_dir: Path, sha: str, echo, confirm: dict[str, list[str]] | None = None) -> int:
    """Counts of the candidate against the committed baseline, exactly; timings of the candidate against the base
    (`timings`, compare_timings of `runs`; None where the base did not run)."""
    if not runs["candidate"]:
        raise BadInput(f"the candidate could not run the matrix at all: see {job_dir}/candidate-1.log")
    cand = regress.load_side(runs["candidate"])
    sections, rows, failed = [], [], False
    if baseline:
        comp = regress.compare_runs(regress.load_side([baseline]), cand, thr, per_metric=per_metric, timings="no")
        sections.append(f"## Counted metrics of the candidate against the committed baseline {baseline}\n\n"
                        + regress.render_markdown(comp, thr, per_metric))
        rows, failed = rows + comp.rows, failed or comp.failed
    if timings is not None:
        again = compare_timings(confirm, thr, per_metric) if confirm is not None else None
        if again is not None:
            confirmed(timings, again, len(confirm["candidate"]))
        sections.append(f"## Timings of the candidate against the base {sha[:10]}, measured in turns in this job "
                        f"({len(runs['base'])} vs {len(runs['candidate'])} runs)\n\n"
                        + regress.render_markdown(timings, thr, per_metric))
        if again is not None:
            sections.append(f"## The flagged timings measured again ({len(confirm['base'])} vs "
                            f"{len(confirm['candidate'])} runs of their cells); a timing fails only if both passes "
                            f"flag it\n\n" + regress.render_markdown(again, thr, per_metric))
        elif confirm is not None:
            sections.append("## The flagged timings measured again\n\nthe confirmation rounds did not run "
                            f"(see {job_dir}/confirm-base-1.log), so the first pass's flags stand\n")
        rows, failed = rows + timings.rows, failed or timings.failed
    else:
        sections.append(f"## Timings not compared\n\nthe base {sha[:10]} could not run the matrix "
                        f"(see {job_dir}/base-1.log), so there is nothing measured in this job to compare them with\n")
    text = "\n".join(sections)
    atomic_write_text(job_dir / "regress.md", text)
    written = regress.write_github_json(job_dir / "github-benchmark.json", rows)
    echo(text, nl=False)
    echo(f"wrote {job_dir / 'regress.md'}, {written[0]} and {written[1]}")
    echo(f"continuous: {'REGRESSION' if failed else 'no regression'}")
    return 1 if failed else 0


@click.command("continuous", help="Measure the base commit and this working tree on MATRIX in turns (A B A B), "
                                  "compare their timings with each other and the candidate's counted metrics with "
                                  "a baseline run; exit 1 on a regression, 2 on bad input.")
@click.argument("matrix_file", metavar="MATRIX.toml")
@click.option("--base", default="HEAD^", show_default=True, metavar="REF",
              help="The commit to compare with (checked out in a temporary git worktree).")
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Runs of each side, in turns (A B B A ...); each run's best iteration is one sample (at least 4 "
                   "to be tested).")
@click.option("--confirm-rounds", type=int, default=None, metavar="N",
              help="Rounds that measure the cells of flagged timings again; a timing fails only if they flag it too "
                   "(default: as many as --rounds; 0: the first pass decides).")
@click.option("--threshold", "thresholds", multiple=True, default=["10%"], show_default=True,
              metavar="PCT|METRIC=PCT", help="As for `regress`.")
@click.option("--baseline", default=None, metavar="RUN_DIR",
              help="A committed run of the same matrix (results/baselines/cpu) whose counted metrics the candidate "
                   "must match; its timings are not used.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where the runs and the report go. Default: results/runs/continuous-<base>-<time>.")
@click.option("--check-only", is_flag=True, help="Check the command line (matrix, base, thresholds, baseline) "
                                                 "and exit.")
def continuous_command(matrix_file, base, rounds, confirm_rounds, thresholds, baseline, out_dir, check_only):
    try:
        if confirm_rounds is not None and confirm_rounds < 0:
            raise BadInput(f"--confirm-rounds {confirm_rounds}: give 0 (no confirmation) or more")
        if check_only:
            check_inputs(matrix_file, base, rounds, thresholds, baseline)
            return
        job = out_dir or REPO_ROOT / "results" / "runs" / time.strftime("continuous-%Y%m%dT%H%M%S")
        sys.exit(run_continuous(matrix_file, base, rounds, thresholds, baseline, job,
                                confirm_rounds=confirm_rounds))
    except BadInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    continuous_command()
