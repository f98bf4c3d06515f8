"""`specmoe-bench regress`: what it flags, what it lets through, and its one-line errors (exit 2)."""
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import regress
from harness.regress import compare_runs, load_run, regress_command
from harness.schema import CellConfig, CellResult, Metrics

ENV = {"torch": "2.13.0+cpu", "cpu_count": 2, "gpu": None, "hostname": "a"}


def make_cell(engine="offload", batch=4, tps=100.0, bytes_per_token=4096.0, hardware="cpu", n=6, noise=0.03,
              seed=0, model="tiny-mixtral-random", equivalent=True, status="ok", options=None, **metrics) -> CellResult:
    """A cell whose tokens_per_s samples scatter by `noise` around `tps` (like a run on a busy machine)."""
    rng = random.Random(f"{engine}/{batch}/{seed}")
    samples = [tps * (1 + rng.uniform(-noise, noise)) for _ in range(n)]
    m = Metrics(**dict(dict(tokens_per_s=sum(samples) / n, h2d_bytes_per_token=bytes_per_token, expert_hit_rate=0.25,
                            tokens_per_step=1.0, equivalent=equivalent, exact_match_rate=1.0 if equivalent else 0.5,
                            iterations=n), **metrics))
    return CellResult(config=CellConfig(engine=engine, model=model, batch_size=batch, hardware=hardware,
                                        engine_options=options or {}),
                      status=status, valid=status == "ok", metrics=m if status == "ok" else Metrics(),
                      samples={"tokens_per_s": samples} if status == "ok" else {},
                      error=None if status == "ok" else "RuntimeError: boom", environment=dict(ENV))


def write_run(root: Path, name: str, cells: list[CellResult], environment=None) -> Path:
    run = root / name
    (run / "cells").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": name, "environment": environment or {}}))
    for c in cells:
        (run / "cells" / f"{c.config.key()}.json").write_text(json.dumps(c.to_dict()))
    return run


def matrix(seed, slow_engine=None, slowdown=0.0, bytes_change=None, spec_options=None, **kw):
    """offload, lru and specmoe (its options `spec_options`: adaptive by default) at batch 1 and 4."""
    cells = []
    for engine in ("offload", "lru", "specmoe"):
        for batch in (1, 4):
            tps = {"offload": 100.0, "lru": 150.0, "specmoe": 220.0}[engine] * batch ** 0.5
            if engine == slow_engine:
                tps *= 1 - slowdown
            bpt = 4096.0 if not (bytes_change and engine == bytes_change[0]) else bytes_change[1]
            cells.append(make_cell(engine, batch, tps, bpt, seed=seed,
                                   options=spec_options if engine == "specmoe" else None, **kw))
    return cells


def run_cli(*args):
    return CliRunner().invoke(regress_command, list(map(str, args)))


def test_repeated_runs_of_same_commit_not_flagged(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2))
    res = run_cli("--baseline", base, "--candidate", cand, "--threshold", "10%")
    assert res.exit_code == 0, res.output
    assert "result: no regression" in res.output
    assert "**regression**" not in res.output


def test_injected_30pct_slowdown_in_one_engine_is_flagged(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, slow_engine="lru", slowdown=0.30))
    res = run_cli("--baseline", base, "--candidate", cand, "--threshold", "25%")
    assert res.exit_code == 1, res.output
    flagged = [line for line in res.output.splitlines() if "**regression**" in line]
    # lru at batch 1 and 4, its tokens/s and its speedup over offload in the same run; nothing else
    assert sorted(line.split("|")[2].strip() for line in flagged) == ["speedup_over_offload"] * 2 + ["tokens_per_s"] * 2
    assert all(line.startswith("| lru-") for line in flagged)
    changes = [float(line.split("|")[5].strip().rstrip("%")) for line in flagged]
    assert all(-34 < ch < -26 for ch in changes), changes  # 30% slower, give or take the 3% noise


def test_a_metric_can_have_its_own_threshold(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, slow_engine="lru", slowdown=0.30))
    res = run_cli("--baseline", base, "--candidate", cand, "--threshold", "25%", "--threshold", "tokens_per_s=60%")
    assert res.exit_code == 0, res.output
    assert "threshold 25% on timings, tokens_per_s 60%" in res.output
    line = one_error_line(run_cli("--baseline", base, "--candidate", cand, "--threshold", "tokens_per_sec=60%"))
    assert "unknown metric 'tokens_per_sec'" in line


