"""The arithmetic of every expert in the project: routed (token, expert) pairs, grouped by the pool slot that serves
them, through one grouped GEMM per projection over the device expert pool (at a few pairs on CUDA, engines/gemv.py's
kernel, straight from the routing). No host sync and no Python loop over experts, so a layer whose slots are known
on the device (all resident, or a draft's substitution table) can be captured in a CUDA graph; every engine computes
its experts here, so outputs are comparable.

Shape keys: N = tokens of the forward, K = experts per token, P = N * K routed pairs, S = pool slots, H = hidden.
"""
from __future__ import annotations

import torch

from . import gemv

# torch._grouped_mm has a fast kernel for these; other dtypes (float64) run one matmul per group instead
_GROUPED_DTYPES = (torch.bfloat16, torch.float32)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows x[offs[g-1]:offs[g]] times slot g's weight. w: [S, out, in] (transposed=False, as nn.Linear stores
    it) or [S, in, out]; offs [S] int32 cumulative row counts. Rows from offs[-1] on are left unwritten."""
    wt = _in_out(w, transposed)
    if _use_grouped_mm(x, wt):
        return torch._grouped_mm(x, wt, offs=offs)
    out = torch.zeros((x.shape[0], wt.shape[-1]), dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):  # a host sync: only where no grouped kernel serves this dtype
        if end > start:
            out[start:end] = x[start:end] @ wt[g]
        start = end
    return out


def _use_grouped_mm(x: torch.Tensor, wt: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_DTYPES:
        return False
    if x.device.type == "cuda":  # the CUDA kernel is bf16 (sm80+); float32 there takes the loop
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return True


class ExpertCounters:
    """Device-side tallies that graph replays keep up to date (the host reads them once per generate call):
    distinct experts each layer's forward read from the pool, and for drafts, distinct routed experts and how
    many of them were served by a substitute."""

    NAMES = ("experts_read", "draft_requests", "draft_substituted", "resident_hits")

    def __init__(self, device):
        self.values = torch.zeros(len(self.NAMES), dtype=torch.long, device=device)
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.add_to((name,), value)

    def add_to(self, names: tuple[str, ...], value: torch.Tensor) -> None:
        """Add one device scalar to several tallies, in one kernel."""
        key = tuple(self.NAMES.index(n) for n in names)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(key, dtype=torch.long, device=self.values.device)
        self.values.index_add_(0, index, value.reshape(1).expand(len(key)))

    def add_vector(self, names: tuple[str, ...], values: torch.Tensor) -> None:
        """Add values [n] to n tallies that follow each other in NAMES, in one kernel."""
        i = self.NAMES.index(names[0])
        assert self.NAMES[i:i + len(names)] == names, names
        self.values[i:i + len(names)] += values

    def read(self) -> dict[str, int]:
        return dict(zip(self.NAMES, self.values.tolist()))

    def reset(self) -> None:
        self.values.zero_()


def run_experts(module, pool: dict[str, torch.Tensor], slot_table: torch.Tensor, hidden: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor, active: torch.Tensor | None,
                counters: ExpertCounters, tally: tuple[str, ...] = (), stages: "Stages | None" = None) -> torch.Tensor:
    """The experts of one MoE layer. slot_table [E]: the pool slot serving each expert id (for a draft, the slot
    of its nearest resident expert); active [N] or None: tokens that route at all (padding and finished rows
    do not). The distinct slots read are added to experts_read and to the `tally` counters. `stages`: for a layer
    whose copies are still landing (CUDA), the pairs are computed stage by stage, each once its copies have landed,
    so the compute overlaps the copies still in flight. Returns [N, H]."""
    N, K = top_k_index.shape
    S = next(iter(pool.values())).shape[0]
    slot = slot_table[top_k_index]  # [N, K]
    if active is not None:
        slot = torch.where(active[:, None], slot, S)  # S: a sentinel that sorts last and joins no group
    flat = slot.reshape(-1)  # [P]
    counts = _slot_counts(flat, S)
    counters.add_to(("experts_read",) + tally, (counts[:S] > 0).sum())
    if flat.shape[0] <= gemv.PAIRS_MAX and _few_pairs_serve(module, pool, hidden):
        if stages is not None:
            stages.wait_all()
        return _few_pairs(module, pool, hidden, flat, top_k_weights.reshape(-1), K)
    if stages is None:
        h = _pair_outputs(module, pool, hidden, flat, counts, K)
    else:
        h = stages.pair_outputs(module, pool, hidden, flat, K)
    weight = top_k_weights.reshape(-1)  # in the router's dtype, as transformers' own experts weigh them
    h = torch.where((flat < S)[:, None], h * weight[:, None], 0.0)  # rows of the sentinel are unwritten
    return h.view(N, K, -1).sum(dim=1).to(hidden.dtype)


def _slot_counts(flat: torch.Tensor, S: int) -> torch.Tensor:
    """[S + 1] int32: pairs per slot, the sentinel's last."""
    counts = torch.zeros(S + 1, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


def _pair_outputs(module, pool, hidden, flat, counts, K) -> torch.Tensor:
    """Each routed pair's expert output before the router's weight, [P, H] in pair order (flat [P]: the pairs'
    slots; rows of pairs at the sentinel S are left unwritten)."""
    S = counts.shape[0] - 1
    order = torch.argsort(flat, stable=True)  # pairs grouped by slot; ascending token order inside a slot
    offs = torch.cumsum(counts[:S], 0, dtype=torch.int32)  # [S]
    x = hidden[order // K]  # [P, H]
    sorted_slot = flat[order].clamp(max=S - 1)  # bias rows of the sentinel tail are never used
    if module.has_gate:
        h = _linear(module, x, pool, "gate_up_proj", offs, sorted_slot)
        h = module._apply_gate(h)
    else:
        h = module.act_fn(_linear(module, x, pool, "up_proj", offs, sorted_slot))
    h = _linear(module, h, pool, "down_proj", offs, sorted_slot)  # [P, H]
    if getattr(module, "has_post_expert_norm", False):
        h = module.post_expert_norm(h)
    unsorted = torch.empty_like(h)
    unsorted[order] = h  # a permutation: deterministic, unlike index_add_
    return unsorted


class Stages:
    """The pool slots of one layer in the order their copies land: stage 0 the slots already there, then groups
    of copies, each with the copy-stream event after which its slots hold their experts, and the number of routed
    pairs each stage serves (the host knows it from the layer's routing sync).

    The pairs are sorted once, stage first and slot second, so each stage's pairs are one run of rows; a stage
    runs two grouped GEMMs over a view of P rows that starts at its run (the one pass's call shape: a pair's output
    does not depend on which rows share its call, each row is its own product), and its gate only over its own
    rows. So the staged sum equals the one-pass sum bit for bit, and a stage costs a few kernels, not the whole
    sort-gather-scatter pipeline over every pair."""

    def __init__(self, stage_of_slot: torch.Tensor, events: list, sizes: list[int]):
        self.stage_of_slot = stage_of_slot  # [S + 1] long on the device: each slot's stage, -1 for none
        self.events = events  # [stage] the event to wait for before computing it (None: already there)
        self.sizes = sizes  # [stage] routed pairs whose slot is in it (host ints)
        assert len(sizes) == len(events), (sizes, events)

    def wait_all(self) -> None:
        stream = torch.cuda.current_stream(self.stage_of_slot.device)
        for event in self.events:
            if event is not None:
                stream.wait_event(event)

    def pair_outputs(self, module, pool, hidden: torch.Tensor, flat: torch.Tensor, K: int) -> torch.Tensor:
        """Each routed pair's expert output before the router's weight, [P, H] in pair order, stage by stage
        (rows of pairs at the sentinel S are left unwritten), like _pair_outputs."""
        S, J, P = next(iter(pool.values())).shape[0], len(self.events), flat.shape[0]
        stage = self.stage_of_slot[flat]  # [P]
        stage = torch.where(stage < 0, J, stage)  # the sentinel's pairs sort after every stage
        key = stage * (S + 1) + flat  # stage-major, then slot
        order = torch.argsort(key, stable=True)  # ascending token order inside a slot, as in one pass
        per = torch.zeros((J + 1) * (S + 1), dtype=torch.int32, device=flat.device)
        per.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
        offs = per.view(J + 1, S + 1)[:J, :S].cumsum(1, dtype=torch.int32)  # [J, S]: each stage's groups from 0
        starts = [sum(self.sizes[:j]) for j in range(J)]
        pad = starts[-1] if J else 0  # a stage's view is P rows from its start
        rows = torch.cat([order // K, order.new_zeros(pad)])  # padding rows read token 0: never a group's
        x = hidden[rows]  # [P + pad, H]
        sorted_slot = torch.cat([flat[order].clamp(max=S - 1), order.new_zeros(pad)])  # for expert biases
        up = "gate_up_proj" if module.has_gate else "up_proj"
        mid = out = None  # [P, I]: the stage's gated rows (its down projection's input); [P, H]: every stage's
        stream = torch.cuda.current_stream(flat.device) if flat.is_cuda else None
        for j, (event, start, n) in enumerate(zip(self.events, starts, self.sizes)):
            if event is not None:
                stream.wait_event(event)
            if n == 0:
                continue
            h = _stage_linear(module, x[start:start + P], pool, up, offs[j], sorted_slot[start:start + n], n)
            h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # [n, I]
            if mid is None:
                mid = h.new_empty((P, h.shape[1]))
            mid[:n] = h
            d = _stage_linear(module, mid, pool, "down_proj", offs[j], sorted_slot[start:start + n], n)
            if out is None:
                out = d.new_empty((P, d.shape[1]))
            out[start:start + n] = d
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        unsorted = torch.empty_like(out)
        unsorted[order] = out  # a permutation: deterministic, unlike index_add_
        return unsorted


def _stage_linear(module, x, pool, name, offs, sorted_slot, n):
    """A stage's rows (the first n of x, which has the one pass's P rows) through one projection: [n, out]."""
    out = grouped_linear(x.to(pool[name].dtype), pool[name], offs, module.is_transposed)[:n]
    bias = pool.get(name + "_bias")
    return out + bias[sorted_slot] if bias is not None else out


def _linear(module, x, pool, name, offs, sorted_slot):
    out = grouped_linear(x.to(pool[name].dtype), pool[name], offs, module.is_transposed)
    bias = pool.get(name + "_bias")
    return out + bias[sorted_slot] if bias is not None else out


def _in_out(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A pool weight as [S, in, out] (a view)."""
    return w if transposed else w.transpose(-2, -1)


def _few_pairs_serve(module, pool, hidden) -> bool:
    """Whether engines/gemv.py serves this layer: Triton on this device, and no expert bias or post-expert norm
    (the families that have them take the grouped GEMM)."""
    return gemv.available(hidden) and not any(n.endswith("_bias") for n in pool) and \
        not getattr(module, "has_post_expert_norm", False)


def _few_pairs(module, pool, hidden, flat, weight, K):
    """The experts at a few routed pairs (flat [P]: each pair's slot, S for none): the up projection row by row
    from the routing, the down projection summing each token's K pairs weighted by the router, no sort."""
    name = "gate_up_proj" if module.has_gate else "up_proj"
    x = hidden.to(pool[name].dtype)
    h = gemv.pairs_gemv(x, _in_out(pool[name], module.is_transposed), flat, x_div=K)  # [P, I]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    down = _in_out(pool["down_proj"], module.is_transposed)
    if gemv.DOWN_MODE == "per_pair":  # a pair that routes nowhere gives a row of zeros
        y = gemv.pairs_gemv(h, down, flat, block_n=gemv.DOWN_BLOCK_N)  # [P, H]
        return (y.view(-1, K, y.shape[-1]) * weight.view(-1, K, 1)).sum(dim=1).to(hidden.dtype)
    return gemv.pairs_gemv(h, down, flat, pairs=K, scale=weight, out_dtype=hidden.dtype)  # [N, H]


def routed_counts(top_k_index: torch.Tensor, active: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """[E] int32: routed pairs of the active tokens per expert (on the device, no sync)."""
    flat = top_k_index.reshape(-1)
    if active is not None:
        flat = torch.where(active[:, None].expand_as(top_k_index).reshape(-1), flat, num_experts)
    hit = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    hit.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return hit[:num_experts]


def distinct_experts(top_k_index: torch.Tensor, active: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """[E] long: 1 for each expert that at least one active token routes to, else 0 (on the device, no sync)."""
    flat = top_k_index.reshape(-1)
    if active is not None:
        flat = torch.where(active[:, None].expand_as(top_k_index).reshape(-1), flat, num_experts)
    return torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_(0, flat, 1)[:num_experts]


def graph_safe(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the experts forward runs without a host sync for this dtype and device (a grouped kernel exists)."""
    x = torch.empty((0, 8), dtype=dtype, device=device)
    return _use_grouped_mm(x, x)
