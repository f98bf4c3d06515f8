"""`specmoe-bench regress`: what it flags, what it lets through, and its one-line errors (exit 2)."""
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.regress import compare_runs, load_run, regress_command
from harness.schema import CellConfig, CellResult, Metrics

ENV = {"torch": "2.13.0+cpu", "cpu_count": 2, "gpu": None, "hostname": "a"}


def make_cell(engine="offload", batch=4, tps=100.0, bytes_per_token=4096.0, hardware="cpu", n=6, noise=0.03,
              seed=0, model="tiny-mixtral-random", equivalent=True, status="ok", **metrics) -> CellResult:
    """A cell whose tokens_per_s samples scatter by `noise` around `tps` (like a run on a busy machine)."""
    rng = random.Random(f"{engine}/{batch}/{seed}")
    samples = [tps * (1 + rng.uniform(-noise, noise)) for _ in range(n)]
    m = Metrics(tokens_per_s=sum(samples) / n, h2d_bytes_per_token=bytes_per_token, expert_hit_rate=0.25,
                tokens_per_step=1.0, equivalent=equivalent, exact_match_rate=1.0 if equivalent else 0.5,
                iterations=n, **metrics)
    return CellResult(config=CellConfig(engine=engine, model=model, batch_size=batch, hardware=hardware),
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


def matrix(seed, slow_engine=None, slowdown=0.0, bytes_change=None, **kw):
    cells = []
    for engine in ("offload", "lru", "specmoe"):
        for batch in (1, 4):
            tps = {"offload": 100.0, "lru": 150.0, "specmoe": 220.0}[engine] * batch ** 0.5
            if engine == slow_engine:
                tps *= 1 - slowdown
            bpt = 4096.0 if not (bytes_change and engine == bytes_change[0]) else bytes_change[1]
            cells.append(make_cell(engine, batch, tps, bpt, seed=seed, **kw))
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
    assert len(flagged) == 2  # lru at batch 1 and 4, nothing else
    assert all(line.startswith("| lru-") and "| tokens_per_s |" in line for line in flagged)
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
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2, bytes_change=("specmoe", 4097.0)))  # +0.02%: still flagged
    res = run_cli("--baseline", base, "--candidate", cand)
    assert res.exit_code == 1, res.output
    flagged = [line for line in res.output.splitlines() if "**regression**" in line]
    assert len(flagged) == 2 and all("h2d_bytes_per_token" in line and "specmoe-" in line for line in flagged)
    assert "deterministic" in flagged[0]


def test_fewer_bytes_per_token_is_flagged_as_changed():
    comp = compare_runs(matrix(1), matrix(2, bytes_change=("offload", 1024.0)), 0.1)
    rows = [r for r in comp.rows if r.metric == "h2d_bytes_per_token" and r.cell.startswith("offload")]
    assert {r.status for r in rows} == {"changed"} and comp.failed


def test_bytes_per_token_on_gpu_uses_the_threshold():
    comp = compare_runs(matrix(1, hardware="cuda"), matrix(2, hardware="cuda", bytes_change=("lru", 4100.0)), 0.1)
    rows = [r for r in comp.rows if r.metric == "h2d_bytes_per_token"]
    assert all(r.status == "ok" for r in rows) and not comp.failed


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
    assert ("specmoe", "equivalent") in bad and ("specmoe", "exact_match_rate") in bad


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


def test_github_action_benchmark_json(tmp_path):
    base = write_run(tmp_path, "base", matrix(seed=1))
    cand = write_run(tmp_path, "cand", matrix(seed=2))
    res = run_cli("--baseline", base, "--candidate", cand, "--json-out", tmp_path / "gh.json")
    assert res.exit_code == 0, res.output
    bigger = json.loads((tmp_path / "gh.bigger.json").read_text())
    smaller = json.loads((tmp_path / "gh.smaller.json").read_text())
    tps = [e for e in bigger if e["name"].endswith(" tokens_per_s")]
    assert len(tps) == 6 and all(e["unit"] == "tokens/s" and e["value"] > 0 and "range" in e for e in tps)
    assert {e["name"].split()[-1] for e in smaller} == {"h2d_bytes_per_token"}
    assert all(set(e) <= {"name", "unit", "value", "range", "extra"} for e in bigger + smaller)


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
    assert "--threshold" in one_error_line(run_cli("--baseline", base, "--candidate", base, "--threshold", "ten"))
    assert "no such directory" in one_error_line(run_cli("--baseline", base, "--candidate", tmp_path / "nope"))


def test_every_metric_of_the_schema_has_a_direction():
    from harness.regress import DIRECTION, NOT_COMPARED
    from harness.schema import METRIC_FIELDS
    assert {m for m in DIRECTION if not m.startswith("nvml.")} == set(METRIC_FIELDS) - NOT_COMPARED


def test_load_run_round_trips(tmp_path):
    cells = matrix(seed=1)
    loaded = load_run(write_run(tmp_path, "r", cells))
    assert sorted(c.config.key() for c in loaded) == sorted(c.config.key() for c in cells)
    assert loaded[0].samples["tokens_per_s"] and loaded[0].metrics.h2d_bytes_per_token == 4096.0


if __name__ == "__main__":
    pytest.main([__file__])


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
