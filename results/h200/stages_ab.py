"""The runtime's staged expert compute (engines/runtime.COPY_STAGES: each group of a layer's copies computed as it
lands) against one pass after the last copy, end to end on the GPU: copy-bound engines under `cuda:budget=25%`,
bf16, 64-token prompts of random ids, 64 new tokens; the two settings alternate A B B A ... in one process on one
loaded engine, tokens/s of every generate call, each against the PCIe bound of the bytes it copied (the pinned
host-to-device rate probed here), and whether both settings give the same tokens.

    python3 results/h200/stages_ab.py --model small-random --engines offload,nospec --batch-sizes 64,256 --json ab.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from engines import registry, runtime
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from harness.bounds import probe
from workloads.models import load_model
from runtime_bench import prompts_for  # beside this script

SETTINGS = {"one-pass": 0, "staged": runtime.COPY_STAGES}


def measure(engine, prompts, settings) -> tuple[float, float, list]:
    """(tokens/s, h2d bytes) of one generate call."""
    g = engine.generate(prompts, settings)
    return sum(len(t) for t in g.tokens) / (g.t_end - g.t_start), g.stats["h2d_bytes"], g.tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-random")
    ap.add_argument("--engines", default="offload,nospec")
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    h2d = probe("cuda")["pinned_h2d_gb_per_s"] * 1e9
    settings = SamplingSettings(max_new_tokens=64)
    cells = []
    for name in args.engines.split(","):
        engine = registry.create(name)
        loaded = load_model(args.model, torch.bfloat16)
        vocab = loaded.model.config.vocab_size
        engine.load(loaded, HardwareProfile.parse("cuda:budget=25%"))
        for batch in map(int, args.batch_sizes.split(",")):
            prompts = prompts_for(batch, 64, vocab)
            engine.prepare(prompts, settings)
            samples, pct, tokens = {k: [] for k in SETTINGS}, {k: [] for k in SETTINGS}, {}
            for r in range(args.rounds):
                for key in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                    runtime.COPY_STAGES = SETTINGS[key]
                    measure(engine, prompts, settings)  # warm-up
                    rate, moved, tokens[key] = measure(engine, prompts, settings)
                    samples[key].append(rate)
                    pct[key].append(rate / (batch * 64 / (moved / h2d)))
            cell = dict(engine=name, batch=batch, samples=samples,
                        median={k: statistics.median(v) for k, v in samples.items()},
                        pct_of_pcie_bound={k: statistics.median(v) for k, v in pct.items()},
                        same_tokens=tokens["staged"] == tokens["one-pass"])
            cell["staged_over_one_pass"] = cell["median"]["staged"] / cell["median"]["one-pass"]
            print(json.dumps({k: v for k, v in cell.items() if k != "samples"}), flush=True)
            cells.append(cell)
        engine.close()
    runtime.COPY_STAGES = SETTINGS["staged"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), model=args.model, pinned_h2d_gb_per_s=h2d / 1e9,
                           cells=cells), f, indent=1)


if __name__ == "__main__":
    main()