def test_change_in_bytes_per_token_is_flagged_exactly(tmp_path):
    fixed = {"adaptive": False, "gamma": 4}  # as in the CI matrix: with choices made by timings the bytes vary
    base = write_run(tmp_path, "base-fixed", matrix(seed=1, spec_options=fixed))
    cand = write_run(tmp_path, "cand", matrix(seed=2, bytes_change=("specmoe", 4097.0), spec_options=fixed))
    res = run_cli("--baseline", base, "--candidate", cand)
    assert res.exit_code == 1, res.output
    flagged = [line for line in res.output.splitlines() if "**regression**" in line]
    assert len(flagged) == 2 and all("h2d_bytes_per_token" in line and "| specmoe[" in line for line in flagged)
    assert "deterministic" in flagged[0]


def test_fewer_bytes_per_token_is_flagged_as_changed():
    comp = compare_runs(matrix(1), matrix(2, bytes_change=("offload", 1024.0)), 0.1)
    rows = [r for r in comp.rows if r.metric == "h2d_bytes_per_token" and r.cell.startswith("offload")]
    assert {r.status for r in rows} == {"changed"} and comp.failed


def test_bytes_per_token_on_gpu_uses_the_threshold():
    comp = compare_runs(matrix(1, hardware="cuda"), matrix(2, hardware="cuda", bytes_change=("lru", 4100.0)), 0.1)
    rows = [r for r in comp.rows if r.metric == "h2d_bytes_per_token" and not r.cell.startswith("specmoe")]
    assert len(rows) == 4 and all(r.status == "ok" for r in rows) and not comp.failed


def test_slowdown_with_too_few_samples_is_not_significant():
    comp = compare_runs(matrix(1, n=3), matrix(2, n=3, slow_engine="offload", slowdown=0.5), 0.1)
    rows = [r for r in comp.rows if r.metric == "tokens_per_s" and r.cell.startswith("offload")]
    assert {r.status for r in rows} == {"not significant"}
    assert "n too small" in rows[0].note
    assert not comp.failed


def test_ratio_past_threshold_but_overlapping_samples_is_not_significant():
    base, cand = make_cell(seed=1, n=5), make_cell(seed=2, n=5)
    base.samples["tokens_per_s"] = [100.0, 60.0, 140.0, 95.0, 105.0]
    cand.samples["tokens_per_s"] = [80.0, 130.0, 50.0, 90.0, 70.0]
    base.metrics.tokens_per_s, cand.metrics.tokens_per_s = 100.0, 84.0
    row = compare_runs([base], [cand], 0.1, metrics=["tokens_per_s"]).rows[0]
    assert row.status == "not significant" and row.p_value > 0.05 and "regression by ratio" in row.note


def test_equivalence_lost_is_a_regression():
    comp = compare_runs(matrix(1), matrix(2)[:-1] + [make_cell("specmoe", 4, 440, seed=2, equivalent=False)], 0.1)
    bad = {(r.cell.split("-")[0], r.metric) for r in comp.rows if r.flagged}
    assert bad == {("specmoe", "equivalent"), ("specmoe", "exact_match_rate")}


def test_absent_metric_is_reported_absent_not_regression():
    base = [make_cell(acceptance_rate=None)]
    cand = [make_cell(seed=2, acceptance_rate=0.8)]
    comp = compare_runs(base, cand, 0.1, metrics=["acceptance_rate", "ttft_ms"])
    assert [r.status for r in comp.rows] == ["absent", "absent"]
    assert "not measured in baseline" in comp.rows[0].note and not comp.failed


def test_energy_per_token_from_nvml_has_no_samples_so_is_not_significant():
    base, cand = [make_cell(seed=1, hardware="cuda")], [make_cell(seed=2, hardware="cuda")]
    base[0].metrics.nvml, cand[0].metrics.nvml = {"joules_per_token": 0.5}, {"joules_per_token": 0.9}
    row = compare_runs(base, cand, 0.1, metrics=["nvml.joules_per_token"]).rows[0]
    assert (row.baseline, row.candidate, row.status) == (0.5, 0.9, "not significant") and "n too small" in row.note


def test_cell_failing_in_candidate_is_flagged():
    comp = compare_runs([make_cell()], [make_cell(status="failed")], 0.1)
    assert comp.rows[0].status == "failed" and "boom" in comp.rows[0].note and comp.failed


