"""`specmoe-bench continuous`'s confirmation pass, with the runs it measures faked: a timing that one pass of
identical code flags is measured again and, not flagged again, does not fail the job; one that is flagged again
does, naming its cell. (tests/test_ci.py runs the whole of .ci/run with real runs.)"""
from dataclasses import asdict

from harness import continuous
from test_regress import make_cell, write_run

ENGINES = ("offload", "nospec")


def fake_sides(monkeypatch, slow_in: set[str]):
    """`continuous.open_tree` and `Workers.measure` faked: each side has offload and nospec at batch 1 and 4, and
    each measured cell is written at once; nospec at batch 1 is 30% slower in the candidate's runs whose id starts
    with one of `slow_in` ("" for the first pass, "confirm-" for the confirmation rounds). Records every measured
    (run id, cell key)."""
    calls = []
    configs = [make_cell(e, b).config for e in ENGINES for b in (1, 4)]

    def open_tree(name, path, matrix_path, job_dir):
        return continuous.Tree(name, path, {"environment": {}}, {c.key(): (c, asdict(c)) for c in configs})

    def measure(self, sides, key, runs):
        out = {}
        for tree in sides:
            run = runs[tree.name]
            calls.append((run.id, key))
            rnd = int(run.id.rsplit("-", 1)[1]) + (100 if run.id.startswith("confirm") else 0)
            slow = run.id.split("candidate")[0] in slow_in and "candidate" in run.id
            c = tree.cells[key][0]
            out[tree.name] = make_cell(c.engine, c.batch_size, 100.0 * c.batch_size * (
                0.7 if (slow and c.engine == "nospec" and c.batch_size == 1) else 1.0), seed=rnd)
            run.write_cell(out[tree.name])
        return out

    monkeypatch.setattr(continuous, "open_tree", open_tree)
    monkeypatch.setattr(continuous.Workers, "measure", measure)
    return calls


def run(tmp_path, monkeypatch, slow_in, **kw):
    calls = fake_sides(monkeypatch, slow_in)
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
    confirm = [key for run_id, key in calls if run_id.startswith("confirm")]
    assert len(confirm) == 20  # 5 rounds a side of 2 cells
    # only the flagged cell, and offload beside it for the between-engine ratio
    assert set(confirm) == {f"{e}-tiny-mixtral-random-float32-b1-cpu-synthetic-ids-p32-n32-s0" for e in ENGINES}
    assert ("measuring --only engine=nospec,offload --only model=tiny-mixtral-random --only batch_size=1 "
            "--only hardware=cpu (2 cells) again, 5 more rounds in turns") in out
    # cell by cell, each cell of one side right after the same cell of the other, the order alternating by round
    first = [(run_id, key) for run_id, key in calls if not run_id.startswith("confirm")]
    assert [r for r, _ in first[:4]] == ["base-1", "candidate-1"] * 2
    assert first[0][1] == first[1][1] != first[2][1] == first[3][1]
    assert [r for r, _ in first[8:10]] == ["candidate-2", "base-2"]


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


def turnstile_log(names, iterations, leave_early=None):
    """Each side a thread that takes `iterations` turns; while in its turn it writes (name, "in") and (name, "out")
    with a pause between, so another side running beside it would interleave the entries. `leave_early`: a side that
    leaves after one turn (a base whose cell failed)."""
    import threading
    import time

    gate, log = continuous.Turnstile(list(names)), []

    def side(name):
        for i in range(iterations):
            if name == leave_early and i == 1:
                break
            gate.wait(name)
            log.append((name, "in"))
            time.sleep(0.005)
            log.append((name, "out"))
        gate.leave(name)

    threads = [threading.Thread(target=side, args=(n,)) for n in names]
    for t in reversed(threads):  # the last side asks first: the order of the turns must not depend on who asks first
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a side never got its turn"
    return log


def test_turnstile_alternates_strictly_and_never_runs_two_sides_at_once():
    log = turnstile_log(["base", "candidate"], 6)
    assert log == [(n, s) for n in ["base", "candidate"] * 6 for s in ("in", "out")]


def test_turnstile_lets_the_other_side_run_alone_once_one_has_left():
    log = turnstile_log(["base", "candidate"], 4, leave_early="base")
    assert [n for n, s in log if s == "in"] == ["base"] + ["candidate"] * 4
    assert all(log[i][0] == log[i + 1][0] for i in range(0, len(log), 2))  # each turn's in and out together
