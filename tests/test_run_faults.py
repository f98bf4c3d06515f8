"""Faults around a run that must lose nothing and run no foreign code (issue 15, part 2): two runs on one run
directory, stdin of the cell processes, a disk that fills up, a corrupt cell file met on resume, Ctrl-C.

The parent is exercised with a stand-in cell process (runner.CELL_COMMAND) that answers each job at once with a
canned result, so these tests cost no model and no torch import."""
import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import runner
from harness.cli import main
from harness.results import RunDir

STAND_IN = '''
import json, os, sys
from harness.cell import PROGRESS_PREFIX
from harness.schema import CellConfig, CellResult, Metrics
jobs = os.fdopen(int(sys.argv[2]))
for line in jobs:
    job = json.loads(line)
    cell = CellConfig(**job["config"])
    r = CellResult(config=cell, status="ok", valid=True, metrics=Metrics(tokens_per_s=10.0, output_tokens=4),
                   engine_stats={"stdin": os.readlink("/proc/self/fd/0")}, wall_s=0.01)
    print(PROGRESS_PREFIX + json.dumps({"id": job["id"], "result": r.to_dict()}), flush=True)
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "stand_in_cell.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(runner, "CELL_COMMAND", [sys.executable, str(script)], raising=False)
    monkeypatch.setattr(runner, "environment", lambda: {"host": "test"})


def matrix(tmp_path: Path, batch_sizes=(1, 2)) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent(f"""
        [matrix]
        engines = ["offload"]
        models = ["tiny-mixtral-random"]
        batch_sizes = {json.dumps(list(batch_sizes))}
        hardware = ["cpu"]
        """))
    return path


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(list(map(str, args)))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def run_args(tmp_path, *extra):
    return ["run", matrix(tmp_path), "--run-id", "r", "--results-dir", tmp_path / "runs", "--quiet", *extra]


def test_a_second_run_on_a_run_directory_in_use_refuses_at_once(tmp_path, capsys, stand_in):
    lock = tmp_path / "runs" / "r" / "run.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live run holds (RunDir.lock)
        os.write(fd, str(os.getpid()).encode())
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_main(run_args(tmp_path), capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"run r in {tmp_path / 'runs' / 'r'} is in use by process {holder.pid}" in err
        assert not list((tmp_path / "runs" / "r").glob("cells/*.json"))  # nothing measured, nothing overwritten
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock file is stale, and the next run takes it over
    code, out, err = run_main(run_args(tmp_path), capsys)
    assert code == 0, err
    assert len(list((tmp_path / "runs" / "r" / "cells").glob("*.json"))) == 2


def test_cell_processes_get_stdin_from_dev_null(tmp_path, capsys, stand_in):
    code, _, err = run_main(run_args(tmp_path), capsys)
    assert code == 0, err
    cells = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "r" / "cells").glob("*.json")]
    assert [c["engine_stats"]["stdin"] for c in cells] == ["/dev/null", "/dev/null"]


def test_a_full_disk_loses_no_measured_result(tmp_path, capsys, stand_in, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "fallback"))
    (tmp_path / "fallback").mkdir()

    def full(self, result):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "write_cell", full)
    monkeypatch.setattr(runner, "RETRY_DELAY_S", 0.0, raising=False)
    code, _, err = run_main(run_args(tmp_path), capsys)
    assert code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "could not be written" in line and "No space left on device" in line
    (kept,) = (tmp_path / "fallback").iterdir()
    assert str(kept) in line and json.loads(kept.read_text())["metrics"]["tokens_per_s"] == 10.0
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.name.endswith(".tmp")]


def test_resume_measures_a_corrupt_cell_file_again_and_says_so(tmp_path, capsys, stand_in):
    assert run_main(run_args(tmp_path), capsys)[0] == 0
    victim = sorted((tmp_path / "runs" / "r" / "cells").glob("*.json"))[0]
    victim.write_text(victim.read_text()[:50])
    code, out, err = run_main(["show", "r", "--results-dir", tmp_path / "runs"], capsys)
    assert code == 0 and f"warning: skipped {victim}: corrupt or truncated" in err and "1/2 cells" in out
    code, _, err = run_main(run_args(tmp_path), capsys)
    assert code == 0, err
    assert f"warning: {victim}: corrupt or truncated" in err and "measuring the cell again" in err
    assert json.loads(victim.read_text())["status"] == "ok"


def test_a_corrupt_run_json_is_reported_as_corrupt(tmp_path, capsys, stand_in):
    assert run_main(run_args(tmp_path), capsys)[0] == 0
    (tmp_path / "runs" / "r" / "run.json").write_text('{"cells": [')
    code, _, err = run_main(["run", "--resume", "r", "--results-dir", tmp_path / "runs"], capsys)
    assert code == 2 and "run.json: corrupt" in err and "lists no cells" not in err


def test_ctrl_c_prints_how_to_resume(tmp_path, capsys, stand_in, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_matrix", interrupted)
    code, _, err = run_main(run_args(tmp_path), capsys)
    assert code == 130 and "aborted" not in err
    assert f"the finished cells are saved in {tmp_path / 'runs' / 'r'}" in err and "--resume r" in err


def test_retry_failed_measures_skipped_cells_again(tmp_path, capsys, stand_in):
    from harness.schema import CellConfig, CellResult
    assert run_main(run_args(tmp_path), capsys)[0] == 0
    run = RunDir.open("r", tmp_path / "runs")
    cfg = CellConfig(engine="offload", model="tiny-mixtral-random", batch_size=1, hardware="cpu")
    run.write_cell(CellResult(config=cfg, status="skipped", valid=False, error="cannot run here"))
    assert run_main(run_args(tmp_path, "--retry-failed"), capsys)[0] == 0
    assert run.finished(cfg).status == "ok"
