"""`specmoe-bench calibrate`: copy known byte counts between host and GPU and report what each NVML counter path
read against the truth, so a user knows how far to trust it; the file it writes gives the tracker its factors.

Runs without installing the package: `python -m harness.calibrate --out results/calibration/h200.json`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TypedDict

import click

from engines.errors import BadInput
from engines.hardware import HardwareProfile, format_bytes, parse_size
from harness.nvml import COUNTER_PATHS, DEFAULT_INTERVAL_S, NvmlTracker, calibration_path, environment

SCHEMA = "specmoe-bench/calibration/1"
GIB = 2 ** 30
DEFAULT_SIZES = (256 * 2 ** 20, GIB, 4 * GIB)
KINDS = ("pinned", "pageable")
DIRECTIONS = {"h2d": "rx", "d2h": "tx"}  # counters take the GPU's side: it receives host-to-device copies
TRUST_PCT = 10.0  # a path within this of the truth on a large pinned copy is one to trust

# path -> (metric named in nvml_absent and notes, summary key of its per-reading median rate or None)
PATH_METRICS: dict[str, tuple[str, str | None]] = {
    "pcie_throughput_rx": ("pcie_rx_bytes_per_s", "pcie_rx_bytes_per_s_p50"),
    "pcie_throughput_tx": ("pcie_tx_bytes_per_s", "pcie_tx_bytes_per_s_p50"),
    "gpm_pcie_rx": ("gpm_pcie_rx_bytes_per_s", "gpm_pcie_rx_bytes_per_s_p50"),
    "gpm_pcie_tx": ("gpm_pcie_tx_bytes_per_s", "gpm_pcie_tx_bytes_per_s_p50"),
    "field_pcie_count_rx": ("field_pcie_rx_bytes", None),
    "field_pcie_count_tx": ("field_pcie_tx_bytes", None),
}


class CalibrationRow(TypedDict):
    direction: str  # h2d or d2h
    kind: str  # pinned or pageable host memory
    size_bytes: int  # one copy
    copies: int
    true_bytes: int
    true_s: float  # CUDA events around the copies
    true_bytes_per_s: float
    region_s: float  # the tracker's region, host clock
    path: str  # a key of harness.nvml.COUNTER_PATHS
    counter_bytes: float | None
    counter_bytes_per_s: float | None  # counter_bytes / region_s
    counter_bytes_per_s_p50: float | None  # median reading, for paths that read a rate
    error_pct: float | None  # (counter_bytes - true_bytes) / true_bytes
    rate_error_pct: float | None  # counter_bytes_per_s against true_bytes_per_s
    p50_error_pct: float | None  # counter_bytes_per_s_p50 against true_bytes_per_s
    factor: float | None  # true_bytes / counter_bytes: what the tracker multiplies this path's bytes by
    opposite_bytes: float | None  # the same path's other direction: ~0 unless the direction convention is off
    absent: str | None  # why the path read nothing
    notes: list[str]  # wraps, resets


def _pct(measured: float | None, truth: float) -> float | None:
    return None if measured is None or truth <= 0 else (measured - truth) / truth * 100.0


def rows_for(summary: dict[str, Any], direction: str, kind: str, size_bytes: int, copies: int,
             true_s: float) -> list[CalibrationRow]:
    """One row per counter path of the direction's side, from the tracker summary of the copy region."""
    side = DIRECTIONS[direction]
    other = "tx" if side == "rx" else "rx"
    true_bytes = size_bytes * copies
    true_rate = true_bytes / true_s
    region_s = summary["duration_s"]
    absent = summary["nvml_absent"]
    rows: list[CalibrationRow] = []
    for path, (path_side, key) in COUNTER_PATHS.items():
        if path_side != side:
            continue
        metric, p50_key = PATH_METRICS[path]
        counter = summary[key]
        rate = counter / region_s if counter is not None and region_s else None
        p50 = summary[p50_key] if p50_key else None
        reason = absent if isinstance(absent, str) else absent.get(metric)
        rows.append(CalibrationRow(
            direction=direction, kind=kind, size_bytes=size_bytes, copies=copies, true_bytes=true_bytes,
            true_s=true_s, true_bytes_per_s=true_rate, region_s=region_s, path=path, counter_bytes=counter,
            counter_bytes_per_s=rate, counter_bytes_per_s_p50=p50, error_pct=_pct(counter, true_bytes),
            rate_error_pct=_pct(rate, true_rate), p50_error_pct=_pct(p50, true_rate),
            factor=true_bytes / counter if counter else None,
            opposite_bytes=summary[COUNTER_PATHS[path[:-2] + other][1]],
            absent=None if counter is not None else (reason or "no reading"),
            notes=[n for n in summary["nvml_notes"] if n.startswith(metric)]))
    return rows


