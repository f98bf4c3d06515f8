"""Cell isolation for real: engines that raise, run out of memory, die by a signal or hang cost their own cell
only (in a process of their own or in a worker shared by the cells of one model), and a run killed with SIGKILL
resumes without losing or repeating a finished cell."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A third-party engine package, registered through the entry-point group like any plug-in.
PLUGIN = '''
import os, signal, sys, time
from engines.baselines import OffloadEngine

class RaiseEngine(OffloadEngine):
    name = "boom-raise"
    def generate(self, prompts, settings):
        print("boom-raise was here", file=sys.stderr)
        raise RuntimeError("boom: this engine fails on purpose")

class OomEngine(OffloadEngine):
    name = "boom-oom"
    def generate(self, prompts, settings):
        self.hog = bytearray(1 << 50)  # a petabyte: the allocation fails with MemoryError
        return super().generate(prompts, settings)

class KillEngine(OffloadEngine):
    name = "boom-kill"
    def generate(self, prompts, settings):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does

class HangEngine(OffloadEngine):
    name = "boom-hang"
    def generate(self, prompts, settings):
        time.sleep(3600)
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "boom_engine.py").write_text(PLUGIN)
    dist = root / "boom_engine-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: boom-engine\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[specmoe_bench.engines]\n" + "".join(
        f"boom-{m} = boom_engine:{m.capitalize()}Engine\n" for m in ("raise", "oom", "kill", "hang")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO)])
    return env


def write_matrix(path: Path, engines, batch_sizes=(1,), timeout_s=300, process_per="cell") -> Path:
    path.write_text(textwrap.dedent(f"""
        [matrix]
        engines = {json.dumps(list(engines))}
        models = ["tiny-mixtral-random"]
        batch_sizes = {json.dumps(list(batch_sizes))}
        hardware = ["cpu"]
        [settings]
        prompt_len = 8
        max_new_tokens = 4
        warmup = 0
        min_iterations = 1
        timeout_s = {timeout_s}
        cpu_threads = 1
        process_per = "{process_per}"
        """))
    return path


def cli(*args):
    return [sys.executable, "-m", "harness.cli", *args]


def cells(run_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "cells").glob("*.json"))}


def test_failing_cells_are_recorded_and_the_run_goes_on(tmp_path, plugin_env):
    m = write_matrix(tmp_path / "m.toml", ["boom-raise", "boom-oom", "boom-kill", "offload"])
    out = subprocess.run(cli("run", str(m), "--run-id", "r", "--results-dir", str(tmp_path / "runs")),
                         env=plugin_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr  # a failed cell makes the run exit 1, after every cell ran
    by_engine = {c["config"]["engine"]: c for c in cells(tmp_path / "runs" / "r").values()}
    assert set(by_engine) == {"boom-raise", "boom-oom", "boom-kill", "offload"}
    assert by_engine["boom-raise"]["status"] == "failed"
    assert by_engine["boom-raise"]["error"] == "RuntimeError: boom: this engine fails on purpose"
    assert "Traceback" in by_engine["boom-raise"]["error_detail"]
    assert by_engine["boom-oom"]["status"] == "failed" and by_engine["boom-oom"]["error"].startswith("MemoryError")
    assert by_engine["boom-kill"]["status"] == "failed"
    assert "killed by SIGKILL" in by_engine["boom-kill"]["error"]
    assert all(not c["valid"] and c["invalid_reason"].startswith("failed") for e, c in by_engine.items()
               if e != "offload")
    ok = by_engine["offload"]
    assert ok["status"] == "ok" and ok["valid"] and ok["metrics"]["equivalent"] is True
    assert ok["metrics"]["output_tokens"] == 4 and ok["metrics"]["h2d_bytes_per_token"] > 0
    assert ok["environment"]["torch"] and "git_commit" in ok["environment"]
    # where the cell's time went: every phase timed, together within the cell's wall time
    phases = ok["phase_s"]
    assert {"load_model", "reference", "engine_load", "warmup", "measure", "equivalence", "process"} <= set(phases)
    assert sum(phases.values()) <= ok["wall_s"] + 0.01 and ok["metrics"]["h2d_gb_per_s"] > 0
    assert ok["samples"]["host_gc_ms"][0] >= 0 and ok["samples"]["max_step_ms"][0] > 0
    nvml = ok["metrics"]["nvml"]  # no NVIDIA GPU in a cpu cell: every NVML metric absent, with the reason
    assert "not an NVIDIA GPU" in nvml["nvml_absent"]
    assert nvml["pcie_rx_bytes"] is None and nvml["joules_per_token"] is None and nvml["energy_j"] is None
    assert "failed: RuntimeError: boom" in out.stdout or "boom: this engine fails" in out.stdout


def test_a_hanging_cell_is_killed_at_its_timeout(tmp_path, plugin_env):
    m = write_matrix(tmp_path / "m.toml", ["boom-hang"], timeout_s=8)  # hangs either way: loading counts too
    t0 = time.time()
    out = subprocess.run(cli("run", str(m), "--run-id", "r", "--results-dir", str(tmp_path / "runs")),
                         env=plugin_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and time.time() - t0 < 120
    (cell,) = cells(tmp_path / "runs" / "r").values()
    assert cell["status"] == "failed" and cell["error"].startswith("timed out after 8 s")


def test_sigkill_mid_run_loses_and_repeats_no_finished_cell(tmp_path, plugin_env):
    m = write_matrix(tmp_path / "m.toml", ["offload", "resident", "lru"])
    args = cli("run", str(m), "--run-id", "r", "--results-dir", str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "r"
    proc = subprocess.Popen(args, env=plugin_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run_dir / "cells").glob("*.json")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # a cell process left behind would finish its cell now; none may
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "cells").glob("*.json")}
    assert 1 <= len(before) < 3

    out = subprocess.run(args, env=plugin_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "cells").glob("*.json")}
    assert len(after) == 3
    assert all(after[name] == before[name] for name in before)  # not rewritten, not repeated
    assert out.stderr.count("already finished, skipped") == len(before)
    assert all(c["status"] == "ok" for c in cells(run_dir).values())


def test_cells_of_one_model_share_a_worker_and_a_failure_costs_its_cell_only(tmp_path, plugin_env):
    engines = ["offload", "lru", "boom-raise", "resident", "boom-kill", "specmoe", "boom-hang", "nospec"]
    m = write_matrix(tmp_path / "m.toml", engines, timeout_s=20, process_per="model")
    out = subprocess.run(cli("run", str(m), "--run-id", "r", "--results-dir", str(tmp_path / "runs")),
                         env=plugin_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr
    by = {c["config"]["engine"]: c for c in cells(tmp_path / "runs" / "r").values()}
    assert by["boom-raise"]["error"] == "RuntimeError: boom: this engine fails on purpose"
    assert "killed by SIGKILL" in by["boom-kill"]["error"]
    assert by["boom-hang"]["error"].startswith("timed out after 20 s")
    ok = [e for e in engines if not e.startswith("boom")]
    assert all(by[e]["status"] == "ok" and by[e]["valid"] and by[e]["metrics"]["equivalent"] for e in ok)
    # one worker until a cell fails; each failure hands the next cell a new process
    proc = {e: by[e]["process"] for e in engines if by[e]["process"]}
    assert [proc[e]["cells_before"] for e in ("offload", "lru", "boom-raise")] == [0, 1, 2]
    assert len({proc[e]["pid"] for e in ("offload", "lru", "boom-raise")}) == 1
    assert proc["resident"]["cells_before"] == proc["specmoe"]["cells_before"] == proc["nospec"]["cells_before"] == 0
    assert len({proc[e]["pid"] for e in ("offload", "resident", "specmoe", "nospec")}) == 4
    # a later cell in the worker reports its own peak memory, and pays no imports
    assert proc["lru"]["peak_rss_reset"] is True and by["lru"]["metrics"]["host_rss_bytes_max"] > 0
    assert by["lru"]["phase_s"]["process"] < by["offload"]["phase_s"]["process"]
    # each cell's log holds what was printed while it ran
    logs = {p.name.split("-")[0] + ("-" + p.name.split("-")[1] if p.name.startswith("boom") else ""): p.read_text()
            for p in (tmp_path / "runs" / "r" / "logs").glob("*.log")}
    assert "boom-raise was here" in logs["boom-raise"] and "boom" not in logs["lru"] + logs["resident"]
