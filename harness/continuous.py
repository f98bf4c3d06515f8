"""`specmoe-bench continuous`: asv's `continuous` for this harness. The base commit (checked out in a git worktree)
and the candidate (this working tree) run one matrix on the same machine in the same job. Each side keeps its own
cell processes for the whole job (its own code, imported from its own tree), both pinned to the same CPUs, and each
cell runs on both sides at once with its measured iterations in turns (`Turnstile`): base, candidate, base, ...,
one side's iteration running only while the other side's process waits, the side that goes first flipping from
round to round. Two iterations compared are a fraction of a second apart, so a shared machine's slow stretches,
which last seconds, fall on both of them. (Whole runs in turns, 20 s apart, were not enough: on 2 shared cores an
identical cell measured 0.85x in one side's runs, and a candidate made 30% slower was missed in `make test`.)
Timings are compared pair by pair (`regress.compare_paired`: the median candidate/base ratio of the iteration
pairs past the threshold, and the Wilcoxon signed-rank test), never with times taken on another day; the
candidate's counted metrics are compared exactly with a committed baseline.
A timing flagged as a regression is measured again before it fails the job: the cells it was flagged in (with the
reference engine, for the between-engine ratio) run another `--confirm-rounds` rounds, and it stands only when
those rounds flag it too. A pass can flag identical code now and then on a shared machine (before the pairing, the
first check of this job once flagged `nospec` batch 1 at +44% TTFT, p 0.0079, between two commits whose CPU code
was the same); code made 30% slower is flagged in both (tests/test_ci.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from engines.errors import BadInput

from . import regress
from .env import REPO_ROOT
from .results import RunDir, atomic_write_text
from .runner import CellProcess, _child_env, _record_bounds, run_cell, worker_key
from .matrix import only as matrix_only
from .schema import CellConfig, CellResult


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


# Run in each side's tree (its directory and PYTHONPATH): that side's own expansion of the matrix and environment,
# its trained checkpoints made ready, as one line of JSON on stdout.
_SIDE = """
import dataclasses, json, sys
from harness.env import environment
from harness.matrix import load
from harness.runner import prepare_models
m = load(sys.argv[1])
prepare_models(m.cells, progress=False, echo=lambda text: print(text, file=sys.stderr))
print(json.dumps(dict(source=m.source, matrix=m.text, environment=environment(),
                      cells=[dataclasses.asdict(c) for c in m.cells])))
