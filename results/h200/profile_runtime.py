"""Where a decode step's time goes on the GPU (torch.profiler with CUDA activity): for one engine, batch size and
model, the busy time of kernels and of host-to-device copies against the step's wall time, the largest kernels,
and the gaps on the copy stream. The profile that guides the runtime's optimisation; its output is kept in
results/h200/.

    python3 results/h200/profile_runtime.py --engine resident --batch 1 --model small-random
"""
from __future__ import annotations

import argparse
import collections
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from engines import registry
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from workloads.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="resident")
    ap.add_argument("--option", action="append", default=[], help="KEY=VALUE")
    ap.add_argument("--hardware", default="cuda")
    ap.add_argument("--model", default="small-random")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    options = dict(o.split("=", 1) for o in args.option)
    loaded = load_model(args.model, torch.bfloat16)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, loaded.model.config.vocab_size) for _ in range(64)] for _ in range(args.batch)]
    engine = registry.create(args.engine, **options)
    engine.load(loaded, HardwareProfile.parse(args.hardware))
    settings = SamplingSettings(max_new_tokens=args.new_tokens)
    engine.prepare(prompts, settings)
    engine.generate(prompts, settings)  # warm-up: graphs captured
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        gen = engine.generate(prompts, settings)
        wall = time.perf_counter() - t0
    steps = gen.step_times
    step_ms = [(b - a) * 1e3 for a, b in zip(steps, steps[1:])]
    kernels, copies = collections.Counter(), []
    busy_kernel, launches = 0.0, 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        dur = e.device_time / 1e3  # ms
        if "Memcpy" in e.name or "memcpy" in e.name:
            if "HtoD" in e.name:
                copies.append((e.time_range.start, e.time_range.end))
        else:
            kernels[e.name[:90]] += dur
            busy_kernel += dur
            launches += 1
    copy_ms = sum(b - a for a, b in copies) / 1e3
    copies.sort()
    gaps = [(b[0] - a[1]) / 1e3 for a, b in zip(copies, copies[1:]) if b[0] > a[1]]
    print(f"{args.engine} {options} b={args.batch} {args.hardware}: generate {wall * 1e3:.1f} ms for "
          f"{sum(len(t) for t in gen.tokens)} tokens; decode step median {sorted(step_ms)[len(step_ms) // 2]:.3f} ms")
    print(f"  {launches} kernels in {len(steps) + 1} forwards ({launches / (len(steps) + 1):.0f} per forward); "
          f"kernel busy {busy_kernel:.1f} ms, H2D copy busy {copy_ms:.1f} ms ({len(copies)} copies), "
          f"copy gaps: total {sum(gaps):.1f} ms, largest {sorted(gaps)[-5:] if gaps else []}")
    for name, ms in kernels.most_common(args.top):
        print(f"  {ms:8.2f} ms  {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
