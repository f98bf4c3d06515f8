"""engines/gemv.py's kernel on the CPU, through Triton's interpreter (TRITON_INTERPRET=1), where Triton is installed
(the CPU build of torch comes without it: then skipped; tests/gpu checks the compiled kernel on the H200)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
import types
import torch
from engines import experts, gemv
torch.manual_seed(0)
for transposed in (False, True):
    for S, K, N, P, pairs in [(5, 200, 70, 4, 1), (3, 1030, 24, 2, 2), (6, 64, 9, 4, 2)]:
        w = torch.randn((S, K, N) if transposed else (S, N, K))
        wt = w if transposed else w.transpose(-2, -1)
        slot = torch.randint(0, S, (P,))
        slot[1] = S  # a pair that routes nowhere adds nothing
        x_div = 1 if pairs > 1 else 2  # the down projection: a row per pair; the up: a row per token of 2 pairs
        x = torch.randn(P // x_div, K)
        scale = torch.rand(P) if pairs > 1 else None
        y = gemv.pairs_gemv(x, wt, slot, x_div=x_div, pairs=pairs, scale=scale, block_n=16, block_k=64)
        ref = torch.zeros(P // pairs, N, dtype=torch.float64)
        for p in range(P):
            if slot[p] < S:
                ref[p // pairs] += (1.0 if scale is None else float(scale[p])) * \\
                    (x[p // x_div].double() @ wt[slot[p]].double())
        err = float((y.double() - ref).norm() / ref.norm())
        assert err < 1e-5, (transposed, S, K, N, err)
        assert pairs > 1 or (y[1] == 0).all()

# the layer through the kernel against the layer through the grouped product: batch 2, top-2, one row padding
gemv.available = lambda x: True
S, H, I = 4, 48, 40
module = types.SimpleNamespace(has_gate=True, is_transposed=False,
                               _apply_gate=lambda h: torch.nn.functional.silu(h[:, :I]) * h[:, I:])
pool = {"gate_up_proj": torch.randn(S, 2 * I, H), "down_proj": torch.randn(S, H, I)}
table = torch.tensor([0, 1, 2, 3, 0, 1])
hidden, index = torch.randn(2, H), torch.tensor([[5, 2], [4, 1]])
weights = torch.softmax(torch.randn(2, 2), -1)
for active, mode in [(None, "summed"), (torch.tensor([True, False]), "summed"), (None, "per_pair"),
                     (torch.tensor([True, False]), "per_pair")]:
    gemv.DOWN_MODE = mode
    outs = []
    for few in (4, 0):
        experts.gemv.PAIRS_MAX = few
        counters = experts.ExpertCounters("cpu")
        outs.append((experts.run_experts(module, pool, table, hidden, index, weights, active, counters),
                     counters.read()["experts_read"]))
    (a, read_a), (b, read_b) = outs
    assert read_a == read_b == (3 if active is None else 2), (read_a, read_b)
    assert float((a - b).norm() / b.norm()) < 1e-5
    if active is not None:
        assert (a[1] == 0).all()
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed (CPU torch)")
def test_few_pair_kernel_matches_float64_and_the_grouped_path_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