"""


@dataclass
class Tree:
    """One side of the comparison: its source tree and its cells, key -> (the cell as this tool reads it, the
    cell as that tree's own code wrote it, which is what its cell process is sent)."""
    name: str
    path: Path
    meta: dict = field(default_factory=dict)  # source, matrix, environment: for each of its runs' run.json
    cells: dict[str, tuple[CellConfig, dict]] = field(default_factory=dict)
    why_not: str | None = None  # why it cannot be measured, when it cannot


def open_tree(name: str, path: Path, matrix_path: Path, job_dir: Path) -> Tree:
    """The side's cells as its own code expands the matrix (its stderr in job_dir/<name>-setup.log); `why_not` says
    what went wrong when it cannot run them."""
    log = job_dir / f"{name}-setup.log"
    out = subprocess.run([sys.executable, "-c", _SIDE, str(matrix_path)], cwd=path, env=_child_env(path),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    log.write_text(out.stderr)
    tree = Tree(name, path)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["nothing printed"])[-1]
        tree.why_not = f"its code could not expand the matrix ({last}; see {log})"
        return tree
    data = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        tree.cells = {c.key(): (c, raw) for raw in data.pop("cells") for c in [CellConfig(**raw)]}
    except (TypeError, ValueError, BadInput) as exc:
        tree.why_not = f"its cells are not cells of this tool's schema ({exc})"
    tree.meta = data
    return tree


def sides_in_turn(round_no: int, sides: list[Tree]) -> list[Tree]:
    """A B, then B A (A B B A A B ...): whatever drifts through the job (the machine warming, other work starting
    or ending) falls on both sides alike, not on whichever side always runs second."""
    return sides if round_no % 2 else sides[::-1]


def new_run(job_dir: Path, run_id: str, tree: Tree, keys: list[str]) -> RunDir:
    run = RunDir.create(job_dir, run_id)
    cells = [tree.cells[k][1] for k in keys if k in tree.cells]
    run.write_meta(dict(run_id=run_id, source=tree.meta.get("source"), matrix=tree.meta.get("matrix"),
                        command=sys.argv, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        engines=list(dict.fromkeys(c["engine"] for c in cells)),
                        environment=tree.meta.get("environment"), tree=str(tree.path), cells=cells))
    return run


class Turnstile:
    """Turns for the measured iterations of one cell on both sides: granted to one side at a time, alternately (the
    first to `first`), and only while every other side still measuring waits for its own turn: one side's iteration
    never runs beside anything of the other's (its loading, warm-up, other iterations or equivalence check). A side
    whose code does not ask for turns (a base from before them) just runs; the other then waits until it is done."""

    def __init__(self, names: list[str]):
        self.cond = threading.Condition()
        self.active, self.waiting = set(names), set()
        self.last = names[-1]  # so that names[0] goes first

    def wait(self, name: str) -> None:
        with self.cond:
            self.waiting.add(name)
            self.cond.notify_all()
            while not (self.active - {name} <= self.waiting and (self.last != name or self.active == {name})):
                self.cond.wait()
            self.waiting.discard(name)
            self.last = name

    def leave(self, name: str) -> None:
        with self.cond:
            self.active.discard(name)
            self.waiting.discard(name)
            self.cond.notify_all()


def pin(proc: CellProcess, threads: int | None) -> None:
    """Both sides' cell processes on the same CPUs (the last `threads` of this process's), set as each starts, so
    the threads it starts inherit them. Left to the scheduler, the two processes that take turns settled on a CPU
    each, and on a shared 2-core machine one CPU was slower than the other for minutes: the identical `offload`
    cell measured 220-370 tok/s on one side and 370-430 on the other, iteration for iteration. Cells that use
    every CPU (cpu_threads unset, or as many as there are) are not pinned."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if threads and threads < len(cpus):
        with contextlib.suppress(OSError):  # it may have exited already; its cell says why
            os.sched_setaffinity(proc.proc.pid, cpus[-threads:])


class Workers:
    """Each side's cell processes, one per worker key (`runner.worker_key`), kept from cell to cell and round to
    round, so the imports and start-up are paid once per side, outside every measured cell; a cell whose process
    failed gets a new one; `process_per = "cell"` cells get a process of their own each."""

    def __init__(self):
        self.procs: dict[tuple, CellProcess] = {}

    def measure(self, sides: list[Tree], key: str, runs: dict[str, RunDir]) -> dict[str, CellResult]:
        """One cell on every side that has it, at the same time, its measured iterations in turns (`Turnstile`):
        base, candidate, base, candidate, ... each iteration of one side right after the other's, a fraction of a
        second apart. The cell's timeout is per side, so the waits count twice."""
        sides = [t for t in sides if key in t.cells]
        # started here, not in the threads: a cell process dies with the thread that started it (PR_SET_PDEATHSIG)
        procs = {t.name: self._process(t, key) for t in sides}
        gate, results, errors = Turnstile([t.name for t in sides]), {}, []

        def one(tree: Tree) -> None:
            try:
                results[tree.name] = self._one(tree, key, runs[tree.name], procs[tree.name], gate, len(sides))
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                errors.append(exc)
            finally:
                gate.leave(tree.name)

        threads = [threading.Thread(target=one, args=(t,), name=f"continuous-{t.name}") for t in sides]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in sides:
            wkey = worker_key(t.cells[key][0])
            if wkey is None:
                procs[t.name].stop()
            elif results.get(t.name) is None or results[t.name].status == "failed":  # a new process for the next
                procs[t.name].stop()
                self.procs.pop((t.name, wkey), None)
        if errors:
            raise errors[0]
        return results

    def _process(self, tree: Tree, key: str) -> CellProcess:
        cell = tree.cells[key][0]
        wkey = worker_key(cell)
        proc = self.procs.get((tree.name, wkey)) if wkey is not None else None
        if proc is None or not proc.alive:
            proc = CellProcess(wkey, tree.path)
            pin(proc, cell.cpu_threads)
            if wkey is not None:
                self.procs[(tree.name, wkey)] = proc
        return proc

    @staticmethod
    def _one(tree: Tree, key: str, run: RunDir, proc: CellProcess, gate: Turnstile, n_sides: int) -> CellResult:
        cell, raw = tree.cells[key]

        def on_message(msg: dict) -> None:  # in the process's output thread
            if "turn" in msg:
                gate.wait(tree.name)
                proc.jobs.write("go\n")
                proc.jobs.flush()

        return run_cell(cell, run, environment_info=tree.meta.get("environment"), process=proc, config=raw,
                        on_progress=on_message, turns=True, timeout_s=cell.timeout_s * n_sides)

    def close(self, kill: bool = False) -> None:
        for proc in self.procs.values():
            proc.kill() if kill else proc.stop()
        self.procs.clear()


def measure_rounds(rounds: int, sides: list[Tree], keys: list[str], job_dir: Path, echo, label: str = "") \
        -> dict[str, list[str]]:
    """`rounds` runs of each side's cells `keys`, one cell at a time on both sides, its iterations in turns
    (`Workers.measure`), the side that goes first alternating from round to round. The run directories of each
    side."""
    runs: dict[str, list[str]] = {t.name: [] for t in sides}
    workers = Workers()
    try:
        for r in range(1, rounds + 1):
            order, t0 = sides_in_turn(r, sides), time.perf_counter()
            made = {t.name: new_run(job_dir, "-".join(([label] if label else []) + [t.name, str(r)]), t, keys)
                    for t in order}
            for key in keys:
                workers.measure(order, key, made)
            for t in order:
                _record_bounds(made[t.name])
                runs[t.name].append(str(made[t.name].path))
            echo(f"{label + ' ' if label else ''}round {r}/{rounds}: {len(keys)} cells, iterations in turns, "
                 f"{' first, then '.join(t.name for t in order) if len(order) > 1 else order[0].name + ' only'}, "
                 f"in {time.perf_counter() - t0:.0f} s ({', '.join(str(made[t.name].path) for t in order)})")
    except BaseException:
        workers.close(kill=True)
        raise
    workers.close()
    return runs


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
        cand = open_tree("candidate", REPO_ROOT, matrix_path, job_dir)
        if cand.why_not:
            raise BadInput(f"the candidate cannot run {matrix_file}: {cand.why_not}")
        base_tree = open_tree("base", worktree, matrix_path, job_dir)
        keys = list(cand.cells)
        if base_tree.why_not:
            echo(f"the base {sha[:10]} cannot run {matrix_file}: {base_tree.why_not}; measuring the candidate only")
            runs = measure_rounds(1, [cand], keys, job_dir, echo)
            return report(runs, None, baseline, thr, per_metric, job_dir, sha, echo, why_not=base_tree.why_not)
        runs = measure_rounds(rounds, [base_tree, cand], keys, job_dir, echo)
        timings, confirm = compare_timings(runs, thr, per_metric), None
        suspects = {(r.cell, r.metric) for r in timings.rows if r.status == "regression"} if timings else set()
        if suspects and confirm_rounds > 0:
            only = only_specs(regress.load_side(runs["candidate"]), {cell for cell, _ in suspects},
                              {c.engine for c in m.cells})
            again = [c.key() for c in matrix_only([cand.cells[k][0] for k in keys], only)]
            echo(f"{len(suspects)} timing(s) flagged: measuring {' '.join('--only ' + o for o in only)} "
                 f"({len(again)} cells) again, "
                 f"{confirm_rounds} more rounds in turns; a timing fails only if these rounds flag it too")
            confirm = measure_rounds(confirm_rounds, [base_tree, cand], again, job_dir, echo, "confirm")
    finally:
        git("worktree", "remove", "--force", str(worktree))
        shutil.rmtree(worktree, ignore_errors=True)
        git("worktree", "prune")
    return report(runs, timings, baseline, thr, per_metric, job_dir, sha, echo, confirm)


def compare_timings(runs: dict[str, list[str]], thr: float, per_metric: dict) -> regress.Comparison | None:
    if not runs["base"] or not runs["candidate"]:
        return None
    return regress.compare_runs(regress.load_side(runs["base"]), regress.load_side(runs["candidate"]), thr,
                                per_metric=per_metric, timings="only", paired=True)


def only_specs(cand: regress.Side, cells: set[str], engines: set[str]) -> list[str]:
    """`run --only` specs (AXIS=V1,V2) covering these cells, and the reference engine's cells beside them (the
    between-engine ratio needs them in the same runs); the product of the axes may hold a few more cells."""
    configs = [cand.by_key[c][0].config for c in sorted(cells)]
    axes = {"engine": {c.engine for c in configs} | ({regress.REFERENCE_ENGINE} & engines),
            "model": {c.model for c in configs}, "batch_size": {str(c.batch_size) for c in configs},
            "hardware": {c.hardware for c in configs}}
    return [f"{axis}={','.join(sorted(values))}" for axis, values in axes.items()]


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
           per_metric: dict, job_dir: Path, sha: str, echo, confirm: dict[str, list[str]] | None = None,
           why_not: str | None = None) -> int:
    """Counts of the candidate against the committed baseline, exactly; timings of the candidate against the base
    (`timings`, compare_timings of `runs`; None where the base did not run, `why_not` says why)."""
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
        rows, failed = rows + timings.rows, failed or timings.failed
    else:
        sections.append(f"## Timings not compared\n\nthe base {sha[:10]} could not run the matrix: "
                        f"{why_not}, so there is nothing measured in this job to compare them with\n")
    text = "\n".join(sections)
    atomic_write_text(job_dir / "regress.md", text)
    written = regress.write_github_json(job_dir / "github-benchmark.json", rows)
    echo(text, nl=False)
    echo(f"wrote {job_dir / 'regress.md'}, {written[0]} and {written[1]}")
    echo(f"continuous: {'REGRESSION' if failed else 'no regression'}")
    return 1 if failed else 0


@click.command("continuous", help="Measure the base commit and this working tree on MATRIX, iteration by iteration "
                                  "in turns, "
                                  "compare their timings with each other and the candidate's counted metrics with "
                                  "a baseline run; exit 1 on a regression, 2 on bad input.")
@click.argument("matrix_file", metavar="MATRIX.toml")
@click.option("--base", default="HEAD^", show_default=True, metavar="REF",
              help="The commit to compare with (checked out in a temporary git worktree).")
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Runs of each side; in each round a cell's iterations alternate between the sides, and each "
                   "pair of iterations is one sample (at least 6 pairs to be tested).")
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
