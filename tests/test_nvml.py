"""The NVML tracker without a GPU: summary maths (integrals, percentiles), counter wraps and resets, energy per
token, calibration factors, and every metric absent - never 0 - when NVML or a counter path is missing."""
from __future__ import annotations

import itertools
import time

import pytest

from harness import nvml
from harness.nvml import (COUNTER, INSTANT, INTERVAL, SUMMARY_KEYS, Metric, NvmlTracker, Source, Unavailable,
                          counter_delta, integrate_instant, integrate_interval, percentile, reduce_metric)

MEASURED_KEYS = [k for k in SUMMARY_KEYS if k not in
                 ("sample_interval_s", "output_tokens", "duration_s", "nvml_absent", "nvml_notes")]


class Constant(Source):
    """A PCIe-throughput-like path reading a constant rate."""

    name = "fake_rate"

    def __init__(self, value: float, metric: Metric | None = None) -> None:
        super().__init__()
        self.value = value
        self.metrics = (metric or Metric("pcie_rx_bytes_per_s", INSTANT, integral="pcie_rx_bytes"),)

    def sample(self):
        return (self.value,)


class Script(Source):
    """Replays raw readings (the last one repeats), like a hardware counter."""

    def __init__(self, name: str, metric: Metric, values: list[float]) -> None:
        super().__init__()
        self.name, self.metrics = name, (metric,)
        self._values = values
        self._it = iter(())
        self.reset()

    def reset(self) -> None:
        self._it = itertools.chain(self._values, itertools.repeat(self._values[-1]))

    def sample(self):
        return (next(self._it),)


class Broken(Source):
    name = "broken"

    def __init__(self, metric: Metric, reason: str) -> None:
        super().__init__()
        self.metrics, self.reason = (metric,), reason

    def sample(self):
        raise Unavailable(self.reason)


def tracked(sources, seconds=0.06, **kwargs) -> NvmlTracker:
    tracker = NvmlTracker(sources=sources, calibration=kwargs.pop("calibration", None), **kwargs)
    with tracker.track():
        time.sleep(seconds)
    return tracker


# -- summary maths -------------------------------------------------------------------------------------------------

def test_percentiles_interpolate_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 90) == 7.0


def test_rate_integrates_by_trapezoids_clipped_to_the_region():
    ts = [i / 10 for i in range(11)]
    ramp = [100.0 * t for t in ts]  # bytes/s rising linearly: 100 t
    assert integrate_instant(ts, ramp, 0.0, 1.0) == pytest.approx(50.0)
    assert integrate_instant(ts, ramp, 0.25, 0.75) == pytest.approx(25.0)  # 50 (0.75^2 - 0.25^2)
    # the first and last readings stand for the region's edges beyond them
    assert integrate_instant([0.1, 0.9], [10.0, 10.0], 0.0, 1.0) == pytest.approx(10.0)


def test_interval_rates_count_whole_pairs_and_weight_percentages_by_overlap():
    ts, vs = [0.0, 1.0, 2.0], [None, 10.0, 20.0]  # 10 B/s over (0, 1], 20 B/s over (1, 2]
    assert integrate_interval(ts, vs, 0.0, 2.0) == pytest.approx((30.0, 30.0, 2.0))
    # a region ending inside the last pair: its bytes are all counted (nothing moves after the region),
    # but a percentage is weighted by the part inside
    assert integrate_interval(ts, vs, 0.0, 1.5) == pytest.approx((30.0, 20.0, 1.5))


def test_reduce_rate_gives_units_stats_and_integrated_bytes():
    metric = Metric("pcie_rx_bytes_per_s", INSTANT, scale=1024, integral="pcie_rx_bytes")
    readings = [(0.0, 1000.0), (0.5, 3000.0), (1.0, 1000.0)]  # KiB/s
    out, notes = reduce_metric(metric, readings, 0.0, 1.0)
    assert out["pcie_rx_bytes"] == pytest.approx(2000 * 1024)  # trapezoids: (1000+3000)/2 * 0.5 * 2
    assert out["pcie_rx_bytes_per_s_mean"] == pytest.approx(2000 * 1024)
    assert out["pcie_rx_bytes_per_s_p50"] == 1000 * 1024
    assert out["pcie_rx_bytes_per_s_max"] == 3000 * 1024
    assert notes == []


