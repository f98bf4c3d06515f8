"""The tables of results/h200/acceptance/README.md for one job's archives, printed as Markdown from the committed
cells, so that every number there can be traced to a cell (run from the repository root):

    python3 results/h200/acceptance/tables.py s5    # reads s5/h200-specmoe-s5.tgz and s5/h200-specmoe-n-s5.tgz
"""
from __future__ import annotations

import json
import statistics
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # results/h200: mdtable
from mdtable import fmt as _fmt  # noqa: E402
from mdtable import table  # noqa: E402

HERE = Path(__file__).parent
BASELINES = ("offload", "overlap", "caching", "lru", "nospec")
RIVALS = ("overlap", "caching", "lru", "nospec")  # issue 13's "best of" for the best settings
SWEEP = (1, 2, 4, 6, 8, 10)
GIB = 2**30


def load(archive: Path) -> list[dict]:
    with tarfile.open(archive) as tar:
        return [json.load(tar.extractfile(m)) for m in tar.getmembers()
                if m.isfile() and "/cells/" in m.name and m.name.endswith(".json")]


def label(cell: dict) -> str:
    """offload, ..., nospec; paper, best; gamma N (the fixed-gamma sweep, prefetch draft); or the N-sweep's options."""
    c = cell["config"]
    if c["engine"] != "specmoe":
        return c["engine"]
    o = c["engine_options"] or {}
    if o.get("prefetch") == "none":
        return "paper"
    if "draft_experts" in o:
        return f"N = {o['draft_experts']}"
    if o.get("gamma") == "auto":
        return "best"
    return f"gamma {o['gamma']}"


def index(cells: list[dict]) -> dict[tuple[str, str, int], dict]:
    """(label, hardware, batch) -> the cell, for the valid cells."""
    return {(label(c), c["config"]["hardware"], c["config"]["batch_size"]): c
            for c in cells if c["status"] == "ok" and c["valid"]}


def tps(cells: dict, name: str, hw: str, b: int) -> float | None:
    cell = cells.get((name, hw, b))
    return None if cell is None else cell["metrics"]["tokens_per_s"]


def fmt(x, spec: str = ",.1f") -> str:  # tokens/s with thousands separators unless told otherwise
    return _fmt(x, spec)


def summary(cells: dict, hw: str, batches: list[int]) -> str:
    rows = []
    for b in batches:
        best, nospec = tps(cells, "best", hw, b), tps(cells, "nospec", hw, b)
        rival = max(RIVALS, key=lambda e: tps(cells, e, hw, b) or 0.0)
        fixed = max(SWEEP, key=lambda g: tps(cells, f"gamma {g}", hw, b) or 0.0)
        fixed_tps = tps(cells, f"gamma {fixed}", hw, b)
        chosen = cells[("best", hw, b)]["metrics"]["gamma_chosen"] if ("best", hw, b) in cells else None
        rows.append([b, *(fmt(tps(cells, e, hw, b)) for e in (*BASELINES, "paper")),
                     f"{fmt(best)} ({fmt(chosen, '')})", f"{best / nospec:.2f}x",
                     f"{best / tps(cells, rival, hw, b):.2f}x ({rival})",
                     f"{fixed} ({fmt(fixed_tps)})", f"{best / fixed_tps:.2f}"])
    return table(["batch", *BASELINES, "specmoe paper", "specmoe best (gamma chosen)", "best / nospec",
                  "best / best rival", "best fixed gamma (tok/s)", "best / best fixed"], rows)


def sweep(cells: dict, hw: str, batches: list[int]) -> str:
    return table(["batch", *(f"gamma {g}" for g in SWEEP), "gamma 4 without prefetch"],
                 [[b, *(fmt(tps(cells, f"gamma {g}", hw, b)) for g in SWEEP), fmt(tps(cells, "paper", hw, b))]
                  for b in batches])


def prefetch(cells: dict, hw: str, batches: list[int]) -> str:
    """Gamma 4 with prefetch draft (the sweep's cell) against the paper cell: only prefetch differs."""
    rows = []
    for b in batches:
        none, draft = cells[("paper", hw, b)]["metrics"], cells[("gamma 4", hw, b)]["metrics"]
        fetched, wasted = draft["prefetch_h2d_bytes"], draft["prefetch_wasted_bytes"]
        rows.append([b, fmt(none["verify_h2d_bytes"] / GIB, ".2f"), fmt(draft["verify_h2d_bytes"] / GIB, ".2f"),
                     f"{draft['verify_h2d_bytes'] / none['verify_h2d_bytes'] - 1:+.0%}", fmt(fetched / GIB, ".2f"),
                     f"{draft['prefetch_used_bytes'] / fetched:.0%}", fmt(wasted / GIB, ".2f"),
                     f"{none['tokens_per_s']:,.1f} -> {draft['tokens_per_s']:,.1f} "
                     f"({draft['tokens_per_s'] / none['tokens_per_s']:.2f}x)"])
    return table(["batch", "verification's copies, prefetch none (GiB)", "with prefetch draft (GiB)", "change",
                  "prefetched (GiB)", "of it used", "wasted (GiB)", "tok/s none -> draft"], rows)


