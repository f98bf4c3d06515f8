"""Metrics from Generations, the result files and the tidy table (no model, no subprocess: fast)."""
import json
import math

import pandas as pd
import pytest

from engines.errors import BadInput
from engines.runtime import Generation
from harness import metrics
from harness.results import RunDir, atomic_write_json, comparison_table, export, load_table
from harness.schema import SCHEMA_VERSION, CellConfig, CellResult, Metrics


def plain_gen(t0=10.0) -> Generation:
    # batch 2, 4 tokens each: prefill 0.1 s, then 3 decode steps of 0.02, 0.02, 0.04 s
    return Generation(tokens=[[1, 2, 3, 4], [5, 6, 7, 8]], prompt_lens=[10, 6], t_start=t0, t_first=t0 + 0.1,
                      step_times=[t0 + 0.12, t0 + 0.14, t0 + 0.18], step_tokens=[2, 2, 2], t_end=t0 + 0.2,
                      stats=dict(h2d_bytes=800, h2d_copies=8, hits=2, misses=6, seq_steps=6))


def test_metrics_of_plain_decoding():
    m, samples = metrics.compute([plain_gen(), plain_gen(20.0)])
    assert m.iterations == 2 and m.output_tokens == 8
    assert m.tokens_per_s == pytest.approx(8 / 0.2)
    assert m.decode_tokens_per_s == pytest.approx(6 / 0.08)
    assert m.prefill_tokens_per_s == pytest.approx(16 / 0.1)
    assert m.ttft_ms == pytest.approx(100.0)
    assert m.tpot_ms_p50 == pytest.approx(20.0)
    assert m.tpot_ms_p99 == pytest.approx(40.0, rel=0.05)
    assert m.h2d_bytes == 800 and m.h2d_bytes_per_token == pytest.approx(100.0)
    assert m.expert_hit_rate == pytest.approx(0.25)
    assert m.tokens_per_step == pytest.approx(1.0)
    # not measured by a plain engine: absent, never 0
    assert m.acceptance_rate is None and m.drafted_tokens is None and m.draft_time_ms is None
    assert m.peak_device_mem_bytes is None
    assert samples["tokens_per_s"] == pytest.approx([40.0, 40.0])
    assert samples["tpot_ms_p50"] == pytest.approx([20.0, 20.0])
    assert samples["max_step_ms"] == pytest.approx([40.0, 40.0])  # the longest decode step of each iteration
    assert "host_gc_ms" not in samples  # the runner times the garbage collector; here nobody did


def test_the_runner_times_the_garbage_collector_inside_a_call():
    import gc

    from harness.cell import GcTimer
    with GcTimer() as timer:
        junk = [[i] for i in range(200_000)]
        gc.collect()
        del junk
    assert timer.total_ms > 0 and timer._callback not in gc.callbacks


def test_metrics_of_speculative_decoding():
    # batch 2, 8 tokens each; 2 decode steps in which each sequence gains 3 or 4 tokens (bonus included)
    g = Generation(tokens=[list(range(8)), list(range(8))], prompt_lens=[4, 4], t_start=0.0, t_first=0.1,
                   step_times=[0.2, 0.3], step_tokens=[6, 8], t_end=0.3,
                   stats=dict(h2d_bytes=1600, h2d_copies=16, hits=0, misses=16, seq_steps=4, drafted_tokens=16,
                              accepted_tokens=10, draft_time_s=0.05, verify_time_s=0.15, draft_h2d_bytes=0,
                              verify_h2d_bytes=1600))
    m, _ = metrics.compute([g])
    assert m.tokens_per_step == pytest.approx(14 / 4)
    assert m.acceptance_rate == pytest.approx(10 / 16)
    assert m.tpot_ms_p50 == pytest.approx((100 / 3 + 100 / 4) / 2)  # 0.1 s step / 3 tokens, then / 4 tokens
    assert m.draft_time_ms == pytest.approx(50.0) and m.verify_h2d_bytes == 1600


