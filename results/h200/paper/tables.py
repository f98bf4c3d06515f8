"""The tables of results/h200/paper/README.md, printed as Markdown from the committed cell files, so that every
number there can be traced to a cell (run from the repository root):

    python3 results/h200/paper/tables.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # results/h200: mdtable
from mdtable import fmt, table  # noqa: E402

HERE = Path(__file__).parent
RUNS = HERE / "runs"
BASELINES = ("offload", "overlap", "caching", "lru", "nospec")
VARIANTS = {  # column name -> the engine options that pick it
    "specmoe paper": {"gamma": 4, "adaptive": False, "prefetch": "none"},
    "specmoe best": {"gamma": "auto", "prefetch": "draft"},
}


def load(run: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RUNS / run / "cells").glob("*.json"))]


def label(cell: dict) -> str:
    c = cell["config"]
    if c["engine"] != "specmoe":
        return c["engine"]
    opts = c["engine_options"] or {}
    for name, want in VARIANTS.items():
        if all(opts.get(k) == v for k, v in want.items()):
            return name
    return "specmoe " + ",".join(f"{k}={v}" for k, v in sorted(opts.items()))


def index(cells: list[dict]) -> dict[tuple[str, str, int], dict]:
    """(label, hardware, batch) -> metrics of the valid cells."""
    return {(label(c), c["config"]["hardware"], c["config"]["batch_size"]): c["metrics"]
            for c in cells if c["status"] == "ok" and c["valid"]}


def figure(cells: dict, hardware: str, engines: list[str]) -> str:
    """tok/s, x offload and % of the bound, per batch size and engine."""
    batches = sorted({b for (_, hw, b) in cells if hw == hardware})
    rows = []
    for b in batches:
        off = cells.get(("offload", hardware, b), {}).get("tokens_per_s")
        r = [b]
        for e in engines:
            m = cells.get((e, hardware if e != "resident" else "cuda", b))
            if m is None:
                r.append("-")
                continue
            x = f" ({m['tokens_per_s'] / off:.2f}x)" if off and e != "offload" else ""
            r.append(f"{m['tokens_per_s']:,.1f}{x}, {100 * m['pct_of_bound']:.1f}% {m['bound']}")
        rows.append(r)
    return table(["batch", *engines], rows)


def traffic(cells: dict, hardware: str) -> str:
    """Host-to-device bytes per output token, and SpecMoE's change against three baselines."""
    rows = []
    for b in sorted({b for (_, hw, b) in cells if hw == hardware}):
        per = {e: cells.get((e, hardware, b), {}).get("h2d_bytes_per_token") for e in
               ("offload", "overlap", "caching", "specmoe paper", "specmoe best")}
        r = [b] + [fmt(None if v is None else v / 2**20, ".2f") for v in per.values()]
        for s in ("specmoe paper", "specmoe best"):
            r += ["-" if not (per[s] and per[e]) else f"{100 * (per[s] / per[e] - 1):+.1f}%"
                  for e in ("offload", "overlap", "caching")]
        rows.append(r)
    head = ["batch", "offload MiB", "overlap MiB", "caching MiB", "paper MiB", "best MiB"]
    head += [f"{s} vs {e}" for s in ("paper", "best") for e in ("offload", "overlap", "caching")]
    return table(head, rows)


def speculation(cells: dict, hardware: str) -> str:
    rows = []
    for (e, hw, b), m in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        if hw != hardware or not e.startswith("specmoe"):
            continue
        rows.append([e, b, fmt(m["acceptance_rate"], ".3f"), fmt(m["tokens_per_step"], ".2f"),
                     fmt(m["gamma_chosen"], "d"), f"{m['steady_tokens_per_s']:,.1f}", f"{m['tokens_per_s']:,.1f}",
                     fmt(m["draft_forward_ms"], ".2f"), fmt(m["verify_pass_ms"], ".1f"),
                     fmt(None if m["prefetch_wasted_bytes"] is None else m["prefetch_wasted_bytes"] / 2**30, ".2f")])
    return table(["engine", "batch", "acceptance", "tokens/step", "gamma chosen", "steady tok/s", "tok/s",
                  "draft fwd ms", "verify ms", "prefetch wasted GiB"], rows)


def t_gamma(cells: list[dict]) -> str:
    rows = []
    for c in sorted(cells, key=lambda c: (c["config"]["batch_size"], c["config"]["engine_options"]["gamma"])):
        m = c["metrics"]
        rows.append([c["config"]["batch_size"], c["config"]["engine_options"]["gamma"], f"{m['tokens_per_step']:.2f}",
                     f"{m['acceptance_rate']:.3f}", f"{m['tokens_per_s']:.1f}",
                     " ".join(f"{a:.2f}" for a in m["acceptance_by_position"])])
    return table(["batch", "gamma", "T(gamma) tokens/step", "acceptance", "tok/s", "acceptance by position"], rows)


