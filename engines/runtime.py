"""The one model runtime every engine shares: a transformers MoE model whose non-expert weights and KV cache
live on the device while expert weights live in host memory, moved by an ExpertPolicy through an ExpertStore.

Engines differ only in their policy (which experts stay on the device, when copies happen) and, for SpecMoE,
in the decode loop; the arithmetic of every expert is this file's `_run_experts`, so outputs are comparable.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .errors import BadInput

EXPERTS_IMPLEMENTATION = "specmoe_bench"


# ----------------------------------------------------------------------------------------------------------------
# Expert store: host copies of every expert, the device copies that a policy keeps, and the byte counters.
# ----------------------------------------------------------------------------------------------------------------

ExpertWeights = dict[str, torch.Tensor]  # parameter name -> this expert's slice, e.g. gate_up_proj [2I, H]


@dataclass
class StoreCounters:
    h2d_bytes: int = 0  # bytes copied host -> device for experts
    h2d_copies: int = 0  # expert copies (one expert = one copy of all its tensors)
    hits: int = 0  # expert requests served by a device-resident (or already prefetched) copy
    misses: int = 0  # expert requests that needed a copy

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class ExpertStore:
    """Host memory holds every expert (pinned when the device is CUDA); `resident` holds the device copies a
    policy decided to keep. Every host-to-device expert copy in the project goes through `copy_to_device`."""

    def __init__(self, host: list[dict[str, torch.Tensor]], device: torch.device):
        self.host = host  # [layer] -> {param name: [E, ...]}
        self.device = device
        self.num_layers = len(host)
        self.num_experts = next(iter(host[0].values())).shape[0]
        self.expert_bytes = sum(t[0].nbytes for t in host[0].values())
        self.resident: dict[tuple[int, int], ExpertWeights] = {}
        self.counters = StoreCounters()
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * self.num_layers

    @property
    def resident_bytes(self) -> int:
        return self.expert_bytes * len(self.resident)

    def host_weights(self, layer: int, expert: int) -> ExpertWeights:
        return {name: t[expert] for name, t in self.host[layer].items()}

    def copy_to_device(self, layer: int, expert: int, stream: torch.cuda.Stream | None = None) -> ExpertWeights:
        """Copy one expert host -> device and count its bytes. With a stream, the copy is queued there and the
        caller must make the compute stream wait on it before use."""
        src = self.host_weights(layer, expert)
        if self.device.type == "cpu":
            out = {name: t.clone() for name, t in src.items()}  # a real memcpy, so CPU runs still move the bytes
        else:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                out = {name: torch.empty_like(t, device=self.device).copy_(t, non_blocking=True)
                       for name, t in src.items()}
        self.counters.h2d_bytes += self.expert_bytes
        self.counters.h2d_copies += 1
        return out

    def keep(self, layer: int, expert: int, weights: ExpertWeights) -> None:
        self.resident[(layer, expert)] = weights

    def drop(self, layer: int, expert: int) -> None:
        self.resident.pop((layer, expert), None)

    def reset_counters(self) -> None:
        self.counters = StoreCounters()


# ----------------------------------------------------------------------------------------------------------------
# Policies: an engine's decision of where each expert comes from. The base class is naive on-demand offload.
# ----------------------------------------------------------------------------------------------------------------


class ExpertPolicy:
    """Serves the weights of the experts one MoE layer needs for one forward pass.

    The default is the paper's MoE-OnDemand: every needed expert that is not resident is copied when its
    layer runs and dropped afterwards."""

    store: ExpertStore

    def bind(self, store: ExpertStore) -> None:
        self.store = store

    def weights_for(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        out = {}
        for e in experts:
            w = self.store.resident.get((layer, e))
            if w is None:
                self.store.counters.misses += 1
                w = self.store.copy_to_device(layer, e)
            else:
                self.store.counters.hits += 1
            out[e] = w
        return out

    def dense_plan(self, layer: int) -> "DensePlan | None":
        """A plan to run this layer without learning its routing on the host (no sync), when every expert the
        router may pick is served by a known resident copy; None (the default) for the routed path."""
        return None

    def begin_forward(self, forward_index: int) -> None:
        """Called before every model forward (prefill, decode step, draft step or verification)."""

    def end_forward(self) -> None:
        """Called after every model forward."""


@dataclass
class DensePlan:
    """Every expert id of a layer maps to one of a few resident copies: `slot_of` [E] (on the device) gives the
    index into `weights`. The layer then runs each resident copy over all its tokens, weighted by the routing
    weights that map to it (zero for the others), with no host sync."""

    weights: list[ExpertWeights]
    slot_of: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# The experts implementation registered in transformers' registry. It reads which runtime owns the module.
# ----------------------------------------------------------------------------------------------------------------


def _specmoe_experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    runtime: ModelRuntime = module._smb_runtime
    return runtime._run_experts(module, module._smb_layer, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _specmoe_experts_forward)


def _expert_linear(module: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = x @ w if module.is_transposed else F.linear(x, w)
    return out + b if b is not None else out


def _expert_mlp(module: nn.Module, h: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One expert's MLP on tokens h [n, H], the way the module's family computes it."""
    if module.has_gate:
        h = module._apply_gate(_expert_linear(module, h, w["gate_up_proj"], w.get("gate_up_proj_bias")))
    else:
        h = module.act_fn(_expert_linear(module, h, w["up_proj"], w.get("up_proj_bias")))
    return _expert_linear(module, h, w["down_proj"], w.get("down_proj_bias"))


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


