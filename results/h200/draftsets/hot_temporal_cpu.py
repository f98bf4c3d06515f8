"""Acceptance of `specmoe` (gamma 4, adaptive off, prefetch none, N = 2 draft experts) on the trained `tiny` (CPU,
float32, `code-heldout` prompts of 64 tokens, 64 new tokens), four generate calls on one engine, for how the
hot-temporal draft sets start each call. Counts, not times: deterministic on the CPU.
    .venv/bin/python results/h200/draftsets/hot_temporal_cpu.py [carry | cold]
carry: the sets carry over from call to call (as before every call started from the prepared sets); cold: the sets
start at experts 0 .. N-1 (start=cold, as before the warm start); default: warm from the calibration split."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from engines import registry, specmoe  # noqa: E402
from engines.hardware import HardwareProfile  # noqa: E402
from engines.runtime import SamplingSettings  # noqa: E402
from workloads.models import load_model  # noqa: E402
from workloads.prompts import load_workload  # noqa: E402

mode = sys.argv[1] if sys.argv[1:] else "warm"
carry = mode == "carry"
if carry:
    specmoe.SpecMoEPolicy.restore = lambda self, state: False
torch.set_num_threads(1)
settings = SamplingSettings(max_new_tokens=64)
for batch in (1, 16, 64):
    model = load_model("tiny", dtype=torch.float32)
    prompts = list(load_workload("code-heldout", model=model, batch_size=batch, prompt_len=64))
    engine = registry.create("specmoe", gamma=4, adaptive=False, prefetch="none", draft_experts=2,
                             start="cold" if mode == "cold" else "warm")
    engine.load(model, HardwareProfile.parse("cpu"))
    engine.prepare(prompts, settings, calibration=lambda: list(load_workload(
        "code-heldout", model=model, batch_size=batch, prompt_len=64, split="calibration")))
    accepted, per_token = [], []
    for _ in range(4):
        g = engine.generate(prompts, settings)
        accepted.append(round(g.stats["accepted_tokens"] / g.stats["drafted_tokens"], 3))
        per_token.append(round(g.stats["h2d_bytes"] / sum(len(t) for t in g.tokens) / 1e6, 3))
    print(f"{mode} batch {batch}: acceptance {accepted}, "
          f"h2d MB/token {per_token}", flush=True)