def test_environment_difference_warns(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cells = matrix(seed=2)
    for c in cells:
        c.environment.update(torch="2.11.0+cu130", hostname="b")
    cand = write_run(tmp_path, "cand", cells)
    res = run_cli("--baseline", base, "--candidate", cand)
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: environments differ: torch = '2.13.0+cpu' in the baseline, "
                        "'2.11.0+cu130' in the candidate"]


def check_github_action_benchmark(entries: list) -> None:
    """What benchmark-action/github-action-benchmark's custom tools read (its BenchmarkResult): a list of objects
    with name (string, unique: the action keys its charts by it), unit (string) and value (a number, not a
    boolean), and optionally range and extra, both strings; nothing else."""
    assert isinstance(entries, list)
    for e in entries:
        assert isinstance(e, dict) and {"name", "unit", "value"} <= set(e) <= {"name", "unit", "value", "range",
                                                                               "extra"}, e
        assert isinstance(e["name"], str) and isinstance(e["unit"], str) and e["unit"], e
        assert isinstance(e["value"], (int, float)) and not isinstance(e["value"], bool), e
        assert all(isinstance(e[k], str) for k in ("range", "extra") if k in e), e
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names))


def test_github_action_benchmark_json(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, slow_engine="lru", slowdown=0.3))
    res = run_cli("--baseline", base, "--candidate", cand, "--json-out", tmp_path / "gh.json")
    assert res.exit_code == 1, res.output
    raw = {k: (tmp_path / f"gh.{k}.json").read_text() for k in ("bigger", "smaller")}
    bigger, smaller = json.loads(raw["bigger"]), json.loads(raw["smaller"])
    check_github_action_benchmark(bigger)
    check_github_action_benchmark(smaller)
    tps = {e["name"].split()[0]: e for e in bigger if e["name"].endswith(" tokens_per_s")}
    assert len(tps) == 6 and all(e["unit"] == "tokens/s" and e["value"] > 0 and e["range"].startswith("± ")
                                 for e in tps.values())
    lru = next(e for k, e in tps.items() if k.startswith("lru-") and "-b4-" in k)
    assert "regression" in lru["extra"] and lru["extra"].startswith("baseline ")
    assert {e["unit"] for e in bigger if e["name"].endswith(" speedup_over_offload")} == {"x"}
    assert {e["name"].split()[-1] for e in smaller} == {"h2d_bytes_per_token"}  # lower is better: bytes
    assert all(not e["name"].endswith((" equivalent", " status")) or e["unit"] == "bool" for e in bigger)
    assert "NaN" not in raw["bigger"] + raw["smaller"]


def test_adaptive_specmoe_counts_are_left_out_with_the_reason_and_its_tokens_still_compared(tmp_path):
    """adaptive on/off follows measured tokens/s, so two runs of one commit differ in bytes and tokens per step."""
    adaptive = {"options": {}}  # the default: adaptive on
    base = [make_cell("specmoe", b, 200, 4096.0, seed=1, tokens_per_step=1.3, **adaptive) for b in (1, 4)]
    cand = [make_cell("specmoe", b, 200, 4500.0, seed=2, tokens_per_step=1.1, **adaptive) for b in (1, 4)]
    cand[1].metrics.equivalent, cand[1].metrics.exact_match_rate = False, 0.5
    comp = compare_runs(base, cand, 0.1)
    by = {(next(p for p in r.cell.split("-") if p[0] == "b"), r.metric): r for r in comp.rows}
    for b in ("b1", "b4"):
        for m in ("h2d_bytes_per_token", "tokens_per_step", "expert_hit_rate"):
            assert by[b, m].status == "left out" and "adaptive=True" in by[b, m].note, by[b, m]
    assert by["b1", "equivalent"].status == "ok" and by["b4", "equivalent"].status == "regression"
    text = run_cli("--baseline", write_run(tmp_path, "b", base), "--candidate", write_run(tmp_path, "c", cand)).output
    assert "| left out | left out: specmoe adaptive=True (speculation is switched on or off by measured" in text


