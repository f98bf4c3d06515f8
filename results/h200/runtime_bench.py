"""Time the runtime's pieces on a GPU, outside the harness: resident decoding, and one SpecMoE draft forward as a
CUDA-graph replay (CUDA events around each replay, median of many), for the acceptance table of the fast-runtime
issue. Runs against whatever engines/ is on sys.path, so the same command times an older checkout too (parts that
checkout lacks print as absent).

    python3 results/h200/runtime_bench.py --model small --batch-sizes 1,64 --json out.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from engines import registry
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from workloads.models import load_model


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(batch)]


def timed_generates(engine, prompts, settings, iterations: int) -> list[float]:
    """tokens/s of each generate call after one warm-up call."""
    engine.generate(prompts, settings)
    out = []
    for _ in range(iterations):
        g = engine.generate(prompts, settings)
        out.append(sum(len(t) for t in g.tokens) / (g.t_end - g.t_start))
    return out


def replay_ms(graph, repeats: int = 50) -> float:
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def draft_forward_ms(engine, batch: int) -> float | None:
    """Median time of one draft forward (T = 1) graph replay, CUDA events around the replay alone."""
    graphs = getattr(engine.runtime, "graphs", None)
    if graphs is None:
        return None
    for key, (graph, _, _) in graphs.graphs.items():
        if key[0] == batch and key[1] == 1 and key[2] is None:
            return replay_ms(graph)
    return None


def engines_experts():
    try:
        import engines.experts
        return engines.experts
    except ImportError:  # an older checkout
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-random")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--engines", default="resident,specmoe")
    ap.add_argument("--down-split", type=int, help="engines.experts.DOWN_SPLIT for this run (1: no split)")
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.down_split is not None:
        import engines.experts
        engines.experts.DOWN_SPLIT = args.down_split
    settings = SamplingSettings(max_new_tokens=args.new_tokens)
    rows = []
    chosen = args.engines.split(",")
    for name, options, hw in [("resident", {}, "cuda"),
                              ("specmoe", {"gamma": 4, "adaptive": False}, "cuda:budget=25%")]:
        if name not in chosen:
            continue
        t0 = time.perf_counter()
        loaded = load_model(args.model, torch.bfloat16)
        vocab = loaded.model.config.vocab_size
        engine = registry.create(name, **options)
        engine.load(loaded, HardwareProfile.parse(hw))
        for b in batches:
            prompts = prompts_for(b, args.prompt_len, vocab)
            tps = timed_generates(engine, prompts, settings, args.iterations)
            row = dict(engine=name, hardware=hw, batch=b, down_split=getattr(engines_experts(), "DOWN_SPLIT", None), tokens_per_s=statistics.median(tps),
                       tokens_per_s_each=tps, first_over_median=tps[0] / statistics.median(tps[1:] or tps))
            if name == "specmoe":
                row["draft_forward_ms"] = draft_forward_ms(engine, b)
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.close()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
