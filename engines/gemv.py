"""The experts of a layer when a forward routes only a few (token, expert) pairs (decoding or drafting at batch 1 or
2): one Triton matrix-vector kernel per projection that streams each pair's expert weight once, straight from the
routing, with no sort.

torch._grouped_mm sizes its tiles for many rows per group; with one row per expert its narrow projections occupy
few multiprocessors, and a decode step of trained `small` at batch 1 read its experts at 1.7 TB/s of the H200's
4 TB/s (results/h200/runtime/README.md). It also needs the pairs grouped by slot: a sort, a scan, gathers and the
scatter back, a dozen small kernels per layer that cost about as much as the product at batch 1. Here every program
reduces a block of BN output features of one pair's expert weight against its token's row in float32, so a
projection spreads over N / BN programs per pair whatever its shape; the down projection sums a token's K pairs,
weighted by the router, in the same program (a fixed order: deterministic). A slot serving several pairs is read
once per pair, so engines/experts.py takes this path only at a few pairs (PAIRS_MAX). CUDA only; without Triton the
grouped GEMM serves.

Shape keys: P = routed pairs, S = pool slots, K = input features, N = output features.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch comes without Triton
    triton = None

# At most this many routed pairs take the kernel: a decode step or draft at batch 1 or 2 (top-2). At more pairs,
# slots that serve several pairs are likely, and the kernel reads them once per pair (results/h200/gemv/README.md).
PAIRS_MAX = 4
# The tile (BN output features x BK inputs per step, warps): within 5% of the best of the 7 swept for small's up
# projection at 1-4 pairs (results/h200/gemv/README.md).
BLOCK_N, BLOCK_K, WARPS = 8, 512, 4
# How engines/experts.py runs the down projection at few pairs. "summed": each token's K pairs summed in one
# program (pairs=K); "per_pair": a program per pair with DOWN_BLOCK_N features, then a weighted sum over K in torch.
# At batch 1 on small's down shape the summed form took 71 us and the per-pair product 36 us (results/h200/gemv/).
DOWN_MODE = "summed"
DOWN_BLOCK_N = 4


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can serve x (Triton present, a CUDA tensor of a dtype it reduces)."""
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:
    @triton.jit
    def _pairs_gemv(x_ptr, w_ptr, slot_ptr, scale_ptr, y_ptr, S, N, K, stride_x, stride_ws, stride_wn, stride_wk,
                    stride_y, X_DIV: tl.constexpr, PAIRS: tl.constexpr, SCALED: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr):
        r = tl.program_id(0)  # the output row: pairs r * PAIRS ... r * PAIRS + PAIRS - 1
        n = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] output features of this program
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, K, BK):
            k = k0 + tl.arange(0, BK)  # [BK]
            for j in tl.static_range(PAIRS):  # the pairs of one row in the same loop: their loads overlap
                p = r * PAIRS + j
                s = tl.load(slot_ptr + p).to(tl.int64)
                routed = s < S  # slot S: a token that routes nowhere (padding, finished rows) adds nothing
                s = tl.minimum(s, S - 1)
                x = tl.load(x_ptr + (p // X_DIV) * stride_x + k, mask=routed & (k < K), other=0.0).to(tl.float32)
                w = tl.load(w_ptr + s * stride_ws + n[:, None].to(tl.int64) * stride_wn + k[None, :] * stride_wk,
                            mask=routed & (n[:, None] < N) & (k[None, :] < K), other=0.0)
                part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                if SCALED:
                    part = part * tl.load(scale_ptr + p).to(tl.float32)
                acc += part
        tl.store(y_ptr + r * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


def pairs_gemv(x: torch.Tensor, wt: torch.Tensor, slot: torch.Tensor, x_div: int = 1, pairs: int = 1,
               scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, block_n: int = BLOCK_N,
               block_k: int = BLOCK_K, warps: int = WARPS) -> torch.Tensor:
    """y[r] = sum over j < pairs of scale[p] * (x[p // x_div] @ wt[slot[p]]), p = r * pairs + j, summed in float32
    in that order; a pair whose slot is S (wt's first dimension) adds nothing, so its row is 0 when it is alone.
    x [*, K], wt [S, K, N] (any strides, as the pool is stored), slot [P] long, scale [P] or None (1).
    Returns [P / pairs, N] in out_dtype (x's by default); no host sync, so it can be captured in a CUDA graph."""
    P = slot.shape[0]
    K, N = wt.shape[-2], wt.shape[-1]
    assert P % pairs == 0 and x.shape[-1] == K, (P, pairs, tuple(x.shape), tuple(wt.shape))
    x = x.contiguous()
    y = torch.empty((P // pairs, N), dtype=out_dtype or x.dtype, device=x.device)
    if P:  # without a scale, slot stands in for its pointer: the kernel never reads it
        _pairs_gemv[(P // pairs, triton.cdiv(N, block_n))](
            x, wt, slot, slot if scale is None else scale, y, wt.shape[0], N, K, x.stride(0), wt.stride(0),
            wt.stride(2), wt.stride(1), y.stride(0), X_DIV=x_div, PAIRS=pairs, SCALED=scale is not None,
            BN=block_n, BK=block_k, num_warps=warps)
    return y