def test_a_draft_length_chosen_by_timings_leaves_its_counts_out_too():
    """gamma = auto (the default) chooses the draft length from measured step times, so with adaptive off the bytes
    still follow the timing noise; a fixed gamma is compared exactly."""
    for gamma, status in (("auto", "left out"), (4, "regression")):
        options = {"adaptive": False, "gamma": gamma}
        base = [make_cell("specmoe", 1, 200, 4096.0, seed=1, options=options)]
        cand = [make_cell("specmoe", 1, 200, 4500.0, seed=2, options=options)]
        row = next(r for r in compare_runs(base, cand, 0.1).rows if r.metric == "h2d_bytes_per_token")
        assert row.status == status, row
        assert ("gamma=auto" in row.note) == (gamma == "auto"), row


def test_runs_of_one_side_are_pooled_and_a_count_that_varies_between_them_is_flagged(tmp_path):
    """Several runs a side (rounds of one job): each run's best iteration is one sample, as the iterations of one
    run share its machine state; a run slowed by something else running is outvoted by the others."""
    base = [write_run(tmp_path, f"b{i}", matrix(seed=10 + i)) for i in range(5)]
    cand = [write_run(tmp_path, f"c{i}", matrix(seed=20 + i, slow_engine="offload", slowdown=0.3, n=2))
            for i in range(5)]
    busy = matrix(seed=30, slow_engine="offload", slowdown=0.3)  # the same code, in a run where lru ran slower too
    for c in busy[2:4]:
        c.samples["tokens_per_s"] = [x / 2 for x in c.samples["tokens_per_s"]]
        c.metrics.tokens_per_s /= 2
    cand.append(write_run(tmp_path, "c-busy", busy))
    args = [a for b in base for a in ("--baseline", b)] + [a for c in cand for a in ("--candidate", c)]
    res = run_cli(*args, "--threshold", "20%", "--timings", "only")
    assert res.exit_code == 1, res.output
    flagged = [line for line in res.output.splitlines() if "**regression**" in line]
    assert {line.split("|")[2].strip() for line in flagged} == {"tokens_per_s"}
    assert len(flagged) == 2 and all(line.startswith("| offload-") and "medians of 5 vs 6 runs' best iterations" in line
                                     for line in flagged)  # offload slower in every run; lru in one only
    assert "h2d_bytes_per_token" not in res.output  # --timings only
    res = run_cli(*args[:2], *args[10:12], "--timings", "only")  # one run a side: per-iteration samples
    assert "medians of 6 vs 2 samples" in res.output
    varying = matrix(seed=21)
    varying[0].metrics.h2d_bytes_per_token = 4000.0
    cand[1] = write_run(tmp_path, "c1-varies", varying)
    res = run_cli("--baseline", base[0], *[a for c in cand for a in ("--candidate", c)], "--timings", "no")
    flagged = [line for line in res.output.splitlines() if "**" in line]
    assert res.exit_code == 1 and len(flagged) == 1 and "varies between runs of one side (1 vs 6 runs)" in flagged[0]


def test_other_work_slowing_most_iterations_of_every_candidate_run_is_no_regression_but_slower_code_is(tmp_path):
    """What a busy machine does to a run: some of its iterations share a core with other work and take up to twice
    as long; load only adds time, so each run's best iteration still shows the code's speed. Here 70% of the
    iterations of every candidate run took 1.6-2x as long: their run medians are 40% lower, their best iterations
    are not. Code made 30% slower in every iteration is still caught, cell and metric named."""
    def runs(prefix, seed, disturbed, slowdown=0.0):
        out = []
        for i in range(5):
            cells = matrix(seed=seed + i, n=10, slow_engine="lru", slowdown=slowdown)
            for c in cells if disturbed else []:
                xs = c.samples["tokens_per_s"]
                c.samples["tokens_per_s"] = [x / (1.6 + 0.4 * (j % 2)) if j % 10 >= 3 else x for j, x in enumerate(xs)]
            out.append(write_run(tmp_path, f"{prefix}{i}", cells))
        return out

    base = [a for r in runs("b", 10, disturbed=False) for a in ("--baseline", r)]
    busy = [a for r in runs("c", 20, disturbed=True) for a in ("--candidate", r)]
    res = run_cli(*base, *busy, "--threshold", "15%", "--timings", "only")
    assert res.exit_code == 0, res.output
    offload = next(line for line in res.output.splitlines() if line.startswith("| offload-") and "| tokens_per_s |" in line)
    assert "| ok |" in offload and "within 15%" in offload, offload
    slower = [a for r in runs("s", 30, disturbed=True, slowdown=0.3) for a in ("--candidate", r)]
    res = run_cli(*base, *slower, "--threshold", "15%", "--timings", "only")
    flagged = {(line.split("|")[1].strip().split("-")[0], line.split("|")[2].strip())
               for line in res.output.splitlines() if "**regression**" in line}
    assert res.exit_code == 1 and flagged == {("lru", "tokens_per_s"), ("lru", "speedup_over_offload")}, res.output


