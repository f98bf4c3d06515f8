"""NVML tracker: samples PCIe, DRAM, SM, power, energy and memory counters in background threads around a
measured region and reduces them to per-cell numbers whose keys carry their units.

Each counter path is a small `Source`; the reduction maths (integrals, percentiles, counter wraps and resets)
are plain functions, so all of it is testable with fake sources and no GPU. A metric that was not measured is
None with a reason in `nvml_absent`, never 0.
Over 500 lines on purpose: every counter path (PCIe throughput, GPM, the PCIe count fields, power, energy, memory)
has its own reading rules, and they share one summary declaration and one reduction, which belong together.
"""
from __future__ import annotations

import bisect
import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypedDict

from engines.errors import BadInput

DEFAULT_INTERVAL_S = 0.015
CALIBRATION_DIR = Path("results/calibration")
PERCENTILE_STATS = ("mean", "p50", "p90", "max")

# How a metric's readings reduce over a region.
INSTANT = "instant"  # a reading at its timestamp (power, a 20 ms PCIe window): linear between readings
INTERVAL = "interval"  # the average since the source's previous reading (GPM): constant over that interval
COUNTER = "counter"  # cumulative: the region's value is last - first, corrected for wraps and resets


class Unavailable(Exception):
    """A counter path cannot be read here; the message is the reason the user sees in `nvml_absent`."""


@dataclass(frozen=True)
class Metric:
    name: str  # base of its summary keys, with the unit: "pcie_rx_bytes_per_s"
    kind: str  # INSTANT, INTERVAL or COUNTER
    scale: float = 1.0  # raw reading * scale = value in the unit of `name` (KB/s -> bytes/s)
    stats: tuple[str, ...] = PERCENTILE_STATS  # keys name_mean, name_p50, ...
    integral: str | None = None  # key of the time integral of a rate ("pcie_rx_bytes")
    rate: str | None = None  # counters: key of (delta / elapsed)
    wrap_bits: int | None = None  # counters: hardware width; None means a decrease is a reset, not a wrap
    max_gap_s: float | None = None  # counters: readings further apart than this may have missed a wrap


class Source:
    """One counter path. `sample()` returns raw readings in the order of `metrics` (None for a metric that this
    reading lacks, with the reason in `reasons`) or raises Unavailable."""

    name = "source"
    metrics: tuple[Metric, ...] = ()
    min_interval_s = 0.0  # readings closer than this are skipped (GPM needs > 100 ms per sample pair)
    min_region_s = 0.0  # regions shorter than this get a note: the path cannot resolve them
    blocking = False  # reads that take ~20 ms get their own thread so they do not stretch the others' interval

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def sample(self) -> tuple[float | None, ...]:
        raise NotImplementedError

    def reset(self) -> None:
        """Called when a region starts (GPM forgets its half-open pair)."""

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# The summary, declared once. Rates are time-weighted means over the region; p50/p90/max are over the readings.

class NvmlSummary(TypedDict):
    duration_s: float | None  # the tracked region, host clock
    samples: int | None  # readings of the fast sampler thread
    sample_interval_s: float  # requested
    sample_interval_s_achieved: float | None  # mean gap between the fast thread's readings
    # PCIe, nvmlDeviceGetPcieThroughput (20 ms windows, KiB/s); RX = received by the GPU = host-to-device
    pcie_rx_bytes_per_s_mean: float | None
    pcie_rx_bytes_per_s_p50: float | None
    pcie_rx_bytes_per_s_p90: float | None
    pcie_rx_bytes_per_s_max: float | None
    pcie_rx_bytes: float | None  # integral over the region
    pcie_tx_bytes_per_s_mean: float | None
    pcie_tx_bytes_per_s_p50: float | None
    pcie_tx_bytes_per_s_p90: float | None
    pcie_tx_bytes_per_s_max: float | None
    pcie_tx_bytes: float | None
    # PCIe, GPM (Hopper and newer) over consecutive sample pairs
    gpm_pcie_rx_bytes_per_s_mean: float | None
    gpm_pcie_rx_bytes_per_s_p50: float | None
    gpm_pcie_rx_bytes_per_s_p90: float | None
    gpm_pcie_rx_bytes_per_s_max: float | None
    gpm_pcie_rx_bytes: float | None
    gpm_pcie_tx_bytes_per_s_mean: float | None
    gpm_pcie_tx_bytes_per_s_p50: float | None
    gpm_pcie_tx_bytes_per_s_p90: float | None
    gpm_pcie_tx_bytes_per_s_max: float | None
    gpm_pcie_tx_bytes: float | None
    # PCIe, cumulative count fields (nvmlDeviceGetFieldValues 197/198), wrap-corrected
    field_pcie_rx_bytes: float | None
    field_pcie_rx_bytes_per_s_mean: float | None
    field_pcie_tx_bytes: float | None
    field_pcie_tx_bytes_per_s_mean: float | None
    # the most trustworthy path of each direction times its factor, per the loaded calibration
    pcie_rx_bytes_calibrated: float | None
    pcie_tx_bytes_calibrated: float | None
    # device utilisation
    dram_bw_util_pct_mean: float | None  # GPM: share of the theoretical DRAM bandwidth
    dram_bw_util_pct_p50: float | None
    dram_bw_util_pct_p90: float | None
    dram_bw_util_pct_max: float | None
    sm_util_pct_mean: float | None  # GPM: share of SMs busy
    sm_util_pct_p50: float | None
    sm_util_pct_p90: float | None
    sm_util_pct_max: float | None
    gpu_busy_pct_mean: float | None  # nvmlDeviceGetUtilizationRates: share of time any kernel ran
    gpu_busy_pct_p50: float | None
    gpu_busy_pct_p90: float | None
    gpu_busy_pct_max: float | None
    # power and energy
    power_w_mean: float | None
    power_w_p50: float | None
    power_w_p90: float | None
    power_w_max: float | None
    energy_j: float | None
    energy_source: str | None  # "total_energy_counter" or "power_integral"
    output_tokens: int | None
    joules_per_token: float | None
    device_mem_used_bytes_max: float | None
    calibration: dict[str, Any] | None  # file, GPU, path and factor applied per direction
    nvml_absent: dict[str, str] | str  # metric -> reason; one string when NVML itself is absent
    nvml_notes: list[str]  # wraps, resets, short GPM pairs: things that qualify a number
    timeline: dict[str, list[float | None]] | None  # keep_trace only: NvmlTracker.timeline(), for the report's plot


