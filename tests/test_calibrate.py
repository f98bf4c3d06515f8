"""Calibration without a GPU: rows against the truth, the factor and best path it picks, the file the tracker reads,
and the command's one-line refusals (no CUDA here: exit 2, never a traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from harness.calibrate import (GIB, build_calibration, calibrate_command, format_table, rows_for, save_calibration,
                               summarise)
from harness.nvml import COUNTER, Metric, NvmlTracker, Source, empty_summary

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def copy_summary(rx: dict[str, float | None], tx: dict[str, float | None] | None = None,
                 duration_s: float = 1.0) -> dict:
    """A tracker summary of a copy region: bytes per path key, the rest absent."""
    s = empty_summary()
    s["duration_s"] = duration_s
    for key, value in {**rx, **(tx or {})}.items():
        if value is None:
            s["nvml_absent"][key.replace("_bytes", "_bytes_per_s") if key.startswith(("pcie", "gpm")) else key] = \
                "GPM is not supported on this GPU (Hopper or newer needed)"
        s[key] = value
    return s


def test_rows_compare_every_path_with_the_bytes_copied():
    true = 4 * GIB
    s = copy_summary({"pcie_rx_bytes": 1.1 * true, "gpm_pcie_rx_bytes": None, "field_pcie_rx_bytes": 0.95 * true},
                     {"pcie_tx_bytes": 0.001 * true}, duration_s=0.08)
    s["pcie_rx_bytes_per_s_p50"] = 1.2 * true / 0.08
    rows = {r["path"]: r for r in rows_for(s, "h2d", "pinned", GIB, copies=4, true_s=0.08)}
    assert set(rows) == {"pcie_throughput_rx", "gpm_pcie_rx", "field_pcie_count_rx"}  # the GPU receives H2D
    r = rows["pcie_throughput_rx"]
    assert r["true_bytes"] == true and r["true_bytes_per_s"] == pytest.approx(true / 0.08)
    assert r["error_pct"] == pytest.approx(10.0) and r["rate_error_pct"] == pytest.approx(10.0)
    assert r["p50_error_pct"] == pytest.approx(20.0)
    assert r["factor"] == pytest.approx(1 / 1.1)
    assert r["opposite_bytes"] == pytest.approx(0.001 * true)
    assert rows["field_pcie_count_rx"]["error_pct"] == pytest.approx(-5.0)
    gpm = rows["gpm_pcie_rx"]
    assert gpm["counter_bytes"] is None and gpm["factor"] is None and gpm["error_pct"] is None
    assert gpm["absent"] == "GPM is not supported on this GPU (Hopper or newer needed)"


def test_rows_without_nvml_carry_its_reason():
    s = empty_summary()
    s.update(duration_s=1.0, nvml_absent="NVML library not found: no NVIDIA driver on this machine")
    rows = rows_for(s, "d2h", "pageable", GIB, copies=2, true_s=0.5)
    assert [r["path"] for r in rows] == ["pcie_throughput_tx", "gpm_pcie_tx", "field_pcie_count_tx"]
    assert all(r["absent"].startswith("NVML library not found") and r["factor"] is None for r in rows)


def fake_rows(path: str, errors_by_size: dict[int, float], kind: str = "pinned", direction: str = "h2d") -> list:
    rows = []
    for size, err in errors_by_size.items():
        true = size * 10
        side = "pcie_rx_bytes" if direction == "h2d" else "pcie_tx_bytes"
        key = {"pcie_throughput": side, "gpm_pcie": "gpm_" + side, "field_pcie_count": "field_" + side}
        s = copy_summary({key[path]: true * (1 + err / 100)})
        rows += [r for r in rows_for(s, direction, kind, size, 10, 1.0) if r["path"].startswith(path)]
    return rows


def test_the_best_path_is_the_steady_one_and_its_factor_comes_from_large_pinned_copies():
    sizes = {256 * 2 ** 20: 8.0, GIB: 8.0, 4 * GIB: 8.0}
    rows = (fake_rows("field_pcie_count", sizes)  # a steady +8% bias: a factor removes it
            + fake_rows("gpm_pcie", {256 * 2 ** 20: -6.0, GIB: 2.0, 4 * GIB: 9.0})  # closer, but it scatters
            + fake_rows("pcie_throughput", {GIB: 14.0, 4 * GIB: 14.0})
            + fake_rows("pcie_throughput", {GIB: 30.0}, kind="pageable"))
    doc = summarise(rows)
    field = doc["paths"]["field_pcie_count_rx"]
    assert field["factor"] == pytest.approx(1 / 1.08) and field["calibrated_error_pct"] == pytest.approx(0, abs=1e-9)
    assert field["basis"] == "pinned copies >= 1 GiB" and field["rows"] == 2
    assert doc["paths"]["gpm_pcie_rx"]["error_pct"] == pytest.approx(5.5)  # median of +2 and +9
    # pageable rows do not set the factor but do count in the worst error
    throughput = doc["paths"]["pcie_throughput_rx"]
    assert throughput["factor"] == pytest.approx(1 / 1.14) and throughput["max_abs_error_pct"] == pytest.approx(30)
    assert doc["best"]["rx"]["path"] == "field_pcie_count_rx"
    assert "tx" not in doc["best"]
    assert doc["paths"]["gpm_pcie_tx"] == {"direction": "tx", "factor": None, "absent": "not run"}


def test_table_shows_every_paths_error_and_the_verdict():
    rows = fake_rows("field_pcie_count", {GIB: 8.0}) + fake_rows("gpm_pcie", {GIB: 12.0})
    doc = build_calibration(rows, env={"gpu_name": "NVIDIA H200"})
    table = format_table(doc)
    assert "field_pcie_count_rx" in table and "+8.0" in table and "+12.0" in table
    assert "host-to-device: within 10% of the true rate uncalibrated: field_pcie_count_rx;" in table
    assert "device-to-host: no counter path read anything" in table


class Counter(Source):
    name = "field"
    metrics = (Metric("field_pcie_rx_bytes", COUNTER, stats=(), wrap_bits=32),)

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def sample(self):
        self.n += 1
        return (self.n * 1000,)


def test_saved_file_is_what_the_tracker_applies(tmp_path):
    rows = fake_rows("field_pcie_count", {GIB: 25.0, 4 * GIB: 25.0}) + fake_rows("gpm_pcie", {GIB: 3.0, 4 * GIB: -9.0})
    doc = build_calibration(rows, env={"gpu_name": "NVIDIA H200"}, settings={"sizes": [GIB, 4 * GIB]})
    path = save_calibration(doc, tmp_path / "calibration" / "nvidia-h200.json")
    assert [p.name for p in path.parent.iterdir()] == ["nvidia-h200.json"]  # no temporary file left behind
    assert json.loads(path.read_text())["best"]["rx"]["path"] == "field_pcie_count_rx"

    tracker = NvmlTracker(sources=[Counter()], calibration=path)
    with tracker.track():
        time.sleep(0.03)
    s = tracker.summary()
    assert s["pcie_rx_bytes_calibrated"] == pytest.approx(s["field_pcie_rx_bytes"] / 1.25)
    assert s["calibration"]["file"] == str(path) and s["calibration"]["gpu_name"] == "NVIDIA H200"
    assert s["calibration"]["rx"]["factor"] == pytest.approx(0.8)


def test_every_option_has_help():
    assert calibrate_command.help and calibrate_command.name == "calibrate"
    for param in calibrate_command.params:
        assert param.help, param.name
    assert {"device", "sizes", "out", "as_json"} <= {p.name for p in calibrate_command.params}


@NO_CUDA
def test_calibrate_without_cuda_says_so_in_one_line():
    result = CliRunner().invoke(calibrate_command, ["--out", "x.json"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: calibrate needs a CUDA device; this machine has none"


@pytest.mark.parametrize("args, message", [
    (["--sizes", "12XB"], "bad size '12XB'"),
    (["--sizes", ","], "--sizes is empty"),
    (["--kinds", "pinned,mapped"], "unknown --kinds mapped"),
    (["--seconds", "0"], "must be greater than zero"),
    (["--device", "cpu"], "--device 'cpu' is not a CUDA device"),
    (["--device", "tpu:0"], "unknown hardware 'tpu:0'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(calibrate_command, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


@NO_CUDA
def test_module_entry_runs_without_installing_and_refuses_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "harness.calibrate", "--out", str(tmp_path / "c.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "Error: calibrate needs a CUDA device; this machine has none"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "c.json").exists()
