"""One-shot H200 check (issues 2 and 4): engines on a model whose experts are >= 100 MB, bfloat16.

Loads a model once, hands each engine its own deep copy, and for batch sizes B measures decode tokens/s,
host-to-device bytes per output token, tokens per step, acceptance and exact match / teacher-forced top-1 against
`resident`. Writes one JSON line per (engine, batch) to OUT as it goes, so a cut-short run keeps what it measured.

    python results/h200/gpu_check.py --model mixtral-8x7b --layers 2 --out $OUT/check.jsonl
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from engines import registry  # noqa: E402
from engines.hardware import HardwareProfile  # noqa: E402
from engines.runtime import SamplingSettings  # noqa: E402
from harness.equivalence import compare, teacher_forcing_inputs  # noqa: E402
from workloads.models import load_model  # noqa: E402


def prompts_for(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length + int(torch.randint(-4, 5, (1,), generator=g)),), generator=g).tolist()
            for _ in range(batch)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hardware", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--engines", default="offload,specmoe,nospec,lru")
    ap.add_argument("--share", type=float, default=0.25, help="share of experts lru/nospec/specmoe may keep")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    hw = HardwareProfile.parse(a.hardware)
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    base = load_model(a.model, dtype=dtype, layers=a.layers)
    print(f"loaded {a.model} x{a.layers} layers in {time.perf_counter() - t0:.1f}s", flush=True)
    out = open(a.out, "a")
    vocab = base.model.config.vocab_size
    batches = [int(b) for b in a.batches.split(",")]
    settings = SamplingSettings(max_new_tokens=a.new_tokens)
    ref = registry.create("resident")
    ref.load(copy.deepcopy(base), hw)
    store = ref.runtime.store
    per_layer = max(1, int(a.share * store.num_experts))
    print(f"expert {store.expert_bytes / 1e6:.1f} MB, {store.num_layers} layers x {store.num_experts} experts; "
          f"lru/nospec/specmoe keep {per_layer} per layer ({a.share:.0%})", flush=True)
    refs = {}
    for b in batches:
        p = prompts_for(b, a.prompt_len, vocab, seed=b)
        tokens = ref.generate(p, settings).tokens
        refs[b] = (p, tokens, ref.teacher_forced_logits(p, teacher_forcing_inputs(p, tokens)))
    ref.close()
    options = {"lru": {"capacity": str(per_layer * store.num_layers)}, "nospec": {"draft_experts": per_layer},
               "specmoe": {"draft_experts": per_layer, "gamma": 4, "adaptive": False}}
    print(f"{'engine':8s} {'B':>4s} {'decode tok/s':>12s} {'h2d MB/tok':>10s} {'tok/step':>8s} {'accept':>6s} "
          f"{'exact':>5s} {'top1':>6s} {'GB/s':>6s}", flush=True)
    for name in a.engines.split(","):
        engine = registry.create(name, **options.get(name, {}))
        engine.load(copy.deepcopy(base), hw)
        for b in batches:
            p, ref_tokens, ref_logits = refs[b]
            engine.prepare(p, settings)
            engine.generate(p, SamplingSettings(max_new_tokens=4))  # warm-up
            prefill_bytes = engine.generate(p, SamplingSettings(max_new_tokens=1)).stats["h2d_bytes"]
            g = engine.generate(p, settings)
            decode_s = g.t_end - g.t_first
            decoded = sum(len(t) for t in g.tokens) - len(g.tokens)
            st = g.stats
            eq = compare(ref_tokens, g.tokens, ref_logits,
                         engine.teacher_forced_logits(p, teacher_forcing_inputs(p, ref_tokens)))
            row = dict(engine=name, options=options.get(name, {}), batch=b, model=a.model, layers=a.layers,
                       dtype=a.dtype, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       decode_tokens_per_s=decoded / decode_s, ttft_ms=1e3 * (g.t_first - g.t_start),
                       h2d_bytes=st["h2d_bytes"], h2d_bytes_per_token=st["h2d_bytes"] / sum(map(len, g.tokens)),
                       decode_h2d_bytes_per_s=(st["h2d_bytes"] - prefill_bytes) / decode_s,
                       tokens_per_step=sum(g.step_tokens) / st["seq_steps"],
                       acceptance_rate=st["accepted_tokens"] / st["drafted_tokens"] if st.get("drafted_tokens") else None,
                       draft_h2d_bytes=st.get("draft_h2d_bytes"), exact_match_rate=eq.exact_match_rate,
                       teacher_forced_top1=eq.teacher_forced_top1, max_abs_logit_diff=eq.max_abs_logit_diff,
                       expert_bytes=store.expert_bytes, stats=st)
            out.write(json.dumps(row) + "\n")
            out.flush()
            acc = f"{row['acceptance_rate']:.2f}" if row["acceptance_rate"] is not None else "-"
            print(f"{name:8s} {b:4d} {row['decode_tokens_per_s']:12.1f} {row['h2d_bytes_per_token'] / 1e6:10.1f} "
                  f"{row['tokens_per_step']:8.2f} {acc:>6s} {eq.exact_match_rate:5.2f} {eq.teacher_forced_top1:6.4f} "
                  f"{row['decode_h2d_bytes_per_s'] / 1e9:6.1f}", flush=True)
        engine.close()


if __name__ == "__main__":
    main()
