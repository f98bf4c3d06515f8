"""Each cell's distance to its hardware bound.

A short probe, once per run and device (cached in the run directory, recorded in run.json), measures the two
rates that bound offloaded decoding: pinned host-to-device copy bandwidth and device memory read bandwidth. A
cell's bound is the time its traffic needs at those rates, whichever is larger:

    bound_time_s       = max(engine-counted h2d bytes / pinned bandwidth, weight bytes the forwards read / read bandwidth)
    bound_tokens_per_s = output tokens / bound_time_s        (per iteration)
    pct_of_bound       = tokens_per_s / bound_tokens_per_s   (1.0 would be the hardware's limit)

On the CPU there is no such bound to report: the fields stay absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

PROBE_BYTES = 1 << 30  # large against the L2 cache and the copy engines' start-up
PROBE_REPEATS = 10


def probe(device: str) -> dict:
    """Measure the pinned host-to-device copy rate and the device memory read rate (median of repeats, CUDA
    events around each), in 1e9 bytes/s."""
    import torch
    dev = torch.device(device)
    host = torch.empty(PROBE_BYTES, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    dst = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=dev)
    big = torch.randn(PROBE_BYTES // 2, dtype=torch.bfloat16, device=dev)  # random data, never zeros

    def median_ms(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(PROBE_REPEATS):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    h2d_ms = median_ms(lambda: dst.copy_(host, non_blocking=True))
    read_ms = median_ms(lambda: big.sum(dtype=torch.float32))
    out = dict(device=str(dev), name=torch.cuda.get_device_name(dev),
               pinned_h2d_gb_per_s=PROBE_BYTES / h2d_ms / 1e6, device_read_gb_per_s=big.nbytes / read_ms / 1e6,
               method=f"median of {PROBE_REPEATS} CUDA-event-timed runs: a {PROBE_BYTES >> 20} MiB pinned host "
                      f"-> device copy; a bf16 sum over {big.nbytes >> 20} MiB on the device")
    return out  # the probe's buffers go back to torch's caching allocator, which the cell's engine reuses


def _path(run_dir: Path, device: str) -> Path:
    return Path(run_dir) / "bounds" / (device.replace(":", "") + ".json")


def for_run(run_dir: Path | None, device: str) -> dict:
    """The run's probe of `device`: read from the run directory, or measured now and kept there."""
    if run_dir is None:
        return probe(device)
    path = _path(run_dir, device)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a damaged entry is measured again
    path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text())
        result = probe(device)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    return result


def recorded(run_dir: Path) -> dict:
    """Every probe a run made, by device, for run.json."""
    out = {}
    for f in sorted((Path(run_dir) / "bounds").glob("*.json")):
        try:
            data = json.loads(f.read_text())
            out[data["device"]] = data
        except (OSError, ValueError, KeyError):
            continue
    return out


def apply(metrics, rates: dict) -> None:
    """Fill a cell's bound_tokens_per_s, pct_of_bound and bound from its per-iteration bytes and the rates."""
    tokens, h2d, read = metrics.output_tokens, metrics.h2d_bytes, metrics.weight_read_bytes
    if not tokens or h2d is None or read is None or metrics.tokens_per_s is None:
        return
    pcie_s = h2d / (rates["pinned_h2d_gb_per_s"] * 1e9)
    memory_s = read / (rates["device_read_gb_per_s"] * 1e9)
    metrics.bound = "pcie" if pcie_s >= memory_s else "memory"
    metrics.bound_tokens_per_s = tokens / max(pcie_s, memory_s)
    metrics.pct_of_bound = metrics.tokens_per_s / metrics.bound_tokens_per_s
