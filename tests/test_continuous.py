"""`specmoe-bench continuous`'s confirmation pass, with the runs it measures faked: a timing that one pass of
identical code flags is measured again and, not flagged again, does not fail the job; one that is flagged again
does, naming its cell. (tests/test_ci.py runs the whole of .ci/run with real runs.)"""
from pathlib import Path

from harness import continuous
from test_regress import make_cell, write_run

ENGINES = ("offload", "nospec")


def fake_measure(slow_in: set[str]):
    """`continuous.measure` that writes a run of offload and nospec at batch 1 and 4; nospec at batch 1 is 30%
    slower in the candidate's runs whose id starts with one of `slow_in` ("" for the first pass, "confirm-" for
    the confirmation rounds). Records every call's `run --only` arguments."""
    calls = []

    def measure(tree: Path, matrix_file: Path, run_id: str, job_dir: Path, only=()):
        calls.append((run_id, only))
        rnd = int(run_id.rsplit("-", 1)[1]) + (100 if run_id.startswith("confirm") else 0)
        slow = run_id.split("candidate")[0] in slow_in and "candidate" in run_id
        cells = [make_cell(e, b, 100.0 * b * (0.7 if (slow and e == "nospec" and b == 1) else 1.0), seed=rnd)
                 for e in ENGINES for b in (1, 4)]
        write_run(job_dir, run_id, cells)
        return True, 0.0
    return measure, calls


def run(tmp_path, monkeypatch, slow_in, **kw):
    measure, calls = fake_measure(slow_in)
    monkeypatch.setattr(continuous, "measure", measure)
    lines = []
    rc = continuous.run_continuous("matrices/ci.toml", "HEAD", 5, ("15%",), None, tmp_path / "job",
                                   echo=lambda text="", nl=True: lines.append(str(text)), **kw)
    return rc, "\n".join(lines), calls


def test_a_one_off_flag_is_measured_again_and_not_confirmed(tmp_path, monkeypatch):
    rc, out, calls = run(tmp_path, monkeypatch, {""})
    assert rc == 0, out
    assert "continuous: no regression" in out
    assert "**regression**" not in out
    assert "| not confirmed |" in out
    confirm = [only for run_id, only in calls if run_id.startswith("confirm")]
    assert len(confirm) == 10  # 5 rounds a side
    # only the flagged cell's axes, and offload beside it for the between-engine ratio
    assert confirm[0] == ("--only", "engine=nospec,offload", "--only", "model=tiny-mixtral-random",
                          "--only", "batch_size=1", "--only", "hardware=cpu")


def test_a_flag_seen_again_fails_naming_the_cell(tmp_path, monkeypatch):
    rc, out, _ = run(tmp_path, monkeypatch, {"", "confirm-"})
    assert rc == 1, out
    flagged = {line.split("|")[1].strip() for line in out.splitlines() if "**regression**" in line}
    assert flagged == {"nospec-tiny-mixtral-random-float32-b1-cpu-synthetic-ids-p32-n32-s0"}, out
    assert "confirmed by 5 more rounds" in out


def test_nothing_flagged_measures_nothing_again_and_zero_rounds_lets_the_first_pass_decide(tmp_path, monkeypatch):
    rc, out, calls = run(tmp_path, monkeypatch, set())
    assert rc == 0 and not any(run_id.startswith("confirm") for run_id, _ in calls), out
    rc, out, calls = run(tmp_path / "b", monkeypatch, {""}, confirm_rounds=0)
    assert rc == 1 and not any(run_id.startswith("confirm") for run_id, _ in calls), out