# -- counters: wraps and resets --------------------------------------------------------------------------------------

def test_32_bit_wrap_counts_the_bytes_across_it():
    assert counter_delta([4294967000, 200], 32) == (496, 1, 0)
    # wraps between most readings, as a 55 GB/s copy gives a 32-bit byte counter every ~70 ms
    readings = [4_000_000_000, 1_000_000_000, 3_000_000_000, 500_000_000, 100]
    steps = [2 ** 32 - 3_000_000_000, 2_000_000_000, 2 ** 32 - 2_500_000_000, 2 ** 32 - 499_999_900]
    assert counter_delta(readings, 32) == (sum(steps), 3, 0)


def test_a_counter_above_the_declared_width_is_wider():
    assert counter_delta([2 ** 33, 2 ** 33 + 5], 32) == (5, 0, 0)


def test_energy_reset_never_gives_negative_energy():
    delta, wraps, resets = counter_delta([1000, 1500, 100, 400], None)  # mJ; the driver reloaded after 1500
    assert (delta, wraps, resets) == (900, 0, 1)  # 500, then 100 since the restart, then 300
    out, notes = reduce_metric(Metric("energy_j", COUNTER, scale=1e-3, stats=()),
                               [(0.0, 1000), (0.1, 1500), (0.2, 100), (0.3, 400)], 0.0, 0.3)
    assert out["energy_j"] == pytest.approx(0.9)
    assert any("reset" in n for n in notes)


def test_tracker_corrects_a_wrapping_field_counter():
    step = 10 ** 9
    values = [(2 ** 32 - 3 * step + i * step) % 2 ** 32 for i in range(200)]  # wraps on the 3rd step
    metric = Metric("field_pcie_rx_bytes", COUNTER, stats=(), rate="field_pcie_rx_bytes_per_s_mean", wrap_bits=32)
    tracker = tracked([Script("field", metric, values)], keep_trace=True)
    readings = len(tracker.trace())
    s = tracker.summary()
    assert readings >= 2
    assert s["field_pcie_rx_bytes"] == step * (readings - 1)
    assert s["field_pcie_rx_bytes_per_s_mean"] == pytest.approx(s["field_pcie_rx_bytes"] / s["duration_s"])
    if readings > 3:
        assert any("wrapped" in n for n in s["nvml_notes"])


# -- the tracker with fake sources ---------------------------------------------------------------------------------

def test_summary_declares_every_key_and_leaves_unmeasured_ones_none():
    tracker = tracked([Constant(5000.0)])
    s = tracker.summary(output_tokens=10)
    assert tuple(s) == SUMMARY_KEYS
    assert s["pcie_rx_bytes_per_s_mean"] == pytest.approx(5000.0)
    assert s["pcie_rx_bytes"] == pytest.approx(5000.0 * s["duration_s"])
    # nothing else was measured: None with a reason, never 0
    for key in MEASURED_KEYS:
        if key not in ("samples", "sample_interval_s_achieved") and (not key.startswith("pcie_rx_bytes")
                                                                     or "calibrated" in key):
            assert s[key] is None, key
    assert s["nvml_absent"]["joules_per_token"] == "energy is absent"


def test_sampler_reads_at_its_interval_and_each_region_starts_afresh():
    tracker = NvmlTracker(interval_s=0.005, keep_trace=True, calibration=None, sources=[Constant(1.0)])
    with tracker.track():
        time.sleep(0.1)
    s = tracker.summary()
    assert s["samples"] >= 8  # ~20 expected; a loaded CI machine may lose some
    assert 0.004 <= s["sample_interval_s_achieved"] <= 0.02
    trace = tracker.trace()
    assert trace[0]["t_s"] <= 0 <= trace[-1]["t_s"] - s["duration_s"] + 0.01  # readings bracket the region
    assert trace[0] == {"t_s": trace[0]["t_s"], "source": "fake_rate", "pcie_rx_bytes_per_s": 1.0}
    with tracker.track():
        pass
    assert len(tracker.trace()) < len(trace)


def test_trace_is_kept_only_when_asked():
    assert tracked([Constant(1.0)]).trace() is None


