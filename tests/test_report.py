"""`specmoe-bench report`: files written, every engine tabulated and drawn, absent NVML said in words, bad input."""
import re

import pytest
from click.testing import CliRunner
from test_regress import make_cell, matrix, one_error_line, write_run

from harness.report import build_report, report_command, speedups


def gpu_cells():
    """A run on a GPU with NVML energy and a bandwidth timeline, and one speculative engine."""
    cells = matrix(seed=1, hardware="cuda")
    for c in cells:
        c.metrics.nvml = {"joules_per_token": 0.5 / c.config.batch_size, "pcie_rx_bytes_per_s_mean": 2e10}
        if c.config.engine == "specmoe":
            c.metrics.tokens_per_step, c.metrics.acceptance_rate, c.metrics.drafted_tokens = 3.5, 0.7, 100
            c.metrics.nvml["timeline"] = {"t_s": [0.1 * i for i in range(50)],
                                          "pcie_rx_bytes_per_s": [2e10 + 1e9 * (i % 5) for i in range(50)],
                                          "pcie_tx_bytes_per_s": [1e8] * 50,
                                          "sm_util_pct": [None] + [60 + i % 7 for i in range(49)]}
    return cells


def run_cli(*args):
    return CliRunner().invoke(report_command, list(map(str, args)))


def test_cpu_run_writes_markdown_html_and_figures(tmp_path):
    cells = matrix(seed=1) + [make_cell("accelerate", 1, status="skipped")]
    run = write_run(tmp_path, "cpu-run", cells)
    res = run_cli(run)
    assert res.exit_code == 0, res.output
    out = run / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["h2d_bytes_per_token.png", "speedup.png", "throughput.png"]
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "NVML bandwidth over time: no NVML samples in this run (no NVIDIA GPU or NVML unavailable)" in md
    assert "no NVML samples in this run (no NVIDIA GPU or NVML unavailable): energy per token not drawn" in md
    assert "no speculative engine in this run" in md
    # every engine has a tokens/s column in every batch row
    table = md.split("**Output tokens/s**")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| batch | offload | lru | specmoe |" and len(table) == 4
    assert all("| - " not in row for row in table[2:])
    assert "| accelerate-tiny-mixtral-random-float32-b1-cpu-synthetic-ids-p32-n32-s0 | skipped | RuntimeError: boom |" in md
    # the headline table compares every engine at the largest batch
    headline = md.split("**At batch size 4**")[1].split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0].strip("| ") for row in headline[2:]] == ["offload", "lru", "specmoe"]
    assert 1.4 < float(headline[3].split(" | ")[2].rstrip("x")) < 1.6  # lru: 1.5x offload, give or take noise
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and not re.search(r'src="(?!data:)', page)


def test_absent_nvml_reason_recorded_by_the_cells_is_quoted(tmp_path):
    cells = matrix(seed=1)
    for c in cells:
        c.metrics.nvml = {"nvml_absent": "hardware 'cpu' is not an NVIDIA GPU: NVML metrics not measured"}
    blocks = build_report(tmp_path, cells, {}, tmp_path / "out")
    assert "NVML bandwidth over time: no NVML samples in this run (hardware 'cpu' is not an NVIDIA GPU: NVML " \
           "metrics not measured), so nothing is drawn" in [b.text for b in blocks if b.kind == "note"]


def test_speedup_is_over_offload_at_same_batch():
    sp = speedups(matrix(seed=1, n=2, noise=0.0))
    panel = sp["tiny-mixtral-random on cpu"]
    assert "offload" not in panel
    assert [round(v, 3) for _, v, _ in panel["lru"]] == [1.5, 1.5]
    assert [round(v, 3) for _, v, _ in panel["specmoe"]] == [2.2, 2.2]


