"""engines/gemv.py's two forms of the few-pair down projection, end to end: `resident` at batch 1 on `small`'s shape
(random weights), bf16, 64-token prompts of random ids, 64 new tokens; the forms alternate A B B A ... in one process
(graphs captured anew for each, one warm-up generate each time), tokens/s of every generate call, and whether the
two forms give the same tokens.

    python3 results/h200/down_ab.py --rounds 4 --json down_ab.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from engines import gemv, registry
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from workloads.models import load_model
from runtime_bench import prompts_for, timed_generates  # beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-random")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    loaded = load_model(args.model, torch.bfloat16)
    prompts = prompts_for(args.batch, 64, loaded.model.config.vocab_size)
    settings = SamplingSettings(max_new_tokens=64)
    engine = registry.create("resident")
    engine.load(loaded, HardwareProfile.parse("cuda"))
    engine.prepare(prompts, settings)
    samples, tokens = {"summed": [], "per_pair": []}, {}
    for r in range(args.rounds):
        for mode in (("summed", "per_pair") if r % 2 == 0 else ("per_pair", "summed")):
            gemv.DOWN_MODE = mode
            engine.runtime.graphs = None  # captured again with this form
            engine.runtime._kv = None
            samples[mode] += timed_generates(engine, prompts, settings, 3)
            tokens[mode] = engine.generate(prompts, settings).tokens
    out = dict(device=torch.cuda.get_device_name(), model=args.model, batch=args.batch, samples=samples,
               median=({m: statistics.median(v) for m, v in samples.items()}),
               same_tokens=tokens["summed"] == tokens["per_pair"])
    out["per_pair_over_summed"] = out["median"]["per_pair"] / out["median"]["summed"]
    print(json.dumps({k: v for k, v in out.items() if k != "samples"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