def test_slow_paths_respect_their_minimum_interval():
    metric = Metric("sm_util_pct", INTERVAL)

    class Gpm(Constant):
        name = "fake_gpm"
        min_interval_s = 0.03

    tracker = tracked([Gpm(50.0, metric)], seconds=0.2, keep_trace=True)
    ts = [r["t_s"] for r in tracker.trace()]
    assert all(b - a >= 0.029 for a, b in zip(ts, ts[1:]))
    assert tracker.summary()["sm_util_pct_mean"] == pytest.approx(50.0)


def test_energy_per_token_from_the_energy_counter():
    energy = Metric("energy_j", COUNTER, scale=1e-3, stats=())
    values = [1_000_000 + 250 * i for i in range(1000)]  # mJ, +0.25 J per reading
    tracker = tracked([Script("energy", energy, values)], keep_trace=True)
    n = len(tracker.trace())
    s = tracker.summary(output_tokens=4)
    assert s["energy_j"] == pytest.approx(0.25 * (n - 1))
    assert s["energy_source"] == "total_energy_counter"
    assert s["joules_per_token"] == pytest.approx(s["energy_j"] / 4)
    assert tracker.summary()["joules_per_token"] is None
    assert tracker.summary()["nvml_absent"]["joules_per_token"] == "no output token count given"


def test_energy_falls_back_to_integrated_power():
    power = Metric("power_w", INSTANT, scale=1e-3)
    energy = Metric("energy_j", COUNTER, scale=1e-3, stats=())
    broken = Broken(energy, "nvmlDeviceGetTotalEnergyConsumption: Not Supported")
    tracker = tracked([Constant(200_000.0, power), broken])
    s = tracker.summary(output_tokens=2)
    assert s["energy_j"] == pytest.approx(200.0 * s["duration_s"])
    assert s["energy_source"] == "power_integral"
    assert s["joules_per_token"] == pytest.approx(s["energy_j"] / 2)
    assert any("Not Supported" in n for n in s["nvml_notes"])


def test_a_missing_path_is_absent_with_its_reason():
    dram = Metric("dram_bw_util_pct", INTERVAL)
    tracker = tracked([Constant(1.0), Broken(dram, "GPM is not supported on this GPU (Hopper or newer needed)")])
    s = tracker.summary()
    assert s["dram_bw_util_pct_mean"] is None and s["dram_bw_util_pct_max"] is None
    assert s["nvml_absent"]["dram_bw_util_pct"] == "GPM is not supported on this GPU (Hopper or newer needed)"
    assert s["pcie_rx_bytes_per_s_mean"] == pytest.approx(1.0)


def test_calibration_factor_is_applied_and_recorded():
    metric = Metric("field_pcie_rx_bytes", COUNTER, stats=(), wrap_bits=32)
    calibration = {"file": "results/calibration/fake.json", "gpu_name": None, "created_utc": "2026-11-28T00:00:00",
                   "best": {"rx": {"path": "field_pcie_count_rx", "factor": 0.5, "error_pct": 100.0,
                                   "calibrated_error_pct": 0.1}}}
    tracker = tracked([Script("field", metric, [i * 1000 for i in range(1000)])], calibration=calibration)
    s = tracker.summary()
    assert s["pcie_rx_bytes_calibrated"] == pytest.approx(0.5 * s["field_pcie_rx_bytes"])
    assert s["calibration"]["rx"] == {"path": "field_pcie_count_rx", "factor": 0.5, "error_pct": 100.0,
                                      "calibrated_error_pct": 0.1}
    assert s["calibration"]["file"] == "results/calibration/fake.json"
    assert s["pcie_tx_bytes_calibrated"] is None
    assert "no usable tx path" in s["nvml_absent"]["pcie_tx_bytes_calibrated"]


# -- NVML itself absent ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, reason", [("NVMLError_LibraryNotFound", "NVML library not found"),
                                           ("NVMLError_DriverNotLoaded", "driver is not loaded")])
def test_without_nvml_every_metric_is_absent_with_the_reason(monkeypatch, error, reason):
    pynvml = pytest.importorskip("pynvml")

    def fail():
        raise getattr(pynvml, error)()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    tracker = NvmlTracker(0)
    assert not tracker.available
    with tracker.track():
        time.sleep(0.01)
    s = tracker.summary(output_tokens=100)
    assert reason in s["nvml_absent"]
    assert s["duration_s"] >= 0.01  # the host clock still measures the region
    assert all(s[k] is None for k in MEASURED_KEYS)
    tracker.close()
    env = nvml.environment()
    assert env["nvml_available"] is False and reason in env["absent"]["nvml"]
    assert env["gpu_name"] is None