SUMMARY_KEYS: tuple[str, ...] = tuple(NvmlSummary.__annotations__)


def empty_summary(interval_s: float = DEFAULT_INTERVAL_S, output_tokens: int | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {k: None for k in SUMMARY_KEYS}
    s.update(sample_interval_s=interval_s, output_tokens=output_tokens, nvml_absent={}, nvml_notes=[])
    return s


# Counter paths that calibration compares with true copies: path -> (direction, summary key of its bytes).
COUNTER_PATHS: dict[str, tuple[str, str]] = {
    "pcie_throughput_rx": ("rx", "pcie_rx_bytes"),
    "pcie_throughput_tx": ("tx", "pcie_tx_bytes"),
    "gpm_pcie_rx": ("rx", "gpm_pcie_rx_bytes"),
    "gpm_pcie_tx": ("tx", "gpm_pcie_tx_bytes"),
    "field_pcie_count_rx": ("rx", "field_pcie_rx_bytes"),
    "field_pcie_count_tx": ("tx", "field_pcie_tx_bytes"),
}


# ---------------------------------------------------------------------------------------------------------------
# Reduction maths: pure functions over (timestamp, value) readings.

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def integrate_instant(ts: Sequence[float], vs: Sequence[float], t0: float, t1: float) -> float:
    """Integral over [t0, t1] of the line through the readings (trapezoids), held constant beyond the first and
    last reading: a region starts and ends between readings, and a 20 ms window read at the edge stands for it."""
    if not ts or t1 <= t0:
        return 0.0
    total = 0.0
    if t0 < ts[0]:
        total += vs[0] * (min(ts[0], t1) - t0)
    if t1 > ts[-1]:
        total += vs[-1] * (t1 - max(ts[-1], t0))
    for a, b, va, vb in zip(ts, ts[1:], vs, vs[1:]):
        lo, hi = max(a, t0), min(b, t1)
        if hi <= lo or b <= a:
            continue
        # value of the line at the clipped ends, then one trapezoid
        ya = va + (vb - va) * (lo - a) / (b - a)
        yb = va + (vb - va) * (hi - a) / (b - a)
        total += (ya + yb) / 2 * (hi - lo)
    return total


def integrate_interval(ts: Sequence[float], vs: Sequence[float | None], t0: float,
                       t1: float) -> tuple[float, float, float]:
    """vs[i] is the average over (ts[i-1], ts[i]]; vs[0] and None values cover nothing.
    Returns (whole, weighted, covered): `whole` sums value * length of every interval that overlaps [t0, t1] -
    what a byte counter saw, since the caller synchronised and nothing moves after the region; `weighted` and
    `covered` weight each value by its overlap with the region, for the mean of a percentage."""
    whole = weighted = covered = 0.0
    for a, b, v in zip(ts, ts[1:], vs[1:]):
        if v is None or b <= a:
            continue
        overlap = min(b, t1) - max(a, t0)
        if overlap > 0:
            whole += v * (b - a)
            weighted += v * overlap
            covered += overlap
    return whole, weighted, covered


def counter_delta(values: Sequence[float], wrap_bits: int | None) -> tuple[float, int, int]:
    """Sum of increments of a cumulative counter: (delta, wraps, resets). A decrease is a wrap when the counter has
    a known width (4294967000 -> 200 at 32 bits is +496), otherwise a reset: the counter restarted from zero, so
    the increment is the new value and never negative. A reading beyond the width shows the counter is wider."""
    if wrap_bits is not None and any(v >= 2 ** wrap_bits for v in values):
        wrap_bits = 64
    delta = 0.0
    wraps = resets = 0
    for prev, cur in zip(values, values[1:]):
        step = cur - prev
        if step < 0:
            if wrap_bits is not None:
                step += 2 ** wrap_bits
                wraps += 1
            else:
                step = cur
                resets += 1
        delta += step
    return delta, wraps, resets


def value_at_instant(ts: Sequence[float], vs: Sequence[float], t: float) -> float:
    """The line through the readings at t, held constant beyond the first and last."""
    i = bisect.bisect_left(ts, t)
    if i == 0:
        return vs[0]
    if i == len(ts):
        return vs[-1]
    a, b = ts[i - 1], ts[i]
    return vs[i - 1] + (vs[i] - vs[i - 1]) * (t - a) / (b - a) if b > a else vs[i]


def value_at_interval(ts: Sequence[float], vs: Sequence[float | None], t: float) -> float | None:
    """The value of the interval (ts[i-1], ts[i]] holding t; None before the first pair or after the last."""
    i = bisect.bisect_left(ts, t)
    return vs[i] if 0 < i < len(ts) else None


def reduce_metric(metric: Metric, readings: Sequence[tuple[float, float | None]], t0: float,
                  t1: float) -> tuple[dict[str, float], list[str]]:
    """Summary entries and notes of one metric from its (timestamp, raw value) readings over the region [t0, t1].
    Returns no entries when no reading carried a value."""
    out: dict[str, float] = {}
    notes: list[str] = []
    valid = [(t, v * metric.scale) for t, v in readings if v is not None]
    if not valid:
        return out, notes
    values = [v for _, v in valid]
    if metric.kind == COUNTER:
        # wraps are in the counter's raw units, so scale after the delta
        delta, wraps, resets = counter_delta([v for _, v in readings if v is not None], metric.wrap_bits)
        delta *= metric.scale
        out[metric.name] = delta
        if metric.rate is not None and t1 > t0:
            out[metric.rate] = delta / (t1 - t0)
        if wraps:
            notes.append(f"{metric.name}: counter wrapped {wraps} time(s); corrected")
        ts = [t for t, _ in valid]
        gap = max((b - a for a, b in zip(ts, ts[1:])), default=0.0)
        if metric.max_gap_s is not None and gap > metric.max_gap_s:
            notes.append(f"{metric.name}: readings {gap * 1e3:.0f} ms apart, over the {metric.max_gap_s * 1e3:.0f} ms "
                         "in which the counter can wrap at full PCIe rate: it may undercount")
        if resets:
            notes.append(f"{metric.name}: counter went backwards {resets} time(s) (reset); counted from zero")
        return out, notes
    if metric.kind == INSTANT:
        ts = [t for t, _ in valid]
        integral = integrate_instant(ts, values, t0, t1)
        mean = integral / (t1 - t0) if t1 > t0 else values[0]
        # percentiles over the readings inside the region; the edge readings stand outside it
        inside = [v for t, v in valid if t0 <= t <= t1]
        values = inside or values
    else:  # INTERVAL: the first reading of a pair covers nothing
        ts = [t for t, _ in readings]
        vs = [None if v is None else v * metric.scale for _, v in readings]
        integral, weighted, covered = integrate_interval(ts, vs, t0, t1)
        values = [v for v in vs[1:] if v is not None]
        if covered <= 0 or not values:
            return {}, notes
        if metric.integral is not None and t1 > t0:
            mean = integral / (t1 - t0)
        else:
            mean = weighted / covered
    stats = {"mean": mean, "p50": percentile(values, 50), "p90": percentile(values, 90), "max": max(values)}
    for stat in metric.stats:
        out[f"{metric.name}_{stat}"] = stats[stat]
    if metric.integral is not None:
        out[metric.integral] = integral
    return out, notes


# ---------------------------------------------------------------------------------------------------------------
# NVML sources. Each binds its NVML function once, so a reading costs one ctypes call (which releases the GIL).

class _NvmlSource(Source):
    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__()
        self._nvml, self._handle = nvml, handle

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(self._handle, *args)
        except self._nvml.NVMLError as e:
            raise Unavailable(f"{fn.__name__}: {e}") from None


class PcieThroughputSource(_NvmlSource):
    """nvmlDeviceGetPcieThroughput: bytes over a 20 ms window taken during the call (each call took ~22 ms on the
    H200), in KB/s. We read KB as KiB (as nvitop does); calibration measures the true factor (0.89 on the H200).
    RX is traffic the GPU receives: host-to-device copies."""

    blocking = True
    METRICS = {"rx": (Metric("pcie_rx_bytes_per_s", INSTANT, scale=1024, integral="pcie_rx_bytes"),),
               "tx": (Metric("pcie_tx_bytes_per_s", INSTANT, scale=1024, integral="pcie_tx_bytes"),)}

    def __init__(self, nvml: Any, handle: Any, direction: str) -> None:
        super().__init__(nvml, handle)
        self.name = f"pcie_throughput_{direction}"
        self.metrics = self.METRICS[direction]
        self._counter = nvml.NVML_PCIE_UTIL_RX_BYTES if direction == "rx" else nvml.NVML_PCIE_UTIL_TX_BYTES
        self._fn = nvml.nvmlDeviceGetPcieThroughput

    def sample(self) -> tuple[float | None, ...]:
        return (self._call(self._fn, self._counter),)


class GpmSource(_NvmlSource):
    """GPM metrics (Hopper and newer) computed from consecutive sample pairs; each value is the average over the
    pair. NVML asks for more than 100 ms between the two samples of a pair."""

    name = "gpm"
    min_interval_s = 0.1
    # measured on the H200: a 20 ms copy read ~0%, 60 ms -28%, 390 ms -3% of the true bytes
    min_region_s = 0.5
    metrics = (
        Metric("gpm_pcie_rx_bytes_per_s", INTERVAL, scale=2 ** 20, integral="gpm_pcie_rx_bytes"),  # MiB/s
        Metric("gpm_pcie_tx_bytes_per_s", INTERVAL, scale=2 ** 20, integral="gpm_pcie_tx_bytes"),
        Metric("dram_bw_util_pct", INTERVAL),
        Metric("sm_util_pct", INTERVAL),
    )

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        if not hasattr(nvml, "nvmlGpmSampleAlloc"):
            raise Unavailable("this pynvml has no GPM functions; upgrade nvidia-ml-py")
        if not self._call(nvml.nvmlGpmQueryDeviceSupport).isSupportedDevice:
            raise Unavailable("GPM is not supported on this GPU (Hopper or newer needed)")
        self._ids = (nvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC, nvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
                     nvml.NVML_GPM_METRIC_DRAM_BW_UTIL, nvml.NVML_GPM_METRIC_SM_UTIL)
        try:
            self._prev, self._cur = nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()
        except nvml.NVMLError as e:
            raise Unavailable(f"nvmlGpmSampleAlloc: {e}") from None
        self._get = nvml.c_nvmlGpmMetricsGet_t()  # reused: no allocation per reading
        self._primed = False

    def reset(self) -> None:
        self._primed = False

    def sample(self) -> tuple[float | None, ...]:
        nvml = self._nvml
        self._call(nvml.nvmlGpmSampleGet, self._cur)
        if not self._primed:  # the first sample of a region only opens a pair
            self._primed = True
            self._prev, self._cur = self._cur, self._prev
            return (None,) * len(self._ids)
        get = self._get
        get.version = nvml.NVML_GPM_METRICS_GET_VERSION
        get.numMetrics = len(self._ids)
        get.sample1, get.sample2 = self._prev, self._cur
        for i, metric_id in enumerate(self._ids):
            get.metrics[i].metricId = metric_id
        try:
            nvml.nvmlGpmMetricsGet(get)
        except nvml.NVMLError as e:
            raise Unavailable(f"nvmlGpmMetricsGet: {e}") from None
        self._prev, self._cur = self._cur, self._prev
        values: list[float | None] = []
        for i, metric in enumerate(self.metrics):
            m = get.metrics[i]
            if m.nvmlReturn != 0:
                self.reasons[metric.name] = f"GPM metric {self._ids[i]}: {nvml.NVMLError(m.nvmlReturn)}"
                values.append(None)
            else:
                values.append(m.value)
        return tuple(values)

    def close(self) -> None:
        for sample in (self._prev, self._cur):
            try:
                self._nvml.nvmlGpmSampleFree(sample)
            except self._nvml.NVMLError:
                pass


# nvmlValue_t member per NVML_VALUE_TYPE_*
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class FieldPcieCountSource(_NvmlSource):
    """Cumulative PCIe byte counts (field ids 197 TX / 198 RX). On the H200 they are 32-bit counters that wrap
    about every 70 ms at full PCIe 5 x16 rate (14 wraps in a 1 s copy at 55 GB/s): the 15 ms sampling catches each
    wrap; readings further apart than 50 ms are flagged in the notes."""

    name = "field_pcie_count"
    metrics = (
        Metric("field_pcie_tx_bytes", COUNTER, stats=(), rate="field_pcie_tx_bytes_per_s_mean", wrap_bits=32,
               max_gap_s=0.05),
        Metric("field_pcie_rx_bytes", COUNTER, stats=(), rate="field_pcie_rx_bytes_per_s_mean", wrap_bits=32,
               max_gap_s=0.05),
    )

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        self._ids = [getattr(nvml, "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 197),
                     getattr(nvml, "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 198)]
        self._fn = nvml.nvmlDeviceGetFieldValues

    def sample(self) -> tuple[float | None, ...]:
        values: list[float | None] = []
        for metric, fv in zip(self.metrics, self._call(self._fn, self._ids)):
            if fv.nvmlReturn != 0:
                self.reasons[metric.name] = f"field {fv.fieldId}: {self._nvml.NVMLError(fv.nvmlReturn)}"
                values.append(None)
            else:
                values.append(getattr(fv.value, _VALUE_FIELDS.get(fv.valueType, "ullVal")))
        return tuple(values)


class UtilizationSource(_NvmlSource):
    """nvmlDeviceGetUtilizationRates().gpu: share of the last sample period in which any kernel ran. Coarser than
    GPM's SM utilisation (one busy SM counts as busy), but available on every GPU."""

    name = "utilization"
    metrics = (Metric("gpu_busy_pct", INSTANT),)

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        self._fn = nvml.nvmlDeviceGetUtilizationRates

    def sample(self) -> tuple[float | None, ...]:
        return (self._call(self._fn).gpu,)


class PowerSource(_NvmlSource):
    name = "power"
    metrics = (Metric("power_w", INSTANT, scale=1e-3),)  # mW

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        self._fn = nvml.nvmlDeviceGetPowerUsage

    def sample(self) -> tuple[float | None, ...]:
        return (self._call(self._fn),)


class EnergySource(_NvmlSource):
    """Total energy since the driver loaded, in mJ. It does not wrap (64 bits); a decrease is a driver reload.
    It advances in steps of roughly 100 ms of energy: on the H200 a 20 ms region at 117 W read 12.7 J (or 0 J)."""

    name = "energy"
    min_region_s = 1.0
    metrics = (Metric("energy_j", COUNTER, scale=1e-3, stats=()),)

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        self._fn = nvml.nvmlDeviceGetTotalEnergyConsumption

    def sample(self) -> tuple[float | None, ...]:
        return (self._call(self._fn),)


class MemorySource(_NvmlSource):
    """Device memory used by every process, as NVML sees it (includes other processes and the CUDA context)."""

    name = "memory"
    metrics = (Metric("device_mem_used_bytes", INSTANT, stats=("max",)),)

    def __init__(self, nvml: Any, handle: Any) -> None:
        super().__init__(nvml, handle)
        self._fn = nvml.nvmlDeviceGetMemoryInfo

    def sample(self) -> tuple[float | None, ...]:
        return (self._call(self._fn).used,)


def nvml_sources(nvml: Any, handle: Any) -> tuple[list[Source], dict[str, str]]:
    """Every NVML counter path that constructs on this GPU, and metric -> reason for those that do not."""
    sources: list[Source] = []
    absent: dict[str, str] = {}
    factories: list[tuple[type, tuple]] = [
        (PcieThroughputSource, ("rx",)), (PcieThroughputSource, ("tx",)), (GpmSource, ()),
        (FieldPcieCountSource, ()), (UtilizationSource, ()), (PowerSource, ()), (EnergySource, ()),
        (MemorySource, ()),
    ]
    for cls, args in factories:
        try:
            sources.append(cls(nvml, handle, *args))
        except Unavailable as e:
            metrics = cls.METRICS[args[0]] if cls is PcieThroughputSource else cls.metrics
            absent.update({m.name: str(e) for m in metrics})
    return sources, absent


def probe(sources: Sequence[Source]) -> tuple[list[Source], dict[str, str]]:
    """Read each source once: those that raise are left out, their metrics absent with the reason."""
    kept: list[Source] = []
    absent: dict[str, str] = {}
    for src in sources:
        try:
            src.sample()
        except Unavailable as e:
            absent.update({m.name: str(e) for m in src.metrics})
            src.close()
            continue
        kept.append(src)
    return kept, absent


# ---------------------------------------------------------------------------------------------------------------
# Opening NVML for a torch CUDA device

def _init_failure(nvml: Any, err: Exception) -> str:
    names = {"NVMLError_LibraryNotFound": "NVML library not found: no NVIDIA driver on this machine",
             "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
             "NVMLError_NoPermission": "no permission to use NVML"}
    return names.get(type(err).__name__, f"nvmlInit failed: {err}")


def _handle_for_cuda_index(nvml: Any, index: int) -> Any:
    """NVML numbers every GPU of the machine; torch numbers those CUDA_VISIBLE_DEVICES shows. The PCI bus id
    identifies the same GPU in both."""
    try:
        import torch
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            p = torch.cuda.get_device_properties(index)
            domain, bus, dev = (getattr(p, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
            if None not in (domain, bus, dev):
                return nvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0")
    except ImportError:
        pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


def open_nvml(cuda_index: int = 0) -> tuple[Any, Any]:
    """(pynvml module, device handle), or Unavailable with the reason. Pair with pynvml.nvmlShutdown()."""
    try:
        import pynvml
    except ImportError:
        raise Unavailable("pynvml is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise Unavailable(_init_failure(pynvml, e)) from None
    try:
        return pynvml, _handle_for_cuda_index(pynvml, cuda_index)
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        raise Unavailable(f"no NVML device for cuda:{cuda_index}: {e}") from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200', the calibration file's name."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def calibration_path(gpu_name: str, root: Path = CALIBRATION_DIR) -> Path:
    return Path(root) / f"{gpu_slug(gpu_name)}.json"


def load_calibration(path: str | Path) -> dict[str, Any]:
    """A file `specmoe-bench calibrate` wrote; BadInput (one line) when it is missing or not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"calibration file {str(path)!r} does not exist; run `specmoe-bench calibrate`") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"calibration file {str(path)!r} cannot be read: {e}") from None
    if not isinstance(doc, dict) or "best" not in doc:
        raise BadInput(f"calibration file {str(path)!r} is not a calibration (no 'best' entry)")
    doc["file"] = str(path)
    return doc


def environment(cuda_index: int = 0) -> dict[str, Any]:
    """GPU, driver and CUDA facts for a result file. Every field NVML cannot give is None, with the reason in
    `absent`."""
    env: dict[str, Any] = {"gpu_name": None, "driver_version": None, "cuda_version": None, "torch_version": None,
                           "nvml_version": None, "nvml_available": False, "gpm_supported": None,
                           "pcie_link_generation": None, "pcie_link_width": None, "device_mem_total_bytes": None,
                           "absent": {}}
    try:
        import torch
        env["cuda_version"], env["torch_version"] = torch.version.cuda, torch.__version__
        if torch.version.cuda is None:
            env["absent"]["cuda_version"] = "this torch build has no CUDA"
    except ImportError:
        env["absent"]["cuda_version"] = "torch is not installed"
    try:
        nvml, handle = open_nvml(cuda_index)
    except Unavailable as e:
        env["absent"]["nvml"] = str(e)
        return env
    env["nvml_available"] = True
    queries = {
        "gpu_name": lambda: _text(nvml.nvmlDeviceGetName(handle)),
        "driver_version": lambda: _text(nvml.nvmlSystemGetDriverVersion()),
        "nvml_version": lambda: _text(nvml.nvmlSystemGetNVMLVersion()),
        "gpm_supported": lambda: bool(nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice),
        "pcie_link_generation": lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
        "pcie_link_width": lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
        "device_mem_total_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total,
    }
    try:
        for key, query in queries.items():
            try:
                env[key] = query()
            except (nvml.NVMLError, AttributeError) as e:
                env["absent"][key] = str(e)
    finally:
        nvml.nvmlShutdown()
    return env


# ---------------------------------------------------------------------------------------------------------------
# The tracker

class NvmlTracker:
    """Samples every available counter path around `with tracker.track():` (the caller synchronises the device
    before the block ends), then `summary(output_tokens)` gives an NvmlSummary. Each track() starts afresh.

    calibration: "auto" loads results/calibration/<gpu>.json when present; a path or a loaded dict; None for none.
    sources: counter paths to use instead of NVML's (tests pass fakes)."""

    def __init__(self, device_index: int = 0, interval_s: float = DEFAULT_INTERVAL_S, keep_trace: bool = False,
                 calibration: str | Path | dict | None = "auto", sources: Sequence[Source] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device_index, self.interval_s, self.keep_trace = device_index, interval_s, keep_trace
        self.absent_reason: str | None = None  # NVML itself unavailable
        self.gpu_name: str | None = None
        self._nvml: Any = None
        self._absent: dict[str, str] = {}
        if sources is None:
            try:
                self._nvml, handle = open_nvml(device_index)
            except Unavailable as e:
                self.absent_reason = str(e)
                sources = []
            else:
                try:
                    self.gpu_name = _text(self._nvml.nvmlDeviceGetName(handle))
                except self._nvml.NVMLError:
                    pass
                sources, self._absent = nvml_sources(self._nvml, handle)
        self._sources, absent = probe(sources)
        self._absent.update(absent)
        self._calibration, self._calibration_absent = self._resolve_calibration(calibration)
        self._readings: dict[Source, list[tuple[float, tuple]]] = {s: [] for s in self._sources}
        self._errors: dict[Source, str] = {}
        self._region: tuple[float, float] | None = None

    def _resolve_calibration(self, calibration: str | Path | dict | None) -> tuple[dict | None, str | None]:
        if calibration is None:
            return None, "no calibration requested"
        if isinstance(calibration, dict):
            return calibration, None
        if calibration == "auto":
            if self.gpu_name is None:
                return None, "no GPU name to look up a calibration file"
            path = calibration_path(self.gpu_name)
            if not path.exists():
                return None, f"no calibration at {path}; run `specmoe-bench calibrate`"
            return load_calibration(path), None
        return load_calibration(calibration), None

    @property
    def available(self) -> bool:
        return self.absent_reason is None

    def close(self) -> None:
        for src in self._sources:
            src.close()
        self._sources = []
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> "NvmlTracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- sampling ---------------------------------------------------------------------------------------------
    @contextmanager
    def track(self) -> Iterator["NvmlTracker"]:
        self._readings = {s: [] for s in self._sources}
        self._errors = {}
        for src in self._sources:
            src.reset()
        # blocking reads (20 ms PCIe windows) each get a thread, so the fast metrics keep their interval
        fast = [s for s in self._sources if not s.blocking]
        groups = ([fast] if fast else []) + [[s] for s in self._sources if s.blocking]
        stop = threading.Event()
        ready = [threading.Event() for _ in groups]
        threads = [threading.Thread(target=self._poll, args=(g, stop, r), name=f"nvml-sampler-{i}", daemon=True)
                   for i, (g, r) in enumerate(zip(groups, ready))]
        for th in threads:
            th.start()
        for r in ready:  # every path has a reading before the region starts
            r.wait()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            t1 = time.perf_counter()
            stop.set()
            for th in threads:
                th.join()
            self._region = (t0, t1)

    def _poll(self, group: list[Source], stop: threading.Event, ready: threading.Event) -> None:
        last: dict[Source, float] = {}
        next_t = time.perf_counter()
        try:
            while True:
                for src in group:
                    self._read(src, last, force=False)
                ready.set()
                next_t += self.interval_s
                delay = next_t - time.perf_counter()
                if delay < 0:  # a read ran long: restart the schedule instead of bursting to catch up
                    next_t, delay = time.perf_counter(), 0.0
                if stop.wait(delay):
                    break
            # a closing reading of each path, the quick ones first (a 32-bit counter must not wait on GPM);
            # a GPM pair still needs its minimum length
            for src in sorted(group, key=lambda s: s.min_interval_s):
                wait = src.min_interval_s - (time.perf_counter() - last.get(src, float("-inf")))
                if wait > 0:
                    time.sleep(wait)
                self._read(src, last, force=True)
        finally:
            ready.set()

    def _read(self, src: Source, last: dict[Source, float], force: bool) -> None:
        start = time.perf_counter()
        if not force and start - last.get(src, float("-inf")) < src.min_interval_s:
            return
        try:
            values = src.sample()
        except Exception as e:  # noqa: BLE001 - a failing counter must not take the benchmark down
            self._errors.setdefault(src, str(e) if isinstance(e, Unavailable) else f"{type(e).__name__}: {e}")
            return
        last[src] = start
        # the reading stands for the middle of the call (a 20 ms PCIe window is taken during it)
        self._readings[src].append(((start + time.perf_counter()) / 2, values))

    # -- results ----------------------------------------------------------------------------------------------
    def summary(self, output_tokens: int | None = None) -> NvmlSummary:
        if self._region is None:
            raise RuntimeError("summary() needs a finished `with tracker.track():` region")
        t0, t1 = self._region
        s = empty_summary(self.interval_s, output_tokens)
        s["duration_s"] = t1 - t0
        if self.absent_reason is not None:
            s["nvml_absent"] = self.absent_reason
            return s  # type: ignore[return-value]
        absent: dict[str, str] = dict(self._absent)
        notes: list[str] = s["nvml_notes"]
        for src in self._sources:
            readings = self._readings[src]
            for i, metric in enumerate(src.metrics):
                entries, metric_notes = reduce_metric(metric, [(t, v[i]) for t, v in readings], t0, t1)
                unknown = set(entries) - set(SUMMARY_KEYS)
                assert not unknown, f"{src.name} produced keys outside NvmlSummary: {unknown}"
                s.update(entries)
                notes.extend(metric_notes)
                if not entries:
                    absent[metric.name] = (src.reasons.get(metric.name) or self._errors.get(src)
                                           or "no reading during the region")
            if src in self._errors and readings:
                notes.append(f"{src.name}: some readings failed ({self._errors[src]})")
            if readings and t1 - t0 < src.min_region_s:
                notes.append(f"{src.name}: the region lasted {(t1 - t0) * 1e3:.0f} ms; this path needs "
                             f"{src.min_region_s:.1f} s or more to read it reliably")
        # the achieved interval of the fast thread, from a source it reads on every tick
        fast = [src for src in self._sources if not src.blocking and src.min_interval_s <= self.interval_s]
        if fast:
            ts = [t for t, _ in self._readings[fast[0]]]
            s["samples"] = len(ts)
            if len(ts) > 1:
                s["sample_interval_s_achieved"] = (ts[-1] - ts[0]) / (len(ts) - 1)
        self._energy(s, absent, notes)
        self._apply_calibration(s, absent)
        s["nvml_absent"] = absent
        if self.keep_trace:
            s["timeline"] = self.timeline()
        return s  # type: ignore[return-value]

    @staticmethod
    def _energy(s: dict[str, Any], absent: dict[str, str], notes: list[str]) -> None:
        # The total-energy counter advances in steps (it read 0 J over a 20 ms region on the H200 at 200 W): a
        # zero from it is its resolution, not a measurement, so integrated power stands in.
        if s["energy_j"] == 0:
            s["energy_j"] = None
            region_ms = s["duration_s"] * 1e3
            absent["energy_j"] = f"the total-energy counter did not advance in this {region_ms:.0f} ms region"
        if s["energy_j"] is not None:
            s["energy_source"] = "total_energy_counter"
        elif s["power_w_mean"] is not None and s["duration_s"]:
            s["energy_j"] = s["power_w_mean"] * s["duration_s"]
            s["energy_source"] = "power_integral"
            notes.append(f"energy_j integrated from power: {absent.pop('energy_j', 'the energy counter is absent')}")
        tokens = s["output_tokens"]
        if s["energy_j"] is None:
            absent["joules_per_token"] = "energy is absent"
        elif tokens is None:
            absent["joules_per_token"] = "no output token count given"
        elif tokens <= 0:
            absent["joules_per_token"] = "no output tokens"
        else:
            s["joules_per_token"] = s["energy_j"] / tokens

    def _apply_calibration(self, s: dict[str, Any], absent: dict[str, str]) -> None:
        cal = self._calibration
        keys = {"rx": "pcie_rx_bytes_calibrated", "tx": "pcie_tx_bytes_calibrated"}
        if cal is None:
            for key in keys.values():
                absent[key] = self._calibration_absent or "no calibration"
            return
        applied: dict[str, Any] = {"file": cal.get("file"), "gpu_name": cal.get("gpu_name"),
                                   "created_utc": cal.get("created_utc")}
        s["calibration"] = applied
        if self.gpu_name and cal.get("gpu_name") and cal["gpu_name"] != self.gpu_name:
            for key in keys.values():
                absent[key] = f"calibration is for {cal['gpu_name']}, this GPU is {self.gpu_name}"
            return
        for direction, key in keys.items():
            best = (cal.get("best") or {}).get(direction)
            if not best:
                absent[key] = f"the calibration has no usable {direction} path"
                continue
            raw = s[COUNTER_PATHS[best["path"]][1]]
            if raw is None:
                absent[key] = f"{best['path']}, the calibrated path, is absent"
                continue
            s[key] = raw * best["factor"]
            applied[direction] = {k: best.get(k) for k in ("path", "factor", "error_pct", "calibrated_error_pct")}

    def timeline(self, max_points: int = 2000) -> dict[str, list[float | None]] | None:
        """The last region's readings on one time grid, for plotting: `t_s` from the region's start and a column
        per metric (counters as bytes/s between consecutive readings), all the same length. None before a
        region or without any counter path."""
        if self._region is None or not self._sources:
            return None
        t0, t1 = self._region
        n = max(2, min(max_points, int((t1 - t0) / self.interval_s) + 1))
        grid = [t0 + (t1 - t0) * i / (n - 1) for i in range(n)]
        cols: dict[str, list[float | None]] = {"t_s": [t - t0 for t in grid]}
        for src in self._sources:
            readings = self._readings[src]
            for i, m in enumerate(src.metrics):
                if m.kind == INSTANT:
                    valid = [(t, v[i] * m.scale) for t, v in readings if v[i] is not None]
                    if valid:
                        ts, vs = [t for t, _ in valid], [v for _, v in valid]
                        cols[m.name] = [value_at_instant(ts, vs, t) for t in grid]
                    continue
                ts = [t for t, _ in readings]
                if m.kind == INTERVAL:
                    vs = [None if v[i] is None else v[i] * m.scale for _, v in readings]
                    name = m.name
                elif m.rate is not None:  # a byte counter: its rate over each pair of readings
                    raw = [v[i] for _, v in readings]
                    vs = [None] + [None if a is None or b is None or tb <= ta else
                                   counter_delta([a, b], m.wrap_bits)[0] * m.scale / (tb - ta)
                                   for ta, tb, a, b in zip(ts, ts[1:], raw, raw[1:])]
                    name = m.name + "_per_s"
                else:
                    continue
                if any(v is not None for v in vs):
                    cols[name] = [value_at_interval(ts, vs, t) for t in grid]
        return cols

    def trace(self) -> list[dict[str, Any]] | None:
        """Raw readings of the last region, in time order, when keep_trace; t_s is seconds from the region's
        start (negative for the opening readings); values are in the units of their metric names."""
        if not self.keep_trace or self._region is None:
            return None
        t0 = self._region[0]
        rows = []
        for src in self._sources:
            for t, values in self._readings[src]:
                row: dict[str, Any] = {"t_s": t - t0, "source": src.name}
                for metric, v in zip(src.metrics, values):
                    row[metric.name] = None if v is None else v * metric.scale
                rows.append(row)
        rows.sort(key=lambda r: r["t_s"])
        return rows
