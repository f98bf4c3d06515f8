"""The one model runtime every engine shares: a transformers MoE model whose non-expert weights and KV cache
live on the device while expert weights live in host memory, moved by an ExpertPolicy into the device expert
pool (engines/store.py).

Engines differ only in their policy (which experts stay in the pool, when copies happen) and, for SpecMoE, in the
decode loop. Every forward runs the model's own modules over a static KV cache (engines/kvcache.py) with the
experts computed by one grouped GEMM per projection (engines/experts.py). A forward whose experts the policy
serves without a host decision (everything resident; a draft's substitution table) is replayed from a CUDA graph
(engines/graphs.py); the others learn each MoE layer's routing with one host sync, where the copies are decided.
Sampling, outputs and padding are engines/decoding.py's.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from . import gemv
from .decoding import (DeviceClock, Generation, Outputs, RowMask, Sampler,  # noqa: F401 - re-exported
                       SamplingSettings, check_prompts, left_pad, right_pad, teacher_forcing_batch)
from .disktier import DiskTier
from .errors import BadInput
from .experts import ExpertCounters, Stages, graph_safe, routed_counts, run_experts
from .graphs import GraphCache
from .kvcache import MaskShape, StaticKV, attention_masks, check_fits, check_positions
from .store import ExpertStore, StoreCounters  # noqa: F401 - StoreCounters is part of this module's API

EXPERTS_IMPLEMENTATION = "specmoe_bench"
SUPPORTED_FAMILIES = "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS (tested; any transformers MoE whose " \
                     "experts module is built with use_experts_implementation)"
CAPACITY_ROUND = 16  # static caches are sized up to a multiple of this, so nearby shapes share graphs
# A layer whose copies are still landing computes its experts in at most this many groups of copies, each once it
# has landed: only the last group's compute waits for the link (more groups: more small kernels per layer); 0
# computes the layer in one pass once every copy has landed.
COPY_STAGES = 8


# ----------------------------------------------------------------------------------------------------------------
# Policies: an engine's decision of where each expert comes from. The base class is naive on-demand offload.
# ----------------------------------------------------------------------------------------------------------------


class ExpertPolicy:
    """Serves the experts one MoE layer needs for one forward pass.

    The default is the paper's MoE-OnDemand: every needed expert that is not in the pool is copied when its
    layer runs and its slot given back once the layer's experts are queued."""

    store: ExpertStore

    def bind(self, store: ExpertStore) -> None:
        self.store = store
        store.allocate(self.slots(store))
        self.setup()
        store.sync_all()

    def slots(self, store: ExpertStore) -> int:
        """Pool slots this policy needs: experts it keeps plus one layer's worth for the copies of a pass."""
        return store.num_experts

    def setup(self) -> None:
        """Fill the pool with what the policy keeps from the start (called once the pool exists)."""

    def sync_free_table(self, layer: int) -> torch.Tensor | None:
        """[E] slots on the device that serve every expert id of this layer with no host decision, or None
        (then `serve` is called with the routed experts). Default: the pool's own table when it holds every
        expert of the model."""
        return self.store.slot_of[layer] if self.store.all_resident() else None

    def graphable(self) -> bool:
        """Whether every MoE layer of the next forward has a sync-free table (then it may be a graph replay)."""
        return self.store.all_resident()

    def count_sync_free(self, layer: int, top_k_index: torch.Tensor, active: torch.Tensor | None,
                        counters: ExpertCounters) -> tuple[str, ...]:
        """Tallies for a layer served by its sync-free table, on the device. Returns the tallies that the layer's
        distinct slots count into (the pool's own table maps experts to slots one to one: each is a hit)."""
        return ("resident_hits",)

    def note_routing(self, layer: int, pairs: list[int]) -> None:
        """Before `serve`: the routed pairs (token, expert) of each expert of the layer this pass, from the layer's
        one host sync. Default: unused."""

    def serve(self, layer: int, experts: list[int]) -> None:
        """Make every expert in `experts` (routed this pass, ascending) present in the pool; count hits/misses."""
        for e in experts:
            if (layer, e) in self.store.resident:
                self.store.counters.hits += 1
            else:
                self.store.counters.misses += 1
                self.store.copy_to_device(layer, e)

    def after_layer(self, layer: int, experts: list[int] | None) -> None:
        """Once a layer's experts are queued: give back the slots of copies that are not kept. `experts` is None
        for a layer served by its sync-free table."""
        if experts is not None:
            for e in experts:
                self.store.drop(layer, e)

    def begin_forward(self, forward_index: int) -> None:
        """Called before every model forward (prefill, decode step, draft step or verification)."""

    def end_forward(self) -> None:
        """Called after every model forward."""


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What was loaded, for the result files."""

    name: str
    source: str  # "trained" | "synthetic" | "checkpoint" | "hub" | "config"
    architecture: str
    moe_layers: int
    experts_per_layer: int
    top_k: int | None
    expert_bytes: int
    total_expert_bytes: int
    non_expert_bytes: int
    layers_loaded: int | None = None
    layers_total: int | None = None
    notes: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# The runtime.
# ----------------------------------------------------------------------------------------------------------------


def _experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation registered in transformers' registry; it finds the runtime that owns the module."""
    return module._smb_runtime._run_experts(module, module._smb_layer, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts_forward)


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules built with transformers' @use_experts_implementation (fused [E, ...] expert weights)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "num_experts") and hasattr(m, "is_transposed") and hasattr(m, "has_gate")]