def summarise(rows: Sequence[CalibrationRow]) -> dict[str, Any]:
    """Per path, the median factor and error over its large pinned copies (>= 1 GiB; what engines move), falling
    back to all pinned copies, then to all; and the worst error left on any row once the factor is applied.
    Per direction the best path is the one whose calibrated readings stray least: a steady bias is what a factor
    removes, scatter is not."""
    paths: dict[str, Any] = {}
    for path, (side, _) in COUNTER_PATHS.items():
        mine = [r for r in rows if r["path"] == path and r["factor"] is not None]
        for basis, chosen in (("pinned copies >= 1 GiB", [r for r in mine if r["kind"] == "pinned"
                                                          and r["size_bytes"] >= GIB]),
                              ("pinned copies", [r for r in mine if r["kind"] == "pinned"]),
                              ("all copies", mine)):
            if chosen:
                break
        else:
            reasons = {r["absent"] for r in rows if r["path"] == path and r["absent"]}
            paths[path] = {"direction": side, "factor": None, "absent": "; ".join(sorted(reasons)) or "not run"}
            continue
        factor = statistics.median(r["factor"] for r in chosen)
        rate_errors = [r["rate_error_pct"] for r in chosen if r["rate_error_pct"] is not None]
        paths[path] = {
            "direction": side, "basis": basis, "rows": len(chosen), "factor": factor,
            "error_pct": statistics.median(r["error_pct"] for r in chosen),
            "rate_error_pct": statistics.median(rate_errors) if rate_errors else None,
            "max_abs_error_pct": max(abs(r["error_pct"]) for r in mine),
            "calibrated_error_pct": max(abs(r["counter_bytes"] * factor / r["true_bytes"] - 1) * 100 for r in mine),
        }
    best: dict[str, Any] = {}
    for side in ("rx", "tx"):
        usable = [(p["calibrated_error_pct"], abs(p["error_pct"]), name) for name, p in paths.items()
                  if p["direction"] == side and p["factor"] is not None]
        if usable:
            name = min(usable)[2]
            best[side] = {"path": name, **{k: paths[name][k] for k in
                                            ("factor", "error_pct", "calibrated_error_pct", "basis")}}
    return {"paths": paths, "best": best}


