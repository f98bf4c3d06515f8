""".ci/run end to end in a repository of its own: a candidate commit made 30% slower is caught and named (cell and
metric), and every kind of bad input is one line with exit 2 before anything is measured."""
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A test-only engine, registered through the entry-point group like any plug-in: offload that, after each forward
# (prefill and every decode step), spins for SLOWDOWN times the CPU time the forward took, as code that does that
# much more work would. Not a sleep: a sleeping process costs nothing on a busy machine (the scheduler hands its
# share to the others and back when it wakes): a candidate that slept 30% per step measured 21% slower in tokens/s
# and 13% in its speedup over offload with two busy loops running (not flagged). Slower code burns the CPU.
SLOW_ENGINE = '''
import time
from engines.baselines import OffloadEngine
from engines.runtime import ExpertPolicy

SLOWDOWN = {slowdown}


class SlowPolicy(ExpertPolicy):
    def begin_forward(self, forward_index):
        self.t0 = time.thread_time()

    def end_forward(self):
        until = time.thread_time() + SLOWDOWN * (time.thread_time() - self.t0)
        while time.thread_time() < until:
            pass


class SlowEngine(OffloadEngine):
    name = "slow"
    summary = "test only: offload that spins SLOWDOWN x each forward's CPU time after it"

    def make_policy(self, hardware):
        return SlowPolicy()
'''

# 20 iterations a cell: each run's best iteration is its sample (harness.regress.best_of), and a run needs only a few
# iterations undisturbed by other work for that. Measured with two busy loops on this 2-core machine, over the
# same 5 + 5 runs: the best of 10, 20 and 40 iterations spread 1.07-1.10x, 1.06-1.08x and 1.03-1.04x in the offload
# cell's tokens/s, the slow cell -27%, -26% and -25% at p 0.008 each; the run medians of 40 spread 1.12-1.14x.
MATRIX = """
[matrix]
engines = ["offload", "slow"]
models = ["tiny-mixtral-random"]
batch_sizes = [1]
hardware = ["cpu"]
[settings]
prompt_len = 8
max_new_tokens = 32
warmup = 1
min_iterations = 20
cpu_threads = 1
process_per = "model"
"""


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of this working tree as a git repository with a test-only `slow` engine at its root (found through
    its dist-info there, as the cells run from the root of their tree) and a two-cell matrix, in two commits, so
    that HEAD^ exists; a test adds the candidate commit it needs."""
    root = tmp_path_factory.mktemp("ci") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)  # the mtimes too: make sees the shared .venv up to date
    os.symlink(REPO / ".venv", root / ".venv")
    dist = root / "slow-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: slow\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[specmoe_bench.engines]\nslow = slow_engine:SlowEngine\n")
    (root / "ci-test.toml").write_text(MATRIX)
    (root / "slow_engine.py").write_text(SLOW_ENGINE.format(slowdown=0.0))
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + ".venv\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "base")
    return root


def ci_run(root, *args, timeout=900):
    return subprocess.run(["bash", ".ci/run", *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.mark.slow
def test_a_candidate_30pct_slower_fails_naming_the_cell_and_the_metric(repo):
    (repo / "slow_engine.py").write_text(SLOW_ENGINE.format(slowdown=0.3))
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-am", "candidate: 30% slower")
    out = ci_run(repo, "--no-tests", "--matrix", "ci-test.toml", "--baseline", "none", "--rounds", "5")
    assert out.returncode == 1, out.stdout + out.stderr
    flagged = [line.split("|")[1:3] for line in out.stdout.splitlines() if "**regression**" in line]
    cells = {c.strip() for c, _ in flagged}
    assert cells == {"slow-tiny-mixtral-random-float32-b1-cpu-synthetic-ids-p8-n32-s0"}, out.stdout
    assert {m.strip() for _, m in flagged} <= {"tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms_p50",
                                               "speedup_over_offload"}, out.stdout
    assert "continuous: REGRESSION" in out.stdout
    # a flagged timing is measured again (the flagged cell with offload beside it) and stands only if flagged again
    assert "confirm round 5/5: " in out.stdout, out.stdout
    assert any("; confirmed by 5 more rounds: " in line for line in out.stdout.splitlines()
               if "**regression**" in line), out.stdout
    # cell by cell: each cell of one side right after the same cell of the other, the order alternating by round
    turns = [line.split(", in ")[0] for line in out.stdout.splitlines() if line.startswith("round ")]
    assert turns[:2] == ["round 1/5: 2 cells, iterations in turns, base first, then candidate",
                         "round 2/5: 2 cells, iterations in turns, candidate first, then base"]
    report = next(repo.glob("results/runs/ci-*/regress.md")).read_text()
    assert "measured in turns in this job (5 vs 5 runs)" in report
    assert not list(Path("/tmp").glob("specmoe-base-*/slow_engine.py"))  # the base worktree is gone


@pytest.mark.parametrize("args, message", [
    (["--base", "no-such-ref"], "error: --base 'no-such-ref': no such commit in "),
    (["--threshold", "ten"], "error: --threshold 'ten': not a percentage"),
    (["--baseline", "results/baselines/cpu", "--matrix", "ci-test.toml"],
     "error: baseline results/baselines/cpu was recorded from another matrix than ci-test.toml: "),
    (["--matrix", "nope.toml"], "error: "),
    (["--rounds", "0"], "error: "),
    (["--confirm-rounds", "-1"], "error: --confirm-rounds -1: "),
])
def test_bad_input_is_one_line_exit_2_before_anything_runs(repo, args, message):
    before = set(repo.glob("results/runs/*"))
    out = ci_run(repo, "--no-tests", *args, timeout=120)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stdout + out.stderr
    assert set(repo.glob("results/runs/*")) == before  # nothing was measured