def _sdpa_backends():
    """Attention backends for the runtime's forwards: cuDNN's is left out, as it builds a plan per new shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class ModelRuntime:
    """Owns a model with experts in host memory and runs forwards under an ExpertPolicy."""

    def __init__(self, model: nn.Module, device: str | torch.device, policy: ExpertPolicy | None = None,
                 disk_dir: str | None = None):
        """disk_dir: the disk tier's directory (`host=disk`): the experts go to a file there, not host memory."""
        self.device = torch.device(device)
        model.eval()
        experts = find_experts_modules(model)
        if not experts:
            raise BadInput(f"model {type(model).__name__} has no MoE layers with a fused experts module that the "
                           f"runtime can serve; supported families: {SUPPORTED_FAMILIES}")
        pin = self.device.type == "cuda" and disk_dir is None  # the disk tier pins its staging buffers instead
        host = []
        for layer, (_, m) in enumerate(experts):
            params = {name: p for name, p in m.named_parameters(recurse=False)
                      if p.dim() >= 2 and p.shape[0] == m.num_experts}
            host.append({name: (p.detach().contiguous().pin_memory() if pin else p.detach().contiguous())
                         for name, p in params.items()})
            for name in params:  # the module keeps an empty stand-in so model.to(device) leaves experts behind
                setattr(m, name, nn.Parameter(torch.empty(0, dtype=params[name].dtype), requires_grad=False))
            m._smb_runtime = self
            m._smb_layer = layer
        self.experts_modules = [m for _, m in experts]
        self.model = model.to(self.device)
        self.model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        self.base, self.lm_head = self.model.base_model, self.model.get_output_embeddings()
        self.masks = MaskShape(self.model)
        disk = DiskTier(host, disk_dir, pin=self.device.type == "cuda") if disk_dir is not None else None
        self.store = ExpertStore(host, self.device, disk)
        del host  # with the disk tier, the experts' host memory goes once the model's own tensors go
        self.dtype = next(iter(self.store.host[0].values())).dtype
        self.top_k = self._top_k(model.config)
        self.non_expert_bytes = sum(p.nbytes for p in self.model.parameters()) + \
            sum(b.nbytes for b in self.model.buffers())
        self.dense_read_bytes = self._dense_read_bytes()
        self.counters = ExpertCounters(self.device)
        self.use_graphs = self.device.type == "cuda" and graph_safe(self.dtype, self.device)
        self.graphs: GraphCache | None = None  # the graphs captured on the current static cache
        self.policy = policy or ExpertPolicy()
        self.policy.bind(self.store)
        self.token_mask: torch.Tensor | None = None  # [N] bool: tokens of this forward whose experts run
        self.routing_log: list[tuple[int, int, list[int]]] | None = None  # (forward, layer, experts) when recording
        self.forward_index = 0
        self.forwards = 0  # forwards since the last reset_stats (for weight_read_bytes)
        self._kv: StaticKV | None = None
        self._cache_kw = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"

    @staticmethod
    def _top_k(config) -> int | None:
        for key in ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token"):
            if getattr(config, key, None):
                return int(getattr(config, key))
        return None

    def _dense_read_bytes(self) -> int:
        """Non-expert weight bytes one forward reads: every parameter except the input embedding table, of which
        a forward reads only its tokens' rows (unless the output layer shares it)."""
        embed = self.model.get_input_embeddings().weight
        tied = self.lm_head is not None and self.lm_head.weight.data_ptr() == embed.data_ptr()
        return sum(p.nbytes for p in self.model.parameters()) - (0 if tied else embed.nbytes)

    def set_policy(self, policy: ExpertPolicy) -> None:
        self.policy = policy
        policy.bind(self.store)

    # -- the experts of one MoE layer --------------------------------------------------------------------------

    def _run_experts(self, module, layer, hidden_states, top_k_index, top_k_weights):
        active, policy, E = self.token_mask, self.policy, self.store.num_experts
        table = policy.sync_free_table(layer) if self.routing_log is None else None
        experts, tally = None, ()
        if table is None:
            # the layer's one host sync, where copies are decided: pairs per expert (the stages are sized by them)
            pairs = routed_counts(top_k_index, active, E).tolist()
            experts = [e for e, n in enumerate(pairs) if n]
            if self.routing_log is not None:
                self.routing_log.append((self.forward_index, layer, experts))
            policy.note_routing(layer, pairs)
            policy.serve(layer, experts)
            stages = self._stages(layer, experts, pairs, top_k_index.numel())
            table = self.store.slot_of[layer]
        else:
            tally, stages = policy.count_sync_free(layer, top_k_index, active, self.counters), None
        out = run_experts(module, self.store.pool, table, hidden_states, top_k_index, top_k_weights, active,
                          self.counters, tally, stages)
        policy.after_layer(layer, experts)
        return out

    def _stages(self, layer: int, experts: list[int], pairs: list[int], routed: int) -> Stages | None:
        """The layer's routed slots in the order their copies land (engines/experts.py computes each stage once its
        copies are in, so only the last stage's compute waits for the link): the slots already in the pool first,
        then the copies in COPY_STAGES groups of consecutive copies. pairs[e]: the pairs routed to expert e.
        None when nothing routed is still landing."""
        if COPY_STAGES < 1 or routed <= gemv.PAIRS_MAX:  # one pass once every copy has landed. At a few pairs the
            self.store.sync_layer(layer)  # compute is small and the host is on the critical path: with stages,
            return None                   # nospec at batch 1 ran 28% slower on the H200 (results/h200/stages/)
        store = self.store
        slot_pairs = {store.resident[(layer, e)]: pairs[e] for e in experts}
        landing = store.landing(layer, set(slot_pairs))
        if not landing:
            return None
        stage_of = [-1] * (store.num_slots + 1)  # the sentinel slot is in no stage
        present = set(slot_pairs) - {slot for slot, _ in landing}
        for slot in present:
            stage_of[slot] = 0
        events, sizes = ([None], [sum(slot_pairs[s] for s in present)]) if present else ([], [])
        size = -(-len(landing) // COPY_STAGES)
        for start in range(0, len(landing), size):
            group = landing[start:start + size]
            for slot, _ in group:
                stage_of[slot] = len(events)
            events.append(group[-1][1])  # one copy stream: the group's last copy lands after the others
            sizes.append(sum(slot_pairs[slot] for slot, _ in group))
        table = torch.tensor(stage_of, dtype=torch.long).pin_memory()  # pinned: queued without a host sync
        return Stages(table.to(self.device, non_blocking=True), events, sizes)

    # -- forwards --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, state: "DecodeState", ids: torch.Tensor, token_mask: torch.Tensor,
                at: torch.Tensor | None = None) -> torch.Tensor:
        """One model forward: ids [B, T] at each row's next positions (state.pos); token_mask [B, T]: tokens that
        route to experts. Returns logits [B, T, V], or [B, C, V] at the columns `at` [B, C] of this forward."""
        B, T = ids.shape
        self.policy.begin_forward(self.forward_index)
        try:
            inputs = dict(ids=ids, pos=state.pos, token_mask=token_mask)
            if at is not None:
                inputs["at"] = at
            if state.kv is self._kv and self.graphs is not None and self.routing_log is None \
                    and self.policy.graphable():
                kv = state.kv
                logits = self.graphs.run((B, T, None if at is None else at.shape[1]),
                                         lambda **x: self._body(kv, **x), inputs)
            else:
                logits = self._body(state.kv, **inputs)
        finally:
            self.policy.end_forward()
            self.token_mask = None
            self.forward_index += 1
            self.forwards += 1
        return logits

    def _body(self, kv: StaticKV, ids, pos, token_mask, at=None) -> torch.Tensor:
        qpos = (pos[:, None] + torch.arange(ids.shape[1], device=ids.device)).clamp(max=kv.capacity - 1)  # [B, T]
        kv.cols = qpos
        self.token_mask = token_mask.reshape(-1)
        masks = attention_masks(self.masks, qpos, kv.capacity, self.dtype)
        with _sdpa_backends():
            hidden = self.base(input_ids=ids, attention_mask=masks, position_ids=qpos, use_cache=True,
                               **{self._cache_kw: kv}).last_hidden_state  # [B, T, H]
        if at is not None:
            hidden = hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(hidden)

    def static_kv(self, batch: int, capacity: int) -> StaticKV:
        """The static cache of this batch shape: reused while the shape holds (so graphs captured on it stay
        valid), replaced when it changes."""
        kv = self._kv
        if kv is None or kv.batch != batch or kv.capacity != capacity:
            if self.graphs is not None:
                self.sync()  # nothing queued may still use the old cache or graphs
            self._kv, self.graphs = None, None  # a new memory pool with the new cache: graphs never outlive theirs
            check_fits(self.model.config, batch, capacity, self.dtype, self.device)
            kv = self._kv = StaticKV(batch, capacity, self.device)
            if self.use_graphs:
                self.graphs = GraphCache(self.device, self.counters.values)
        return kv

    def release(self) -> None:
        """Give back the device memory this runtime holds (pool, cache, graphs), and the disk tier's file."""
        self.graphs, self._kv = None, None
        self.store.pool, self.store.resident = {}, {}
        if self.store.disk is not None:
            self.sync()  # no copy out of its staging buffers is still queued
            self.store.disk.close()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_stats(self) -> None:
        self.store.reset_counters()
        self.counters.reset()
        self.forwards = 0

    def stats(self) -> dict:
        """The store's counters plus the device tallies (one host transfer), for a Generation."""
        tallies = self.counters.read()
        counters = self.store.counters.snapshot()
        counters["hits"] += tallies.pop("resident_hits")
        counters["weight_read_bytes"] = tallies.pop("experts_read") * self.store.expert_bytes + \
            self.forwards * self.dense_read_bytes
        return dict(counters, **tallies)

    # -- plain autoregressive decoding, shared by every engine except SpecMoE's speculative loop ---------------

    def prefill(self, prompts: list[list[int]], max_new_tokens: int, slack: int = 0, pad_id: int = 0):
        """Batched prefill, prompts right-padded from column 0, into a static cache with room for max_new_tokens
        (plus `slack` positions a speculative step may write past a row's end). Returns (logits of each row's last
        prompt token [B, V], state)."""
        self.forward_index = 0  # forward indices restart per batch, so routing traces line up between runs
        ids, lens = right_pad(prompts, self.device, pad_id)
        B, L = ids.shape
        check_positions(self.model.config, L + max_new_tokens)
        capacity = -(-(L + max_new_tokens + slack) // CAPACITY_ROUND) * CAPACITY_ROUND
        state = DecodeState(self.static_kv(B, capacity), torch.zeros(B, dtype=torch.long, device=self.device))
        token_mask = torch.arange(L, device=self.device)[None, :] < lens[:, None]
        logits = self.forward(state, ids, token_mask, at=(lens - 1)[:, None])
        state.pos = lens
        return logits[:, -1, :], state

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> Generation:
        """Greedy or sampled autoregressive decoding: one forward per token."""
        self.reset_stats()
        sampler = Sampler(settings)
        out = Outputs(len(prompts), settings)
        t_start = time.perf_counter()
        logits, state = self.prefill(prompts, settings.max_new_tokens)
        tok, tok_host = sampler.next(logits, self.device)
        t_first = time.perf_counter()  # sampler.next waited for the device
        out.emit_all(tok_host)
        if settings.greedy and settings.eos_token_id is None:
            step_times, step_tokens, step_rows = self._decode_ahead(state, tok, out, t_first)
        else:
            step_times, step_tokens, step_rows = self._decode_synced(state, tok, out, sampler)
        stats = {k: v for k, v in self.stats().items() if not k.startswith("draft_")}  # no drafts here
        return Generation(tokens=out.tokens, prompt_lens=[len(p) for p in prompts], t_start=t_start, t_first=t_first,
                          step_times=step_times, step_tokens=step_tokens, t_end=time.perf_counter(),
                          stats=dict(stats, seq_steps=sum(step_tokens)), step_rows=step_rows)

    def _decode_ahead(self, state: "DecodeState", tok: torch.Tensor, out: "Outputs", t_first: float):
        """Greedy decoding to a fixed length: every row runs to max_new_tokens, so the host needs no token until
        the end and queues the steps back to back; each step's end is an event on the device's stream, placed on
        the host clock at the end (one host transfer for the whole batch)."""
        B, n = tok.shape[0], out.settings.max_new_tokens - 1
        tokens = torch.zeros((B, max(n, 1)), dtype=torch.long, device=self.device)
        everyone = torch.ones(B, dtype=torch.bool, device=self.device)
        clock = DeviceClock(self.device, t_first)
        for i in range(n):
            logits = state.step(self, tok[:, None], everyone)
            tok = logits[:, -1, :].argmax(-1)
            tokens[:, i] = tok
            clock.stamp()
        host = tokens.cpu()
        if n:
            out.emit_block(host[:, :n], torch.full((B,), n))
        return clock.times(), [B] * n, [B] * n

    def _decode_synced(self, state: "DecodeState", tok: torch.Tensor, out: "Outputs", sampler: "Sampler"):
        """Decoding that needs each step's tokens on the host (sampling on the CPU, or EOS)."""
        step_times, step_tokens, step_rows = [], [], []
        active = RowMask(out, self.device)
        while not out.all_done:
            step_rows.append(out.rows_left)
            logits = state.step(self, tok[:, None], active.device_mask())
            tok, tok_host = sampler.next(logits[:, -1, :], self.device)
            step_times.append(time.perf_counter())
            step_tokens.append(out.emit_all(tok_host))
        return step_times, step_tokens, step_rows

    @torch.inference_mode()
    def teacher_forced_logits(self, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """Logits at each continuation position given the prompt and the continuation so far (one forward over
        prompt + continuation, in a cache of its own). Returns [B, C, V] with C = len of the continuations."""
        C = len(continuations[0])
        full = [p + c[:-1] for p, c in zip(prompts, continuations)]
        ids, lens = right_pad(full, self.device)
        state = DecodeState(StaticKV(ids.shape[0], ids.shape[1], self.device),
                            torch.zeros(ids.shape[0], dtype=torch.long, device=self.device))
        starts = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        at = starts[:, None] + torch.arange(C, device=self.device)  # [B, C]
        token_mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lens[:, None]
        return self.forward(state, ids, token_mask, at=at).float().cpu()


@dataclass
class DecodeState:
    """The static KV cache and each row's next position. Column c of a row holds its token at position c."""

    kv: StaticKV
    pos: torch.Tensor  # [B] long, on the device

    def step(self, runtime: ModelRuntime, ids: torch.Tensor, row_active: torch.Tensor) -> torch.Tensor:
        """Append ids [B, T] at each row's next positions. row_active [B]: rows whose tokens route to experts."""
        T = ids.shape[1]
        logits = runtime.forward(self, ids, row_active[:, None].expand(-1, T))
        self.pos = self.pos + T
        return logits
