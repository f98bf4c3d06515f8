"""The experts' product at few pairs on the GPU: engines/gemv.py's kernel (a sweep of its tiles) against
torch._grouped_mm, for the expert shapes of the trained models, 1 to 8 routed pairs over a pool of 32 slots. Each
pair's slot is distinct (a decode step's top-k) or, with shared, pairs of rows share one (a draft's substitution).
The down projections are also measured as the layer runs them at batch 1-2: each token's two pairs summed, weighted,
in one program ("sum2"). Times: triton.testing.do_bench (CUDA events, the L2 cache flushed before each run), median.
Every variant is checked against a float64 product first. Prints a table and writes --json.

    python3 results/h200/gemv_bench.py --json gemv.json
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from engines import gemv

SHAPES = {  # name: (K in, N out) of one expert projection, [S, N, K] as transformers stores it
    "small gate_up": (2048, 17920), "small down": (8960, 2048),
    "nllb-like gate_up": (1024, 8192), "nllb-like down": (4096, 1024),
    "mixtral-like gate_up": (2048, 8192), "mixtral-like down": (4096, 2048),
}
TILES = [(4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4)]


def case(K: int, N: int, P: int, shared: bool, S: int = 32, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn((S, N, K), dtype=torch.bfloat16, device="cuda", generator=g)  # never zeros
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(S), (P + 1) // 2 if shared else P))
    row_slot = sorted((slots * 2)[:P]) if shared else slots
    counts = torch.bincount(torch.tensor(row_slot), minlength=S)
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    x = torch.randn((P, K), dtype=torch.bfloat16, device="cuda", generator=g)
    return w, x, torch.tensor(row_slot, device="cuda"), offs, len(set(row_slot))


def main() -> None:
    import triton.testing
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--json")
    args = ap.parse_args()
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, method=__doc__.split("\n\n")[0],
               default_tile=[gemv.BLOCK_N, gemv.BLOCK_K, gemv.WARPS], results=[])
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        modes = ["rows", "sum2"] if "down" in name else ["rows"]
        for mode in modes:
            for shared in (False, True):
                for P in map(int, args.rows.split(",")):
                    if (shared and P not in (2, 4)) or (mode == "sum2" and P not in (2, 4)):
                        continue
                    w, x, slot, offs, distinct = case(K, N, P, shared)
                    wt = w.transpose(-2, -1)
                    prod = torch.stack([x[p].double() @ wt[slot[p]].double() for p in range(P)])
                    pairs = 2 if mode == "sum2" else 1
                    scale = torch.rand(P, device="cuda") if pairs > 1 else None
                    ref = (prod * scale[:, None].double()).view(P // 2, 2, N).sum(1) if pairs > 1 else prod
                    read = distinct * N * K * 2 + P * K * 2  # bytes of the distinct weights and the rows
                    row = dict(shape=name, mode=mode, K=K, N=N, rows=P, shared=shared, distinct_slots=distinct,
                               bytes=read)
                    ms = triton.testing.do_bench(lambda: torch._grouped_mm(x, wt, offs=offs), return_mode="median")
                    row["grouped_mm_us"] = ms * 1e3  # the grouped product alone, without the sort or the sum
                    best = None
                    for bn, bk, warps in TILES:
                        def call():
                            return gemv.pairs_gemv(x, wt, slot, pairs=pairs, scale=scale, block_n=bn, block_k=bk,
                                                   warps=warps)
                        try:
                            err = float((call().double() - ref).norm() / ref.norm())
                            if not err < 1e-2:
                                row[f"gemv_{bn}_{bk}_{warps}_error"] = err
                                continue
                            ms = triton.testing.do_bench(call, return_mode="median")
                        except Exception as exc:  # one tile's failure is recorded; the sweep goes on
                            row[f"gemv_{bn}_{bk}_{warps}_error"] = repr(exc)[:200]
                            continue
                        row[f"gemv_{bn}_{bk}_{warps}_us"] = ms * 1e3
                        if best is None or ms * 1e3 < best[1]:
                            best = ((bn, bk, warps), ms * 1e3)
                    row["grouped_mm_gb_per_s"] = read / row["grouped_mm_us"] / 1e3
                    if best:
                        row["best_tile"], row["best_us"] = list(best[0]), best[1]
                        row["best_gb_per_s"] = read / best[1] / 1e3
                    row["default_tile_us"] = row.get(f"gemv_{gemv.BLOCK_N}_{gemv.BLOCK_K}_{gemv.WARPS}_us")
                    out["results"].append(row)
                    print(f"{name:20} {mode:4} P={P} {'shared' if shared else 'distinct':8} grouped_mm "
                          f"{row['grouped_mm_us']:7.1f} us ({row['grouped_mm_gb_per_s']:5.0f} GB/s)  gemv default "
                          f"{row['default_tile_us'] or float('nan'):7.1f} us  best {best and best[0]} "
                          f"{best and best[1] or float('nan'):7.1f} us ({row.get('best_gb_per_s', 0):5.0f} GB/s)",
                          flush=True)
                    del w
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