def test_timings_left_out_say_so_and_counts_still_compared(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, slow_engine="lru", slowdown=0.5))
    res = run_cli("--baseline", base, "--candidate", cand, "--timings", "no")
    assert res.exit_code == 0, res.output
    assert "| tokens_per_s |" not in res.output and "| speedup_over_offload |" not in res.output
    assert "timings left out (36 rows, --timings no)" in res.output
    assert res.output.count("| h2d_bytes_per_token |") == 6


def test_too_few_samples_is_said_plainly():
    comp = compare_runs(matrix(1, n=3), matrix(2, n=3, slow_engine="offload", slowdown=0.5), 0.1)
    from harness.regress import render_markdown
    text = render_markdown(comp, 0.1)
    assert "timings not tested in" in text and "fewer than 4 samples a side" in text


# -- bad input: one clear line, exit 2 ------------------------------------------------------------------------


def one_error_line(res):
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_no_cells_in_common(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, model="other-model"))
    assert "no cells in common" in one_error_line(run_cli("--baseline", base, "--candidate", cand))


def warning_lines(res):
    return [line for line in res.output.splitlines() if line.startswith("warning: ")]


def test_truncated_result_file_is_skipped_with_a_warning_naming_it(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2))
    victim = sorted((cand / "cells").glob("*.json"))[2]
    victim.write_text(victim.read_text()[:200])
    res = run_cli("--baseline", base, "--candidate", cand)
    (line,) = warning_lines(res)
    assert victim.name in line and "corrupt or truncated" in line and "Traceback" not in res.output
    assert "1 cell(s) only in the baseline" in res.output  # the other cells are still compared


def test_wrong_shape_result_file(tmp_path):
    cand = write_run(tmp_path, "cand", matrix(seed=2))
    (cand / "cells" / "x.json").write_text("[1, 2]")
    base = write_run(tmp_path, "base", matrix(seed=1))
    res = run_cli("--baseline", base, "--candidate", cand)
    (line,) = warning_lines(res)
    assert "x.json" in line and res.exit_code == 0, res.output


