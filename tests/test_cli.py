"""The command line as a user meets it: `compare` end to end with its JSON rows, `show`, `export`, `list`, and one
clear line with exit 2 for every kind of bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One real `compare --engines specmoe,offload` on a tiny random model, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("compare")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "compare", "--engines", "specmoe,offload",
                          "--model", "tiny-mixtral-random", "--batch-sizes", "1,2", "--max-new-tokens", "6",
                          "--prompt-len", "8", "--iterations", "1", "--warmup", "0", "--cpu-threads", "1",
                          "--process-per", "model",  # one worker for the 4 cells: the imports once, not 4 times
                          "--json", str(tmp / "out.json"),
                          "--run-id", "cmp", "--results-dir", str(tmp / "runs"), "--save-outputs"],
                         env=env, capture_output=True, text=True, timeout=600)
    return tmp, out


def test_compare_prints_one_table_and_writes_rows(compared):
    tmp, out = compared
    assert out.returncode == 0, out.stderr + out.stdout
    header = out.stdout.splitlines()[0]
    assert "specmoe" in header and "offload (x specmoe)" in header
    assert "tokens_per_s" in out.stdout and "x)" in out.stdout
    assert f"results: {tmp / 'runs' / 'cmp'}" in out.stdout
    rows = json.loads((tmp / "out.json").read_text())
    assert isinstance(rows, list) and len(rows) == 4
    for r in rows:
        for key in ("engine", "model", "batch_size", "hardware", "tokens_per_s", "h2d_bytes_per_token",
                    "tokens_per_step", "acceptance_rate", "equivalent"):
            assert key in r
        assert r["status"] == "ok" and r["tokens_per_s"] > 0
    spec = [r for r in rows if r["engine"] == "specmoe"]
    off = [r for r in rows if r["engine"] == "offload"]
    assert all(r["acceptance_rate"] is None and r["tokens_per_step"] == 1.0 for r in off)  # no drafting: absent
    assert {(r["batch_size"], r["hardware"]) for r in spec} == {(1, "cpu"), (2, "cpu")}
    for r in off:  # each engine's ratio to the first engine's same cell
        first = next(s for s in spec if s["batch_size"] == r["batch_size"])
        assert r["tokens_per_s_ratio"] == pytest.approx(r["tokens_per_s"] / first["tokens_per_s"])
        assert r["h2d_bytes_per_token_ratio"] == pytest.approx(r["h2d_bytes_per_token"] / first["h2d_bytes_per_token"])


def test_saved_outputs_hold_prompt_and_generated_ids(compared):
    tmp, _ = compared
    cell = json.loads(next((tmp / "runs" / "cmp" / "cells").glob("offload-*b2-*.json")).read_text())
    outputs = cell["outputs"]
    assert len(outputs["prompts"]) == 2 and all(isinstance(t, int) for t in outputs["prompts"][0])
    assert [len(seq) for seq in outputs["tokens"][0]] == [6, 6]
    assert outputs["tokens"][0] == outputs["reference_tokens"]  # greedy offload equals resident


def test_show_and_export(compared, capsys, tmp_path):
    tmp, _ = compared
    code, out, _ = run_main(["show", "cmp", "--results-dir", str(tmp / "runs")], capsys)
    assert code == 0 and "offload (x specmoe)" in out and "4/4 cells" in out
    code, out, _ = run_main(["show", str(tmp / "runs" / "cmp"), "--flat"], capsys)
    assert code == 0 and out.count(" ok ") >= 4
    code, out, _ = run_main(["export", "cmp", "--results-dir", str(tmp / "runs"), "--csv", str(tmp_path / "a.csv"),
                             "--parquet", str(tmp_path / "a.parquet")], capsys)
    assert code == 0
    df = pd.read_parquet(tmp_path / "a.parquet")
    assert len(df) == 4 and set(df.engine) == {"specmoe", "offload"}
    assert len(pd.read_csv(tmp_path / "a.csv")) == 4


@pytest.mark.parametrize("what, expect", [("engines", "specmoe"), ("models", "tiny-mixtral-random"),
                                          ("workloads", "synthetic-ids"), ("hardware", "cuda:budget=SIZE")])
def test_list(what, expect, capsys):
    code, out, _ = run_main(["list", what], capsys)
    assert code == 0 and expect in out


def test_dry_run_prints_cells(capsys):
    code, out, _ = run_main(["run", str(REPO / "matrices" / "cpu.toml"), "--dry-run"], capsys)
    assert code == 0 and "cells from" in out and "lru" in out


def test_only_narrows_the_matrix(capsys):
    code, out, _ = run_main(["run", str(REPO / "matrices" / "cpu.toml"), "--dry-run", "--only", "engine=lru,offload",
                             "--only", "batch_size=1"], capsys)
    assert code == 0 and "2 cells from" in out
    code, _, err = run_main(["run", str(REPO / "matrices" / "cpu.toml"), "--dry-run", "--only", "batch_size=3"],
                            capsys)
    assert code == 2 and "--only 'batch_size=3': the matrix has no batch_size '3'; it has: 1, 4, 16" in err
    code, _, err = run_main(["run", str(REPO / "matrices" / "cpu.toml"), "--dry-run", "--only", "size=3"], capsys)
    assert code == 2 and "use AXIS=VALUE[,VALUE...] with AXIS one of engine, model" in err


@pytest.mark.parametrize("args, message", [
    (["compare", "--engines", "warpdrive,offload"], "unknown engine 'warpdrive'"),
    (["compare", "--engines", "offload", "--batch-sizes", "0"], "--batch-sizes '0': batch size 0 must be at least 1"),
    (["compare", "--engines", "offload", "--batch-sizes", "1,x"], "--batch-sizes '1,x': 'x' is not a whole number"),
    (["compare", "--engines", "offload", "--hardware", "tpu"], "unknown hardware 'tpu'"),
    (["compare", "--engines", "offload", "--model", "tiny-mixtral"], "unknown model 'tiny-mixtral'"),
    (["compare", "--engines", "lru", "--option", "lru.size=3"], "engine 'lru' has no option 'size'"),
    (["compare", "--engines", "offload", "--json", "/nonexistent-dir/out.json"],
     "output path /nonexistent-dir/out.json: directory /nonexistent-dir does not exist"),
    (["run"], "give a matrix file"),
    (["show", "no-such-run", "--results-dir", "/nonexistent"], "run 'no-such-run': not a run id or run directory"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(args, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results").exists()  # refused before anything was started


def test_unknown_engine_lists_the_engines(capsys):
    code, _, err = run_main(["compare", "--engines", "specmo,offload"], capsys)
    assert code == 2 and "did you mean 'specmoe'?" in err and "available engines: resident, offload" in err


def test_malformed_matrix_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[matrix]\nengines = ["offload"]\nmodels = ["tiny-mixtral-random"]\nbatch_sizes = [1]\n'
                   'hardware = ["cpu"]\n[settings]\nwarmup = "two"\n')
    code, _, err = run_main(["run", str(bad)], capsys)
    assert code == 2 and err == f"error: {bad}: [settings]: warmup must be an integer, got a string 'two'\n"
    bad.write_text("[matrix\n")
    code, _, err = run_main(["run", str(bad)], capsys)
    assert code == 2 and err.startswith(f"error: {bad}: TOML syntax error")


def test_unwritable_results_dir(tmp_path, capsys):
    m = REPO / "matrices" / "cpu.toml"
    (tmp_path / "f").write_text("")
    code, _, err = run_main(["run", str(m), "--results-dir", str(tmp_path / "f" / "runs")], capsys)
    assert code == 2 and "cannot be written" in err


def test_resume_skips_finished_cells_without_starting_them(tmp_path, capsys):
    from dataclasses import asdict

    from harness.results import RunDir
    from harness.schema import CellConfig, CellResult, Metrics
    cfgs = [CellConfig(engine=e, model="tiny-mixtral-random", batch_size=1, hardware="cpu") for e in ("offload", "lru")]
    run = RunDir.create(tmp_path / "runs", "old")
    run.write_meta({"cells": [asdict(c) for c in cfgs], "engines": ["offload", "lru"]})
    for c, status in zip(cfgs, ("ok", "failed")):
        run.write_cell(CellResult(config=c, status=status, valid=status == "ok", error="boom" if status != "ok" else None,
                                  metrics=Metrics(tokens_per_s=5.0) if status == "ok" else Metrics()))
    before = {p: p.stat().st_mtime_ns for p in run.cells_dir.iterdir()}
    code, out, err = run_main(["run", "--resume", "old", "--results-dir", str(tmp_path / "runs")], capsys)
    assert code == 1  # the failed cell stays failed (finished); --retry-failed would run it again
    assert err.count("already finished, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in run.cells_dir.iterdir()} == before
    assert "failed (see below)" in out and "lru-tiny-mixtral-random-float32-b1-cpu-synthetic-ids-p32-n32-s0: boom" in out