def test_steady_rate_counts_the_steps_before_the_first_row_finished():
    # batch 2: both rows generate for 2 steps (0.02 s each), then row 1 alone for 2 more slow steps (0.1 s each)
    g = Generation(tokens=[[1, 2, 3], [4, 5, 6, 7, 8]], prompt_lens=[2, 2], t_start=0.0, t_first=0.1,
                   step_times=[0.12, 0.14, 0.24, 0.34], step_tokens=[2, 2, 1, 1], t_end=0.34,
                   stats=dict(seq_steps=6), step_rows=[2, 2, 1, 1])
    m, samples = metrics.compute([g])
    assert m.steady_tokens_per_s == pytest.approx(4 / 0.04)
    assert m.decode_tokens_per_s == pytest.approx(6 / 0.24)  # the ragged tail pulls the whole-call rate down
    assert samples["steady_tokens_per_s"] == pytest.approx([100.0])
    # a step's per-token time is for one of the rows it served: the lone row's 0.1 s steps are 100 ms per token,
    # not the batch size times that (the H200 first reported p99s longer than the whole call that way)
    assert sorted(metrics.tpot_samples_ms(g)) == pytest.approx([20.0, 20.0, 100.0, 100.0])
    g.step_rows = None  # an engine that does not say which rows were still generating: not measured
    assert metrics.compute([g])[0].steady_tokens_per_s is None