@dataclass
class SamplingSettings:
    """temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | None = None  # None: never stop early (fixed output length, as benchmarks want)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise BadInput(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise BadInput(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """What one engine produced for one batch, with the timing of every decode step."""

    tokens: list[list[int]]  # generated ids per sequence (prompt excluded), cut after EOS
    prompt_lens: list[int]
    t_start: float  # perf_counter before prefill
    t_first: float  # perf_counter when the first token of every sequence was known (TTFT)
    step_times: list[float]  # perf_counter after each decode step (after device sync)
    step_tokens: list[int]  # tokens emitted across the batch at each step (speculation emits several)
    t_end: float
    stats: dict  # expert-store counters (StoreCounters) during generation; `seq_steps`: decode steps summed over
    # the sequences that took them (tokens_per_step = sum(step_tokens) / seq_steps); speculative engines add
    # drafted_tokens, accepted_tokens, draft_time_s, verify_time_s, draft_h2d_bytes, verify_h2d_bytes


# ----------------------------------------------------------------------------------------------------------------
# The runtime.
# ----------------------------------------------------------------------------------------------------------------


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules built with transformers' @use_experts_implementation (fused [E, ...] expert weights)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "num_experts") and hasattr(m, "is_transposed") and hasattr(m, "has_gate")]


class ModelRuntime:
    """Owns a model with experts in host memory and runs forwards under an ExpertPolicy."""

    def __init__(self, model: nn.Module, device: str | torch.device, policy: ExpertPolicy | None = None):
        self.device = torch.device(device)
        model.eval()
        experts = find_experts_modules(model)
        if not experts:
            raise BadInput(f"model {type(model).__name__} has no MoE layers: no experts module built with "
                           "transformers' use_experts_implementation (supported families include Mixtral, "
                           "Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS)")
        pin = self.device.type == "cuda"
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
        self.store = ExpertStore(host, self.device)
        self.dtype = next(iter(host[0].values())).dtype
        self.top_k = self._top_k(model.config)
        self.non_expert_bytes = sum(p.nbytes for p in self.model.parameters()) + \
            sum(b.nbytes for b in self.model.buffers())
        self.policy = policy or ExpertPolicy()
        self.policy.bind(self.store)
        self.token_mask: torch.Tensor | None = None  # [N] bool: tokens of this forward whose experts run
        self.routing_log: list[tuple[int, int, list[int]]] | None = None  # (forward, layer, experts) when recording
        self.forward_index = 0
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @staticmethod
    def _top_k(config) -> int | None:
        for key in ("num_experts_per_tok", "top_k", "moe_top_k", "num_experts_per_token"):
            if getattr(config, key, None):
                return int(getattr(config, key))
        return None

    def set_policy(self, policy: ExpertPolicy) -> None:
        self.policy = policy
        policy.bind(self.store)

    # -- the experts of one MoE layer --------------------------------------------------------------------------

    def _run_experts(self, module, layer, hidden_states, top_k_index, top_k_weights):
        plan = self.policy.dense_plan(layer)
        if plan is not None:
            return self._run_dense(module, plan, hidden_states, top_k_index, top_k_weights)
        # N = tokens in this forward, K = experts per token, E = experts in the layer, H = hidden size
        N, K = top_k_index.shape
        E = self.store.num_experts
        flat = top_k_index.reshape(-1)  # [N*K]
        active = self.token_mask  # [N] or None; padding, holes and finished rows route to no expert
        if active is not None:
            flat = torch.where(active.repeat_interleave(K), flat, E)  # E: a sentinel that sorts last
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, ascending inside
        counts = torch.bincount(flat, minlength=E + 1)[:E].tolist()  # the one host sync of the layer
        experts = [e for e in range(E) if counts[e]]
        if self.routing_log is not None:
            self.routing_log.append((self.forward_index, layer, experts))
        weights = self.policy.weights_for(layer, experts)
        out = torch.zeros_like(hidden_states)  # [N, H]
        start = 0
        for e in range(E):  # ascending expert id, the same order for every engine
            if not counts[e]:
                continue
            pairs = order[start:start + counts[e]]
            start += counts[e]
            tok, slot = pairs // K, pairs % K
            h = _expert_mlp(module, hidden_states[tok], weights[e])
            out.index_add_(0, tok, (h * top_k_weights[tok, slot, None]).to(out.dtype))
        return out

    def _run_dense(self, module, plan: DensePlan, hidden_states, top_k_index, top_k_weights):
        """The layer without a host sync: each resident copy over every token, times the routing weight that
        reaches it (a token whose K choices share one copy gets their sum; inactive tokens get zero)."""
        slots = plan.slot_of[top_k_index]  # [N, K]
        w = top_k_weights
        if self.token_mask is not None:
            w = w * self.token_mask[:, None].to(w.dtype)
        out = torch.zeros_like(hidden_states)
        for s, weights in enumerate(plan.weights):
            coef = (w * (slots == s).to(w.dtype)).sum(-1)  # [N]
            out += (_expert_mlp(module, hidden_states, weights) * coef[:, None]).to(out.dtype)
        return out

    # -- forwards --------------------------------------------------------------------------------------------

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, position_ids, cache, token_mask=None) -> torch.Tensor:
        """One model forward. input_ids [B, T]; attention_mask [B, past + T]; token_mask [B, T] (which tokens
        route to experts; default: those with attention_mask 1). Returns logits [B, T, V]."""
        if token_mask is None:
            token_mask = attention_mask[:, -input_ids.shape[1]:].bool()
        self.token_mask = token_mask.reshape(-1)
        self.policy.begin_forward(self.forward_index)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{self._cache_kw: cache})
        finally:
            self.policy.end_forward()
            self.token_mask = None
            self.forward_index += 1
        return out.logits

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- plain autoregressive decoding, shared by every engine except SpecMoE's speculative loop ---------------

    def prefill(self, prompts: list[list[int]], pad_id: int = 0):
        """Left-padded batched prefill. Returns (logits of each row's last prompt token [B, V], state)."""
        self.forward_index = 0  # forward indices restart per batch, so routing traces line up between runs
        ids, mask = left_pad(prompts, self.device, pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.new_cache()
        logits = self.forward(ids, mask, pos, cache)
        return logits[:, -1, :], DecodeState(cache=cache, mask=mask, next_pos=pos[:, -1] + 1)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> Generation:
        """Greedy or sampled autoregressive decoding: one forward per token."""
        self.store.reset_counters()
        sampler = Sampler(settings)
        out = Outputs(len(prompts), settings)
        t_start = time.perf_counter()
        logits, state = self.prefill(prompts)
        next_tok = sampler(logits)
        self.sync()
        t_first = time.perf_counter()
        out.emit_all(next_tok)
        step_times, step_tokens = [], []
        while not bool(out.done.all()):
            logits = state.step(self, next_tok.to(self.device)[:, None], ~out.done.to(self.device))
            next_tok = sampler(logits[:, -1, :])
            self.sync()
            step_times.append(time.perf_counter())
            step_tokens.append(out.emit_all(next_tok))
        return Generation(tokens=out.tokens, prompt_lens=[len(p) for p in prompts], t_start=t_start, t_first=t_first,
                          step_times=step_times, step_tokens=step_tokens, t_end=time.perf_counter(),
                          stats=dict(self.store.counters.snapshot(), seq_steps=sum(step_tokens)))

    @torch.inference_mode()
    def teacher_forced_logits(self, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """Logits at each continuation position given the prompt and the continuation so far (one prefill over
        prompt + continuation). Returns [B, C, V] with C = len of the continuations (all equal)."""
        ids, mask, pos = teacher_forcing_batch(prompts, continuations, self.device)
        logits = self.forward(ids, mask, pos, self.new_cache())
        return logits[:, -len(continuations[0]):, :].float().cpu()


@dataclass
class DecodeState:
    """KV cache plus the 2-D attention mask and each row's next position. Rows may contain holes (mask 0)."""

    cache: DynamicCache
    mask: torch.Tensor  # [B, past]
    next_pos: torch.Tensor  # [B]

    def step(self, runtime: ModelRuntime, ids: torch.Tensor, row_active: torch.Tensor) -> torch.Tensor:
        """Append ids [B, T] at each row's next positions. row_active [B]: rows whose tokens route to experts."""
        B, T = ids.shape
        self.mask = torch.cat([self.mask, torch.ones((B, T), dtype=self.mask.dtype, device=self.mask.device)], 1)
        pos = self.next_pos[:, None] + torch.arange(T, device=ids.device)
        token_mask = row_active[:, None].expand(B, T)
        logits = runtime.forward(ids, self.mask, pos, self.cache, token_mask=token_mask)
        self.next_pos = self.next_pos + T
        return logits


class Sampler:
    """Greedy argmax or seeded temperature / top-p sampling, on the CPU so every device draws the same numbers."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Target distribution after temperature and top-p. logits [..., V] -> probs [..., V] float64 on CPU."""
        s = self.settings
        p = torch.softmax(logits.double().cpu() / s.temperature, dim=-1)
        if s.top_p < 1:
            sorted_p, order = p.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # keep the smallest prefix reaching top_p
            p = torch.zeros_like(p).scatter(-1, order, sorted_p * keep)
            p = p / p.sum(-1, keepdim=True)
        return p

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.settings.greedy:
            return logits.argmax(-1).cpu()
        return torch.multinomial(self.probs(logits), 1, generator=self.generator)[:, 0]


class Outputs:
    """The generated tokens of a batch: each row stops at EOS or at max_new_tokens."""

    def __init__(self, batch: int, settings: SamplingSettings):
        self.settings = settings
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.done = torch.zeros(batch, dtype=torch.bool)

    def emit(self, row: int, new: list[int]) -> int:
        """Append a row's new tokens up to its stop; returns how many were kept."""
        kept = 0
        for t in new:
            if self.done[row]:
                break
            self.tokens[row].append(t)
            kept += 1
            self.done[row] = t == self.settings.eos_token_id or len(self.tokens[row]) >= self.settings.max_new_tokens
        return kept

    def emit_all(self, next_tok: torch.Tensor) -> int:
        """One new token per row ([B]); finished rows ignore theirs."""
        return sum(self.emit(i, [t]) for i, t in enumerate(next_tok.tolist()))


def teacher_forcing_batch(prompts: list[list[int]], continuations: list[list[int]], device):
    """Ids, attention mask and positions [B, L] of prompt + continuation minus its last token, left-padded, so that
    one forward gives the logits at each of the C continuation positions in its last C columns."""
    full = [p + c[:-1] for p, c in zip(prompts, continuations)] if len(continuations[0]) > 1 else prompts
    ids, mask = left_pad(full, device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, L], prompts right-aligned so every row's next token lands at column L."""
    check_prompts(prompts)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def check_prompts(prompts: list[list[int]]) -> None:
    if not prompts:
        raise BadInput("empty batch: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise BadInput(f"prompt {i} of the batch is empty: every prompt needs at least one token")