def test_gpu_run_draws_energy_speculation_and_nvml_timeline(tmp_path):
    run = write_run(tmp_path, "gpu-run", gpu_cells())
    res = run_cli(run, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    pngs = {p.name for p in (tmp_path / "rep").glob("*.png")}
    assert pngs == {"throughput.png", "speedup.png", "h2d_bytes_per_token.png", "speculation.png",
                    "energy_per_token.png", "nvml_timeline.png"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "NVML bandwidth over time for specmoe-tiny-mixtral-random-float32-b4-cuda" in md
    assert "**Energy per output token (J)**" in md and "no NVML" not in md


def test_gpu_run_with_nvml_summaries_but_no_timeline_says_so(tmp_path):
    cells = gpu_cells()
    for c in cells:
        c.metrics.nvml.pop("timeline", None)
        c.metrics.nvml["samples"] = 120
    run = write_run(tmp_path, "gpu-run", cells)
    assert run_cli(run).exit_code == 0
    md = (run / "report" / "report.md").read_text()
    assert "kept NVML summaries only, no readings over time" in md and "energy_per_token.png" in md


def test_chosen_nvml_cell_without_readings_says_so(tmp_path):
    run = write_run(tmp_path, "gpu-run", gpu_cells())
    key = make_cell("lru", 1, hardware="cuda").config.key()
    assert run_cli(run, "--nvml-cell", key).exit_code == 0
    md = (run / "report" / "report.md").read_text()
    assert f"no NVML samples in this run (no NVIDIA GPU or NVML unavailable), so nothing is drawn for cell {key}" in md
    assert not (run / "report" / "nvml_timeline.png").exists()


def test_run_without_offload_says_why_no_speedup(tmp_path):
    cells = [c for c in matrix(seed=1) if c.config.engine != "offload"]
    blocks = build_report(tmp_path, cells, {}, tmp_path / "out")
    notes = [b.text for b in blocks if b.kind == "note"]
    assert "no `offload` cells to compare against: speedup not drawn" in notes
    assert not (tmp_path / "out" / "speedup.png").exists()


def test_truncated_cell_file_is_skipped_with_a_warning(tmp_path):
    run = write_run(tmp_path, "r", matrix(seed=1))
    victim = sorted((run / "cells").glob("*.json"))[0]
    victim.write_text(victim.read_text()[:-40])
    res = run_cli(run)
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert victim.name in line and "corrupt or truncated" in line
    assert "5 cells" in (run / "report" / "report.md").read_text()  # the other cells are all in the report


def test_unknown_nvml_cell_and_missing_run(tmp_path):
    run = write_run(tmp_path, "r", matrix(seed=1))
    assert "--nvml-cell 'nope'" in one_error_line(run_cli(run, "--nvml-cell", "nope"))
    assert "no such directory" in one_error_line(run_cli(tmp_path / "missing"))
    (tmp_path / "empty" / "cells").mkdir(parents=True)
    assert "no cell results" in one_error_line(run_cli(tmp_path / "empty"))


if __name__ == "__main__":
    pytest.main([__file__])


def test_cpu_time_figures_say_so_in_the_image_and_coinciding_engines_stay_visible():
    """A reader of the PNG alone must see that the times are CPU times; offload and overlap move the same bytes,
    so their lines coincide, and the one drawn first must still show around the one drawn over it."""
    from harness.report import CPU_TIMES, _styles, collect, draw_panels
    cells = matrix(seed=1) + [make_cell("overlap", b, 100.0 * b ** 0.5, seed=1) for b in (1, 4)]
    for c in cells:
        if c.config.engine in ("offload", "overlap"):
            c.samples["tokens_per_s"] = [100.0 * c.config.batch_size ** 0.5] * 6
            c.metrics.tokens_per_s = c.samples["tokens_per_s"][0]  # exactly the same values
    styles = _styles(r.config.engine for r in cells)
    tps = collect(cells, lambda r: r.metrics.tokens_per_s)
    fig = draw_panels([(tps, "tokens/s")], "Throughput", styles, cpu_times=set(tps))
    (ax,) = fig.axes
    assert CPU_TIMES in ax.get_title() and CPU_TIMES in fig._suptitle.get_text()
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar: the data line of each series
    off, over = lines["offload"], lines["overlap"]
    assert list(off.get_ydata()) == list(over.get_ydata())
    assert off.get_markersize() != over.get_markersize() and off.get_markerfacecolor() == "none"  # ring in ring
    assert off.get_linewidth() != over.get_linewidth()
    assert off.get_linestyle() != over.get_linestyle() and off.get_color() != over.get_color()
    bytes_fig = draw_panels([(collect(cells, lambda r: r.metrics.h2d_bytes_per_token), "bytes")], "Bytes", styles)
    assert CPU_TIMES not in bytes_fig.axes[0].get_title() + bytes_fig._suptitle.get_text()  # bytes are real
    gpu = gpu_cells()
    gpu_fig = draw_panels([(collect(gpu, lambda r: r.metrics.tokens_per_s), "tokens/s")], "Throughput",
                          _styles(r.config.engine for r in gpu), cpu_times=set())
    assert CPU_TIMES not in gpu_fig.axes[0].get_title()