def test_per_position_acceptance_draft_lengths_and_prefetch_bytes():
    def gen(steps_by_gamma, drafted, accepted, prefetch):
        return Generation(tokens=[[1] * 8], prompt_lens=[4], t_start=0.0, t_first=0.1, step_times=[0.2],
                          step_tokens=[7], t_end=0.2, step_rows=[1],
                          stats=dict(drafted_by_position=drafted, accepted_by_position=accepted, spec_steps=2,
                                     draft_forwards=6, draft_time_s=0.006, verify_time_s=0.02,
                                     steps_by_gamma=steps_by_gamma, prefetch_h2d_bytes=prefetch,
                                     prefetch_used_bytes=prefetch // 2, prefetch_wasted_bytes=prefetch // 2))
    m, _ = metrics.compute([gen({4: 2, 0: 1}, [2, 2, 2, 2], [2, 1, 1, 0], 400),
                            gen({4: 1, 2: 3}, [4, 4, 1, 1], [4, 2, 0, 0], 200)])
    assert m.acceptance_by_position == pytest.approx([1.0, 0.5, 1 / 3, 0.0])
    assert m.gamma_chosen == 4  # 3 steps of gamma 4 against 3 of gamma 2: the longer on a tie
    assert m.draft_forward_ms == pytest.approx(1.0) and m.verify_pass_ms == pytest.approx(10.0)
    assert (m.prefetch_h2d_bytes, m.prefetch_used_bytes, m.prefetch_wasted_bytes) == (300, 150, 150)
    plain, _ = metrics.compute([plain_gen()])
    assert plain.acceptance_by_position is None and plain.gamma_chosen is None and plain.prefetch_h2d_bytes is None


def test_engine_without_counters_leaves_traffic_absent():
    g = plain_gen()
    g.stats = {}
    m, samples = metrics.compute([g])
    assert m.h2d_bytes is None and m.h2d_bytes_per_token is None and m.expert_hit_rate is None
    assert m.tokens_per_step is None and "h2d_bytes_per_token" not in samples
    assert m.tokens_per_s is not None


def result(engine, batch, tps, status="ok", h2d=100.0) -> CellResult:
    cfg = CellConfig(engine=engine, model="tiny-mixtral-random", batch_size=batch, hardware="cpu")
    return CellResult(config=cfg, status=status, valid=status == "ok", error=None if status == "ok" else "boom",
                      metrics=Metrics(tokens_per_s=tps, h2d_bytes_per_token=h2d, equivalent=True)
                      if status == "ok" else Metrics())


def test_run_dir_roundtrip_tidy_table_and_export(tmp_path):
    run = RunDir.create(tmp_path / "runs", "r1")
    for r in (result("offload", 1, 10.0), result("lru", 1, 25.0), result("lru", 4, None, status="failed")):
        run.write_cell(r)
    assert not list(run.cells_dir.glob(".*"))  # no temporary file left behind
    stored = json.loads(run.cell_path(result("lru", 1, 0).config).read_text())
    assert stored["schema_version"] == SCHEMA_VERSION and stored["config"]["engine"] == "lru"
    assert stored["metrics"]["ttft_ms"] is None  # absent stays null
    assert run.finished(result("lru", 4, None).config).status == "failed"
    assert run.finished(result("offload", 8, None).config) is None

    df = load_table(RunDir.open("r1", tmp_path / "runs"))
    assert len(df) == 3 and {"engine", "batch_size", "tokens_per_s", "h2d_bytes_per_token", "status"} <= set(df)
    failed = df[df.status == "failed"].iloc[0]
    assert math.isnan(failed.tokens_per_s) or failed.tokens_per_s is None  # absent, not 0

    csv, parquet = tmp_path / "t.csv", tmp_path / "t.parquet"
    export(run, csv, parquet)
    for back in (pd.read_csv(csv), pd.read_parquet(parquet)):
        assert sorted(back.engine) == ["lru", "lru", "offload"]
        assert back.loc[(back.engine == "lru") & (back.batch_size == 1), "tokens_per_s"].item() == 25.0


def test_comparison_table_has_ratio_to_first_engine():
    text = comparison_table([result("offload", 1, 10.0), result("lru", 1, 25.0, h2d=50.0)], ["offload", "lru"])
    line = next(ln for ln in text.splitlines() if "tokens_per_s" in ln and "decode" not in ln)
    assert "10.0" in line and "25.0 (2.50x)" in line
    assert "(0.50x)" in next(ln for ln in text.splitlines() if "h2d_bytes_per_token" in ln)


def test_unwritable_results_dir_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInput, match="cannot be written"):
        RunDir.create(blocker / "runs", "r1")
    with pytest.raises(BadInput, match="not a run id or run directory"):
        RunDir.open("nope", tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2} and [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from harness.progress import Progress
    cell = CellConfig(engine="lru", model="tiny-mixtral-random", batch_size=2, hardware="cpu", max_new_tokens=4)
    for tty in (True, False):
        out = io.StringIO()
        p = Progress(stream=out, tty=tty)
        p.start(2)
        p.cell_start(cell)
        p.cell_progress({"phase": "measure", "iteration": 1, "tokens": 8})
        p.cell_done(cell, result("lru", 2, 12.5))
        p.finish()
        text = out.getvalue()
        assert "[1/2] lru-tiny-mixtral-random" in text and "ok, 12.5 tok/s" in text
        if tty:
            assert "\r" in text and "8/24 tokens" in text and "1/2 cells" not in text.split("\n")[-1]
        else:
            assert "\r" not in text and "\033" not in text and text.count("\n") == 2


def test_comparison_table_keeps_cells_that_differ_in_options_or_dtype_apart():
    """Old code grouped by (model, hardware, workload, batch) and engine: the second lru cell overwrote the first."""
    a, b = result("lru", 1, 10.0), result("lru", 1, 20.0)
    b.config.engine_options = {"capacity": "50%"}
    c = result("lru", 1, 30.0)
    c.config.dtype = "bfloat16"
    text = comparison_table([a, b, c], ["lru"])
    assert "lru[capacity=50%] (x lru)" in text.splitlines()[0]
    rows = [ln for ln in text.splitlines() if " tokens_per_s " in ln]
    assert len(rows) == 2 and "dtype=bfloat16" in text  # one row per dtype
    assert any("10.0" in ln and "20.0 (2.00x)" in ln for ln in rows) and any("30.0" in ln for ln in rows)


def test_quiet_draws_nothing_even_on_a_terminal():
    import io

    from harness.progress import Progress
    cell = CellConfig(engine="lru", model="tiny-mixtral-random", batch_size=2, hardware="cpu")
    out = io.StringIO()
    p = Progress(stream=out, tty=True, quiet=True)
    p.start(1)
    p.cell_start(cell)
    p.cell_progress({"phase": "measure", "tokens": 8})
    p.cell_done(cell, result("lru", 2, 12.5))
    p.finish()
    assert out.getvalue() == ""  # old code drew the bar
    p.note("cells/x.json: corrupt")
    assert out.getvalue() == "warning: cells/x.json: corrupt\n"  # warnings still show


def test_flat_table_sorts_batch_sizes_as_numbers():
    from harness.cli import flat_table
    text = flat_table([result("lru", b, 1.0) for b in (16, 2, 1, 4)])
    batches = [ln.split()[2] for ln in text.splitlines()[2:]]
    assert batches == ["1", "2", "4", "16"]  # old code: 1, 16, 2, 4 (file-name order)