def test_this_machine_without_nvml_runs_and_reports_absent():
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML here is the case under test
        tracker = NvmlTracker()
        with tracker.track():
            pass
        s = tracker.summary(output_tokens=1)
        assert isinstance(s["nvml_absent"], str) and s["energy_j"] is None and s["joules_per_token"] is None
        return
    pynvml.nvmlShutdown()
    pytest.skip("NVML is present on this machine")


def test_gpu_name_names_the_calibration_file():
    assert nvml.calibration_path("NVIDIA H200").as_posix() == "results/calibration/nvidia-h200.json"
    assert nvml.gpu_slug("NVIDIA GeForce RTX 4090 (24GB)") == "nvidia-geforce-rtx-4090-24gb"


def test_a_missing_or_foreign_calibration_file_is_one_clear_error(tmp_path):
    from engines.errors import BadInput
    with pytest.raises(BadInput, match="does not exist; run `specmoe-bench calibrate`"):
        NvmlTracker(sources=[], calibration=tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(BadInput, match="is not a calibration"):
        NvmlTracker(sources=[], calibration=tmp_path / "other.json")


def test_an_energy_counter_that_did_not_advance_is_not_zero_joules():
    energy = Metric("energy_j", COUNTER, scale=1e-3, stats=())
    power = Metric("power_w", INSTANT, scale=1e-3)
    s = tracked([Script("energy", energy, [5000])], seconds=0.02).summary(output_tokens=3)
    assert s["energy_j"] is None and s["joules_per_token"] is None
    assert "did not advance" in s["nvml_absent"]["energy_j"]
    s = tracked([Script("energy", energy, [5000]), Constant(100_000.0, power)], seconds=0.02).summary(3)
    assert s["energy_source"] == "power_integral"
    assert s["energy_j"] == pytest.approx(100.0 * s["duration_s"])
    assert any("did not advance" in n for n in s["nvml_notes"])


def test_a_region_too_short_for_a_path_is_flagged():
    class Gpm(Constant):
        name = "fake_gpm"
        min_region_s = 0.5

    s = tracked([Gpm(1.0, Metric("sm_util_pct", INTERVAL))], seconds=0.01).summary()
    assert any(n.startswith("fake_gpm: the region lasted") for n in s["nvml_notes"])


def test_timeline_puts_every_path_on_one_grid_for_the_report():
    rate = Constant(2048.0, Metric("pcie_rx_bytes_per_s", INSTANT, scale=1024, integral="pcie_rx_bytes"))
    counter = Script("field", Metric("field_pcie_tx_bytes", COUNTER, stats=(), rate="field_pcie_tx_bytes_per_s_mean",
                                     wrap_bits=32), [i * 1000 for i in range(10_000)])
    tracker = tracked([rate, counter], seconds=0.1, keep_trace=True)
    s = tracker.summary()
    tl = s["timeline"]
    assert set(tl) == {"t_s", "pcie_rx_bytes_per_s", "field_pcie_tx_bytes_per_s"}
    assert len({len(col) for col in tl.values()}) == 1 and len(tl["t_s"]) >= 2
    assert tl["t_s"][0] == 0 and tl["t_s"][-1] == pytest.approx(s["duration_s"])
    assert all(v == 2048 * 1024 for v in tl["pcie_rx_bytes_per_s"])
    assert all(v is None or v > 0 for v in tl["field_pcie_tx_bytes_per_s"])
    assert tracked([rate]).summary()["timeline"] is None  # only with keep_trace


def test_values_between_readings():
    ts = [0.0, 1.0, 2.0]
    assert nvml.value_at_instant(ts, [0.0, 10.0, 30.0], 1.5) == pytest.approx(20.0)
    assert nvml.value_at_instant(ts, [0.0, 10.0, 30.0], -1.0) == 0.0
    assert nvml.value_at_interval(ts, [None, 10.0, 20.0], 1.5) == 20.0
    assert nvml.value_at_interval(ts, [None, 10.0, 20.0], 0.5) == 10.0
    assert nvml.value_at_interval(ts, [None, 10.0, 20.0], 2.5) is None