def test_unknown_metric(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    line = one_error_line(run_cli("--baseline", base, "--candidate", base, "--metric", "tokens_per_sec"))
    assert "unknown metric 'tokens_per_sec'" in line and "did you mean 'tokens_per_s'" in line


def test_bad_threshold_and_missing_run(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    line = one_error_line(run_cli("--baseline", base, "--candidate", base, "--threshold", "ten"))
    assert line == "error: --threshold 'ten': not a percentage; give one like 10% (or a fraction like 0.1)"
    assert "no such directory" in one_error_line(run_cli("--baseline", base, "--candidate", tmp_path / "nope"))


def test_every_compared_metric_of_the_schema_has_a_rule():
    from harness.regress import rule_for
    from harness.schema import METRIC_FACTS
    cpu, gpu = make_cell(), make_cell(hardware="cuda")
    for name, fact in METRIC_FACTS.items():
        if fact.compared:
            assert rule_for(name, cpu, cpu).how in ("exact", "timing", "threshold"), name
    assert rule_for("h2d_bytes_per_token", cpu, cpu).how == "exact"
    assert rule_for("h2d_bytes_per_token", gpu, gpu).how == "threshold"
    assert rule_for("tokens_per_s", cpu, cpu).how == rule_for("nvml.joules_per_token", gpu, gpu).how == "timing"
    assert rule_for("equivalent", gpu, gpu).how == "exact"


def test_load_run_round_trips(tmp_path):
    cells = matrix(seed=1)
    loaded = load_run(write_run(tmp_path, "r", cells))
    assert sorted(c.config.key() for c in loaded) == sorted(c.config.key() for c in cells)
    assert loaded[0].samples["tokens_per_s"] and loaded[0].metrics.h2d_bytes_per_token == 4096.0


def test_committed_cpu_baseline_covers_the_ci_matrix():
    """.ci/run checks matrices/ci.toml against results/baselines/cpu: a matrix edited without recording a new
    baseline would leave cells unmatched, so it fails here first."""
    from harness.matrix import load
    root = Path(__file__).resolve().parent.parent
    cells = load(root / "matrices" / "ci.toml", check_hardware=False).cells
    baseline = load_run(root / "results" / "baselines" / "cpu")
    assert sorted(c.key() for c in cells) == sorted(r.config.key() for r in baseline)
    assert all(r.status == "ok" and r.config.hardware == "cpu" for r in baseline)
    assert all(len(r.samples["tokens_per_s"]) >= 4 for r in baseline)  # enough for Mann-Whitney U
    # the CI cells must be deterministic in what regress compares exactly (adaptive speculation follows timings)
    assert all(r.config.engine_options.get("adaptive") is False for r in baseline if r.config.engine == "specmoe")


def test_baseline_from_another_matrix_is_bad_input(tmp_path):
    root = Path(__file__).resolve().parent.parent
    other = write_run(tmp_path, "other", matrix(seed=1))
    line = one_error_line(run_cli("--baseline", other, "--candidate", root / "results" / "baselines" / "cpu",
                                  "--matrix", root / "matrices" / "ci.toml"))
    assert line.startswith(f"error: baseline {other} was recorded from another matrix than ") and "ci.toml" in line


def paired_sides(slowdown: float, rounds=5, n=6, seed=0):
    """Base and candidate measured in turns: each iteration pair shares a machine speed that swings 0.5-1.5x from
    round to round (a busy machine's slow stretches) and 0.9-1.1x from pair to pair, more than the slowdown; the
    candidate's offload is `slowdown` slower. nospec is the same code on both sides."""
    rng = random.Random(seed)
    base, cand = [], []
    for r in range(rounds):
        cells = {"base": [], "candidate": []}
        machine = rng.uniform(0.5, 1.5)
        for engine, tps in (("offload", 100.0), ("nospec", 150.0)):
            speeds = [machine * rng.uniform(0.9, 1.1) for _ in range(n)]
            for side, slow in (("base", 0.0), ("candidate", slowdown if engine == "offload" else 0.0)):
                c = make_cell(engine, 1, tps, n=n, seed=r)
                c.samples["tokens_per_s"] = [tps * s * (1 - slow) * (1 + rng.uniform(-0.02, 0.02)) for s in speeds]
                cells[side].append(c)
        base.append(cells["base"])
        cand.append(cells["candidate"])
    return regress.Side(base), regress.Side(cand)


def test_paired_timings_see_a_30pct_slowdown_through_noise_that_hides_it_from_runs_compared_as_wholes():
    base, cand = paired_sides(0.3)
    rows = {(r.cell.split("-")[0], r.metric): r for r in regress.compare_runs(
        base, cand, 0.15, metrics=["tokens_per_s", "speedup_over_offload"], timings="only", paired=True).rows}
    slow = rows[("offload", "tokens_per_s")]
    assert slow.status == "regression" and slow.p_value < 0.001
    assert 0.68 < float(slow.note.split("candidate/base ")[1].split(";")[0]) < 0.72  # the 30%, paired
    assert rows[("nospec", "tokens_per_s")].status == "ok"
    assert rows[("nospec", "speedup_over_offload")].status == "improvement"  # over a slower offload
    unpaired = {r.cell.split("-")[0]: r for r in regress.compare_runs(
        base, cand, 0.15, metrics=["tokens_per_s"], timings="only").rows}
    assert unpaired["offload"].status != "regression"  # the noise the pairing cancels


def test_paired_identical_code_is_not_flagged_and_too_few_pairs_are_not_tested():
    for seed in range(5):
        base, cand = paired_sides(0.0, seed=seed)
        comp = regress.compare_runs(base, cand, 0.15, metrics=["tokens_per_s", "speedup_over_offload"],
                                    timings="only", paired=True)
        assert {r.status for r in comp.rows} == {"ok"}, [r.note for r in comp.rows]
    base, cand = paired_sides(0.3, rounds=1, n=5)
    row = regress.compare_runs(base, cand, 0.15, metrics=["tokens_per_s"], timings="only", paired=True).rows[0]
    assert row.status == "not significant" and "5 iteration pairs, need 6" in row.note