def draft_sets(cells: list[dict]) -> str:
    """The N sweep and the draft policies: each cell against the product cell (N = 4, hot-temporal) of its batch."""
    def name(c):
        o = c["config"]["engine_options"]
        return f"N = {o.get('draft_experts', 4)}, {o.get('draft_policy', 'hot-temporal')}"
    product = {c["config"]["batch_size"]: c["metrics"]["tokens_per_s"] for c in cells
               if name(c) == "N = 4, hot-temporal"}
    rows = []
    def order(c):  # per batch: the N sweep by N, then the other policies
        o = c["config"]["engine_options"]
        return c["config"]["batch_size"], "draft_policy" in o, o.get("draft_experts", 4), name(c)
    for c in sorted(cells, key=order):
        m, b = c["metrics"], c["config"]["batch_size"]
        rows.append([b, name(c), f"{m['tokens_per_s']:,.1f}", f"{m['tokens_per_s'] / product[b]:.2f}x",
                     f"{m['tokens_per_step']:.2f}", f"{m['acceptance_rate']:.3f}",
                     " ".join(f"{a:.2f}" for a in m["acceptance_by_position"]), f"{m['expert_hit_rate']:.3f}",
                     f"{m['h2d_bytes_per_token'] / 2**20:.2f}", f"{m['draft_forward_ms']:.2f}",
                     f"{m['verify_pass_ms']:.1f}", f"{100 * m['pct_of_bound']:.1f}% {m['bound']}"])
    return table(["batch", "draft set", "tok/s", "x N = 4 hot-temporal", "tokens/step", "acceptance",
                  "acceptance by position", "expert hit rate", "h2d MiB/token", "draft fwd ms", "verify ms",
                  "% of bound"], rows)


def repeat(first: dict, second: dict) -> str:
    """The cells measured on both machines: tok/s on each and the ratio, and whether the counts agree."""
    rows = []
    for key in sorted(set(first) & set(second), key=lambda k: (k[1], k[2], k[0])):
        a, b = first[key], second[key]
        same = all(a[k] == b[k] for k in ("h2d_bytes", "tokens_per_step", "accepted_tokens"))
        rows.append([key[0].replace("adaptive=False,", "").replace(",prefetch=none", ""), key[1], key[2], f"{a['tokens_per_s']:,.1f}", f"{b['tokens_per_s']:,.1f}",
                     f"{b['tokens_per_s'] / a['tokens_per_s']:.3f}", "yes" if same else "no"])
    return table(["engine", "hardware", "batch", "machine 1 tok/s", "machine 2 tok/s", "2 / 1", "same counts"], rows)


def main() -> None:
    main_cells = index(load("paper-nllb"))
    engines = [*BASELINES, *VARIANTS, "resident"]
    print("## Speedup over offload, cuda:budget=25%\n")
    print(figure(main_cells, "cuda:budget=25%", engines))
    print("\n## The 24 GiB-GPU budget, cuda:budget=19%\n")
    print(figure(main_cells, "cuda:budget=19%", ["offload", "nospec", "specmoe best"]))
    print("\n## Host-to-device traffic per output token, cuda:budget=25%\n")
    print(traffic(main_cells, "cuda:budget=25%"))
    for hw in ("cuda:budget=25%", "cuda:budget=19%"):
        print(f"\n## Speculation, {hw}\n")
        print(speculation(main_cells, hw))
    print("\n## T(gamma), cuda:budget=25%\n")
    print(t_gamma(load("paper-nllb-gamma")))
    print("\n## Repeat on a second machine\n")
    for run in ("paper-nllb", "paper-nllb-gamma"):
        print(f"\n{run}:\n")
        print(repeat(index(load(run)), index(load(f"machine2/{run}"))))
    # 2026-12-07, one H100 (runs/h100a): its own trained nllb-like, and mixtral-like
    print("\n## H100: the N sweep and draft policies, nllb-like, cuda:budget=25%\n")
    print(draft_sets(load("h100a/paper-nllb-n-h100a")))
    print("\n## H100: T(gamma) at batch 64, nllb-like, cuda:budget=25%\n")
    print(t_gamma(load("h100a/paper-nllb-gamma-h100a")))
    cells = index(load("h100a/paper-mixtral-h100a"))
    print("\n## H100: mixtral-like, speedup over offload, cuda:budget=25%\n")
    print(figure(cells, "cuda:budget=25%", ["offload", "overlap", "nospec", "specmoe paper", "specmoe best"]))
    print("\n## H100: mixtral-like, host-to-device traffic per output token\n")
    print(traffic(cells, "cuda:budget=25%"))
    print("\n## H100: mixtral-like, speculation\n")
    print(speculation(cells, "cuda:budget=25%"))


if __name__ == "__main__":
    main()