def bounds(cells: dict, hw: str, batches: list[int]) -> str:
    names = (*BASELINES, "paper", "best")
    def pct(n, b):
        c = cells.get((n, hw, b))
        return "-" if c is None else f"{c['metrics']['pct_of_bound']:.1%} {c['metrics']['bound']}"
    return table(["batch", *names], [[b, *(pct(n, b) for n in names)] for b in batches])


def first_iterations(cells: dict) -> str:
    """Each cell's first measured iteration against the median of the others, the worst cells first."""
    ratios = []
    for (name, hw, b), c in cells.items():
        s = c["samples"]["tokens_per_s"]
        ratios.append((s[0] / statistics.median(s[1:]), name, hw, b))
    ratios.sort()
    out = [f"{len(ratios)} cells; first / median of the others from {ratios[0][0]:.3f} to {ratios[-1][0]:.3f}; "
           f"outside 0.85-1.15: {sum(not 0.85 <= r <= 1.15 for r, *_ in ratios)}"]
    out += [f"- {r:.3f} {n} {hw} batch {b}" for r, n, hw, b in ratios[:3]]
    return "\n".join(out)


def details(cells: dict, hw: str, batches: list[int], names: tuple[str, ...]) -> str:
    rows = []
    for b in batches:
        for n in names:
            m = cells[(n, hw, b)]["metrics"]
            rows.append([b, n, fmt(m["tokens_per_s"]), fmt(m["steady_tokens_per_s"]), fmt(m["acceptance_rate"], ".3f"),
                         fmt(m["tokens_per_step"], ".2f"), fmt(m["draft_forward_ms"], ".2f"),
                         fmt(m["verify_pass_ms"], ".1f"), fmt(m["h2d_bytes_per_token"] / 2**20, ",.1f"),
                         fmt(m["teacher_forced_top1"], ".3f")])
    return table(["batch", "cell", "tok/s", "steady tok/s", "acceptance", "tokens/step", "draft fwd ms", "verify ms",
                  "h2d MiB/token", "top-1"], rows)


def n_sweep(cells: dict) -> str:
    rows = []
    for hw in sorted({hw for (_, hw, _) in cells}):
        for b in sorted({b for (_, h, b) in cells if h == hw}):
            ref = tps(cells, "nospec", hw, b)
            for (n, h, bb), c in sorted(cells.items()):
                if h != hw or bb != b:
                    continue
                m = c["metrics"]
                rows.append([hw, b, n, fmt(m["tokens_per_s"]), "-" if ref is None else f"{m['tokens_per_s'] / ref:.2f}x",
                             fmt(m["acceptance_rate"], ".3f"), fmt(m["tokens_per_step"], ".2f"),
                             fmt(m["gamma_chosen"], ""), f"{m['pct_of_bound']:.1%}"])
    return table(["hardware", "batch", "cell", "tok/s", "x nospec (same budget)", "acceptance", "tokens/step",
                  "gamma chosen", "% of bound"], rows)


def main(job: str) -> None:
    main_cells = index(load(HERE / job / f"h200-specmoe-{job}.tgz"))
    hw = "cuda:budget=25%"
    batches = sorted({b for (_, h, b) in main_cells if h == hw})
    print("### tok/s\n\n" + summary(main_cells, hw, batches))
    print("\n### The gamma sweep (fixed gamma, adaptive off, prefetch draft), tok/s\n\n" + sweep(main_cells, hw, batches))
    print("\n### Draft-guided prefetch at gamma 4\n\n" + prefetch(main_cells, hw, batches))
    print("\n### % of each cell's own bound\n\n" + bounds(main_cells, hw, batches))
    print("\n### paper and best settings in detail\n\n" + details(main_cells, hw, batches, ("paper", "best")))
    print("\n### First measured iteration\n\n" + first_iterations(main_cells))
    n_archive = HERE / job / f"h200-specmoe-n-{job}.tgz"
    if n_archive.exists():
        n_cells = index(load(n_archive))
        # under cuda:budget=25% all that fit is N = 2: the main matrix's best-settings cell, and its nospec
        n_cells.update({k: v for k, v in main_cells.items() if k[0] in ("best", "nospec") and k[2] in (16, 64)})
        print("\n### The N sweep (gamma auto, prefetch draft)\n\n" + n_sweep(n_cells))
        print("\n" + first_iterations(index(load(n_archive))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "s5")
