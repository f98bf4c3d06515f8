"""The metric facts on the schema: every reader of a metric (regress, report, compare, export) takes its unit,
direction, CPU exactness and format from one place."""
import json

import pytest
from click.testing import CliRunner
from test_regress import matrix, write_run

from engines.errors import BadInput
from harness.regress import regress_command
from harness.schema import METRIC_FACTS, METRIC_FIELDS, format_value, metric_fact


def test_every_metric_field_and_numeric_nvml_key_has_facts():
    from harness.nvml import SUMMARY_KEYS
    assert set(METRIC_FIELDS) <= set(METRIC_FACTS)
    assert {"nvml.joules_per_token", "nvml.power_w_mean", "nvml.pcie_rx_bytes_per_s_mean"} <= set(METRIC_FACTS)
    assert {n[5:] for n in METRIC_FACTS if n.startswith("nvml.")} <= set(SUMMARY_KEYS)
    assert "nvml.nvml_notes" not in METRIC_FACTS and "nvml.timeline" not in METRIC_FACTS  # not numbers
    for fact in METRIC_FACTS.values():
        assert fact.better in ("higher", "lower", None) and fact.unit and fact.format


def test_facts_say_what_a_reader_relies_on():
    assert metric_fact("tokens_per_s").better == "higher" and metric_fact("ttft_ms").unit == "ms"
    assert metric_fact("h2d_gb_per_s").unit == "GB/s" and metric_fact("max_abs_logit_diff").unit == "logit"
    assert metric_fact("h2d_bytes_per_token").cpu_exact and not metric_fact("tokens_per_s").cpu_exact
    assert metric_fact("nvml.joules_per_token").better == "lower"
    with pytest.raises(BadInput, match="unknown metric 'tokens_per_sec'.*did you mean 'tokens_per_s'"):
        metric_fact("tokens_per_sec")


def test_one_value_formatter():
    assert format_value(None, ".1f") == "-" and format_value(float("nan"), "bytes") == "-"
    assert format_value(3 * 2**20, "bytes") == "3.00 MiB" and format_value(512, "bytes") == "512 B"
    assert format_value(12345, "count") == "12,345" and format_value(0.25, "pct") == "25.0%"
    assert format_value(True, "bool") == "yes" and format_value(1.5, "x") == "1.50x"
    assert metric_fact("tokens_per_s").text(25.04) == "25.0"


def test_regress_json_out_labels_units_from_the_facts(tmp_path):
    """Old code: h2d_gb_per_s was labelled tokens/s (every *_per_s) and max_abs_logit_diff a count."""
    cells = matrix(seed=1)
    for c in cells:
        c.metrics.h2d_gb_per_s, c.metrics.max_abs_logit_diff = 1.5, 1e-6
    base, cand = write_run(tmp_path, "base", cells), write_run(tmp_path, "cand", cells)
    res = CliRunner().invoke(regress_command, ["--baseline", str(base), "--candidate", str(cand), "--metric",
                                               "h2d_gb_per_s", "--metric", "max_abs_logit_diff", "--metric",
                                               "tokens_per_s", "--json-out", str(tmp_path / "gh.json")])
    assert res.exit_code == 0, res.output
    entries = json.loads((tmp_path / "gh.bigger.json").read_text()) + \
        json.loads((tmp_path / "gh.smaller.json").read_text())
    units = {e["name"].split()[-1]: e["unit"] for e in entries}
    assert units == {"h2d_gb_per_s": "GB/s", "max_abs_logit_diff": "logit", "tokens_per_s": "tokens/s"}
