"""OLD against NEW engines/ in one process on the GPU: each engine is loaded twice (once from an older checkout's
engines/, imported as the package `old_engines`, once from this tree's), and the two alternate generate by
generate (old new, new old, ...) on the same prompts, so both see the same machine state. Per generate: tokens/s,
h2d bytes and the PCIe bound of those bytes (pinned rate probed here), and whether OLD and NEW gave the same
tokens. With --timeline, one more generate of each side records where each MoE layer's copies wait:

    gpu_tail  the compute stream from the previous layer's last copy landing to this layer's routing (GPU work)
    sync      routing on the GPU to the host's decision (the host's routing read; includes a host that came late)
    issue     the host's decision to the first copy running on the copy stream
    idle      the copy stream's gap before this layer's copies (the sum of the three, up to clock alignment)

    python3 results/h200/hostpath_ab.py --old /tmp/old --model small-random --cells nospec:1,16,256 --timeline
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from engines import registry
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from harness.bounds import probe
from workloads.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from runtime_bench import prompts_for  # noqa: E402 - beside this script

OPTIONS = {"specmoe": dict(gamma=4, adaptive=False, prefetch="none")}
CLASSES = {"offload": ("baselines", "OffloadEngine"), "nospec": ("specmoe", "NoSpecEngine"),
           "specmoe": ("specmoe", "SpecMoEEngine")}


def import_old(root: str):
    """The older checkout's engines/ as the package `old_engines` (its modules import each other relatively)."""
    init = Path(root) / "engines" / "__init__.py"
    spec = importlib.util.spec_from_file_location("old_engines", init, submodule_search_locations=[str(init.parent)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["old_engines"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def make_engine(pkg, name: str):
    if pkg is None:
        return registry.create(name, **OPTIONS.get(name, {}))
    module, cls = CLASSES[name]
    return getattr(importlib.import_module(f"old_engines.{module}"), cls)(**OPTIONS.get(name, {}))


def hardware(pkg):
    mod = importlib.import_module("old_engines.hardware") if pkg is not None else None
    return (mod.HardwareProfile if mod else HardwareProfile).parse("cuda:budget=25%")


def measure(engine, prompts, settings) -> dict:
    g = engine.generate(prompts, settings)
    out = dict(rate=sum(len(t) for t in g.tokens) / (g.t_end - g.t_start), h2d=g.stats["h2d_bytes"], tokens=g.tokens)
    if g.stats.get("draft_forwards"):
        out["draft_forward_ms"] = g.stats["draft_time_s"] / g.stats["draft_forwards"] * 1e3
    return out


class Timeline:
    """Events and host clocks around each MoE layer's routing read and copies, for one generate call."""

    def __init__(self, rt, runtime_module):
        self.rt, self.mod, self.rows = rt, runtime_module, []
        self.copy = rt.store.copy_stream
        name = "routed_counts" if hasattr(runtime_module, "routed_counts") else "distinct_routed"
        self.patched = [(runtime_module, name, getattr(runtime_module, name)),
                        (rt.policy, "serve", rt.policy.serve)]
        routed, serve = self.patched[0][2], self.patched[1][2]

        def timed_routed(*a, **k):
            out = routed(*a, **k)
            self.rows.append(dict(forward=rt.forward_index, h_route=time.perf_counter(), g_route=self._event(None)))
            return out

        def timed_serve(layer, experts):
            row = self.rows[-1]
            row.update(layer=layer, h_decide=time.perf_counter(), g_copy_start=self._event(self.copy))
            before = rt.store.counters.h2d_copies
            serve(layer, experts)
            row.update(copies=rt.store.counters.h2d_copies - before, g_copy_end=self._event(self.copy),
                       h_issued=time.perf_counter())

        setattr(runtime_module, name, timed_routed)
        rt.policy.serve = timed_serve
        torch.cuda.synchronize()
        self.base = self._event(None)
        self.t0 = time.perf_counter()

    @staticmethod
    def _event(stream):
        e = torch.cuda.Event(enable_timing=True)
        e.record(stream)
        return e

    def close(self) -> list[dict]:
        module, name, fn = self.patched[0]
        setattr(module, name, fn)
        del self.rt.policy.serve  # the instance attribute: the class's method again
        torch.cuda.synchronize()
        out = []
        for r in self.rows:
            if "g_copy_end" not in r:
                continue
            row = dict(forward=r["forward"], layer=r["layer"], copies=r["copies"])
            for k in ("g_route", "g_copy_start", "g_copy_end"):
                row[k] = self.base.elapsed_time(r[k])
            for k in ("h_route", "h_decide", "h_issued"):
                row[k] = (r[k] - self.t0) * 1e3
            out.append(row)
        return out


def summarise(rows: list[dict]) -> dict:
    """Medians over the decode steps' layers that copied, and the copy stream's idle per decode step."""
    per, last_end, idle_by_forward = [], None, {}
    for r in rows:
        if r["copies"] and last_end is not None and r["forward"] > 0:
            idle = r["g_copy_start"] - last_end
            per.append(dict(idle=idle, gpu_tail=r["g_route"] - last_end, sync=r["h_decide"] - r["g_route"],
                            issue=r["g_copy_start"] - r["h_decide"],
                            host_late=max(0.0, r["h_route"] - last_end)))
            idle_by_forward[r["forward"]] = idle_by_forward.get(r["forward"], 0.0) + idle
        if r["copies"]:
            last_end = r["g_copy_end"]
    if not per:
        return {}
    out = {k: statistics.median(p[k] for p in per) for k in per[0]}
    out["idle_per_step_ms"] = statistics.median(idle_by_forward.values())
    out["layers"] = len(per)
    return out


def run_cell(name, batch, sides, settings, h2d_rate, rounds, timeline) -> dict:
    vocab = sides["new"][0].runtime.model.config.vocab_size
    prompts = prompts_for(batch, 64, vocab)
    for engine, _ in sides.values():
        engine.prepare(prompts, settings)
    samples = {k: [] for k in sides}
    tokens, extra = {}, {k: [] for k in sides}
    for r in range(rounds):
        for key in (("old", "new") if r % 2 == 0 else ("new", "old")):
            engine = sides[key][0]
            measure(engine, prompts, settings)  # warm-up
            m = measure(engine, prompts, settings)
            samples[key].append(m["rate"])
            tokens[key] = m["tokens"]
            extra[key].append(dict(pct=m["rate"] / (batch * settings.max_new_tokens / (m["h2d"] / h2d_rate)),
                                   draft_forward_ms=m.get("draft_forward_ms")))
    cell = dict(engine=name, batch=batch, samples=samples,
                median={k: statistics.median(v) for k, v in samples.items()},
                pct_of_pcie_bound={k: statistics.median(e["pct"] for e in v) for k, v in extra.items()},
                same_tokens=tokens["old"] == tokens["new"])
    if extra["new"][0]["draft_forward_ms"] is not None:
        cell["draft_forward_ms"] = {k: [e["draft_forward_ms"] for e in v] for k, v in extra.items()}
    cell["new_over_old"] = cell["median"]["new"] / cell["median"]["old"]
    if timeline:
        cell["timeline"] = {}
        for key, (engine, mod) in sides.items():
            t = Timeline(engine.runtime, mod)
            try:
                engine.generate(prompts, settings)
            finally:
                rows = t.close()
            cell["timeline"][key] = summarise(rows)
    return cell


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="root of the older checkout")
    ap.add_argument("--model", default="small-random")
    ap.add_argument("--cells", default="nospec:1,16,256;offload:256", help="ENGINE:BATCH,...;ENGINE:...")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    old = import_old(args.old)
    h2d = probe("cuda")["pinned_h2d_gb_per_s"] * 1e9
    settings = SamplingSettings(max_new_tokens=args.new_tokens)
    cells = []
    for part in args.cells.split(";"):
        name, batches = part.split(":")
        sides = {}
        for key, pkg in (("old", old), ("new", None)):
            engine = make_engine(pkg, name)
            engine.load(load_model(args.model, torch.bfloat16), hardware(pkg))
            mod = importlib.import_module(("old_engines" if pkg else "engines") + ".runtime")
            sides[key] = (engine, mod)
        for batch in map(int, batches.split(",")):
            cell = run_cell(name, batch, sides, settings, h2d, args.rounds, args.timeline)
            print(json.dumps({k: v for k, v in cell.items() if k != "samples"}), flush=True)
            cells.append(cell)
        for engine, _ in sides.values():
            engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), model=args.model, old=args.old,
                           pinned_h2d_gb_per_s=h2d / 1e9, new_tokens=args.new_tokens, cells=cells), f, indent=1)


if __name__ == "__main__":
    main()