def build_calibration(rows: Sequence[CalibrationRow], env: dict[str, Any] | None = None,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    env = environment() if env is None else env
    return {"schema": SCHEMA, "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gpu_name": env.get("gpu_name"), "environment": env, "settings": settings or {}, "rows": list(rows),
            **summarise(rows)}


def save_calibration(rows: Sequence[CalibrationRow] | dict[str, Any], path: str | Path) -> Path:
    """Write the calibration document (rows are wrapped with build_calibration) atomically: a reader never sees a
    half-written file."""
    doc = rows if isinstance(rows, dict) else build_calibration(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# Measuring (needs CUDA)

def _measure(tracker: NvmlTracker, host: Any, gpu: Any, direction: str, kind: str, min_seconds: float,
             log: Callable[[str], None]) -> list[CalibrationRow]:
    import torch

    pinned = kind == "pinned"
    if direction == "h2d":
        def copy() -> None:
            gpu.copy_(host, non_blocking=pinned)
    else:
        def copy() -> None:
            host.copy_(gpu, non_blocking=pinned)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copy()  # warm-up
    torch.cuda.synchronize()
    start.record()
    copy()
    end.record()
    end.synchronize()
    # repeat long enough that 20 ms throughput windows and 100 ms GPM pairs see a steady transfer
    copies = max(1, math.ceil(min_seconds / (start.elapsed_time(end) / 1e3)))
    with tracker.track():
        start.record()
        for _ in range(copies):
            copy()
        end.record()
        torch.cuda.synchronize()
    true_s = start.elapsed_time(end) / 1e3
    size = host.numel() * host.element_size()
    log(f"{direction} {kind:8s} {format_bytes(size):>10s} x{copies}: {size * copies / true_s / 1e9:.2f} GB/s")
    return rows_for(tracker.summary(), direction, kind, size, copies, true_s)


def run_calibration(device: str = "cuda:0", sizes: Sequence[int] = DEFAULT_SIZES, kinds: Sequence[str] = KINDS,
                    directions: Sequence[str] = tuple(DIRECTIONS), min_seconds: float = 1.0,
                    interval_s: float = DEFAULT_INTERVAL_S,
                    log: Callable[[str], None] = lambda line: None) -> list[CalibrationRow]:
    """Copy each size from/to each kind of host memory in each direction for >= min_seconds, tracked by a fresh
    uncalibrated NvmlTracker, and compare every counter path with the bytes copied."""
    import torch

    dev = torch.device(device)
    torch.cuda.set_device(dev)
    tracker = NvmlTracker(dev.index or 0, interval_s=interval_s, calibration=None)
    if not tracker.available:
        log(f"NVML is absent ({tracker.absent_reason}): every path will read absent")
    rows: list[CalibrationRow] = []
    try:
        for size in sizes:
            free, _ = torch.cuda.mem_get_info(dev)
            if size > 0.9 * free:
                log(f"skipping {format_bytes(size)}: only {format_bytes(free)} free on {device}")
                continue
            gpu = torch.empty(size, dtype=torch.uint8, device=dev)
            for kind in kinds:
                host = torch.empty(size, dtype=torch.uint8, pin_memory=kind == "pinned")
                host.fill_(1)  # touch every page, so pageable copies do not time first-touch faults
                for direction in directions:
                    rows.extend(_measure(tracker, host, gpu, direction, kind, min_seconds, log))
                del host
            del gpu
            torch.cuda.empty_cache()
    finally:
        tracker.close()
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report and command

def _gbps(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"


def format_table(doc: dict[str, Any]) -> str:
    """Every path's reading against the truth, then the factor per path and whether one agrees within 10%."""
    head = ("dir", "kind", "size", "path", "true GB/s", "counter GB/s", "rate err %", "p50 GB/s", "p50 err %",
            "factor", "note")
    lines = [head]
    for r in doc["rows"]:
        note = r["absent"] or "; ".join(r["notes"])
        if r["opposite_bytes"] and r["opposite_bytes"] > 0.5 * r["true_bytes"]:
            note = (note + "; " if note else "") + "other direction read most bytes"
        lines.append((r["direction"], r["kind"], format_bytes(r["size_bytes"]), r["path"],
                      _gbps(r["true_bytes_per_s"]), _gbps(r["counter_bytes_per_s"]), _signed(r["rate_error_pct"]),
                      _gbps(r["counter_bytes_per_s_p50"]), _signed(r["p50_error_pct"]),
                      "-" if r["factor"] is None else f"{r['factor']:.3f}", note[:70]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.append("")
    for name, p in doc["paths"].items():
        if p["factor"] is None:
            out.append(f"{name:20s} absent: {p['absent']}")
        else:
            out.append(f"{name:20s} error {p['error_pct']:+.1f}% -> factor {p['factor']:.3f} (median of {p['rows']} "
                       f"{p['basis']}); worst row {p['max_abs_error_pct']:.1f}% raw, "
                       f"{p['calibrated_error_pct']:.1f}% with the factor")
    for side, direction in (("rx", "host-to-device"), ("tx", "device-to-host")):
        best = doc["best"].get(side)
        if best is None:
            out.append(f"{direction}: no counter path read anything")
            continue
        close = [name for name, p in doc["paths"].items() if p["direction"] == side and p["factor"] is not None
                 and p["rate_error_pct"] is not None and abs(p["rate_error_pct"]) <= TRUST_PCT]
        verdict = (f"within {TRUST_PCT:.0f}% of the true rate uncalibrated: {', '.join(close)}" if close else
                   f"NO path within {TRUST_PCT:.0f}% of the true rate uncalibrated")
        out.append(f"{direction}: {verdict}; the tracker applies {best['path']} x {best['factor']:.3f} "
                   f"(worst row {best['calibrated_error_pct']:.1f}% after it)")
    return "\n".join(out)


def _parse_list(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise BadInput(f"{option} is empty")
    return items


def cuda_device(spec: str) -> str:
    """The torch device a calibration runs on; BadInput (one line) when there is none."""
    profile = HardwareProfile.parse(spec, check_available=False)
    if not profile.is_cuda:
        raise BadInput(f"calibrate measures a GPU's counters; --device {spec!r} is not a CUDA device "
                       "(use cuda or cuda:N)")
    import torch
    if not torch.cuda.is_available():
        raise BadInput("calibrate needs a CUDA device; this machine has none")
    return HardwareProfile.parse(spec).device


@click.command("calibrate", help="Copy known byte counts between host and GPU (pinned and pageable memory, "
               "several sizes, both directions) and report how far each NVML counter path - PCIe throughput, "
               "GPM PCIe, PCIe count fields - reads from the truth. Writes the calibration file that the NVML "
               "tracker applies and records in every result.")
@click.option("--device", default="cuda:0", show_default=True,
              help="CUDA device whose counters to calibrate: cuda or cuda:N.")
@click.option("--sizes", default="256MiB,1GiB,4GiB", show_default=True,
              help="Comma-separated sizes of one copy (B, KB, MB, GB, KiB, MiB, GiB); each is repeated for --seconds.")
@click.option("--kinds", default=",".join(KINDS), show_default=True,
              help="Host memory to copy from and to: pinned, pageable, or both, comma-separated.")
@click.option("--seconds", "min_seconds", type=float, default=1.0, show_default=True,
              help="Repeat each copy for at least this long, so 20 ms counter windows and 100 ms GPM pairs see a "
                   "steady transfer.")
@click.option("--interval", "interval_s", type=float, default=DEFAULT_INTERVAL_S, show_default=True,
              help="Sampling interval of the NVML tracker, in seconds.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration file to write (JSON). Default: results/calibration/<gpu-name>.json, which the "
                   "tracker loads by itself.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole calibration document as JSON instead of the "
              "table.")
@click.pass_context
def calibrate_command(ctx: click.Context, device: str, sizes: str, kinds: str, min_seconds: float,
                      interval_s: float, out: Path | None, as_json: bool) -> None:
    try:
        size_list = [parse_size(s) for s in _parse_list(sizes, "--sizes")]
        kind_list = _parse_list(kinds, "--kinds")
        unknown = [k for k in kind_list if k not in KINDS]
        if unknown:
            raise BadInput(f"unknown --kinds {', '.join(unknown)}: allowed are {', '.join(KINDS)}")
        if min_seconds <= 0 or interval_s <= 0:
            raise BadInput("--seconds and --interval must be greater than zero")
        torch_device = cuda_device(device)
    except BadInput as e:
        click.echo(f"Error: {e}", err=True)
        ctx.exit(2)
    log = lambda line: click.echo(line, err=True)  # noqa: E731 - progress goes to stderr, results to stdout
    settings = {"device": torch_device, "sizes": size_list, "kinds": kind_list, "directions": list(DIRECTIONS),
                "min_seconds": min_seconds, "interval_s": interval_s}
    rows = run_calibration(torch_device, size_list, kind_list, min_seconds=min_seconds, interval_s=interval_s,
                           log=log)
    env = environment(int(torch_device.split(":")[1]))
    doc = build_calibration(rows, env, settings)
    path = save_calibration(doc, out or calibration_path(env.get("gpu_name") or "unknown-gpu"))
    click.echo(json.dumps(doc, indent=1) if as_json else format_table(doc))
    log(f"wrote {path}")


if __name__ == "__main__":
    calibrate_command(prog_name="python -m harness.calibrate")
