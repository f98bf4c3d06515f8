"""SpecMoE (arXiv 2604.10152): self-assisted speculative decoding for CPU-offloaded MoE inference, and `nospec`,
the same expert management with speculation off.

Draft: the target model itself, its non-expert layers plus N resident "draft experts" per MoE layer. The router
is unchanged; a routed expert that is not resident is replaced by its nearest resident expert in an affinity
table (L2 distance between the flattened expert weights, gate/up and down together). Drafting copies nothing.
Verification: one forward of the full model over every drafted token of every sequence, exact routing; each
missing expert is copied once per layer per pass and serves every token routed to it (deferred, coalesced).
Draft experts are refreshed from the experts recent verification passes used (hot-temporal).
With `sync_free_draft`, a draft forward never learns its routing on the host: each resident draft expert runs over
every token, weighted by the routing weights that map to it (runtime.DensePlan).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .base import RuntimeEngine
from .errors import BadInput
from .runtime import (DensePlan, ExpertPolicy, ExpertStore, Generation, ModelRuntime, Outputs, Sampler,
                      SamplingSettings)

DRAFT_POLICIES = ("hot-temporal", "hot-global", "random")


@dataclass
class SpecMoEOptions:
    gamma: int = field(default=4, metadata={"help": "draft length: tokens drafted per sequence per step (>= 1)"})
    draft_experts: int = field(default=4, metadata={
        "help": "N, resident draft experts per MoE layer (<= experts per layer; an expert budget may lower it)"})
    draft_policy: str = field(default="hot-temporal", metadata={
        "help": "which experts are draft experts: hot-temporal (refreshed from recent verification passes), "
                "hot-global (most used in a profiling pass, fixed), random (fixed, seeded)"})
    adaptive: bool = field(default=True, metadata={
        "help": "measure tokens/s with and without speculation as it runs and use the faster; what it "
                "learns carries over to the next call with the same batch size"})
    decay: float = field(default=0.8, metadata={"help": "hot-temporal: weight of older passes in expert scores"})
    sync_free_draft: bool = field(default=False, metadata={
        "help": "draft without host syncs: each resident draft expert runs over every token, weighted by the "
                "routing that maps to it, and greedy drafts stay on the device until the step's last draft "
                "(experimental: measure it against the routed draft)"})
    seed: int = field(default=0, metadata={"help": "seed of the random draft policy"})

    def __post_init__(self):
        self.gamma, self.draft_experts = int(self.gamma), int(self.draft_experts)
        for flag in ("adaptive", "sync_free_draft"):  # a flag given as text ("true", "off", ...)
            if isinstance(getattr(self, flag), str):
                setattr(self, flag, getattr(self, flag).lower() in ("1", "true", "yes", "on"))
        if self.gamma < 1:
            raise BadInput(f"specmoe gamma={self.gamma}: the draft length must be at least 1")
        if self.draft_experts < 1:
            raise BadInput(f"specmoe draft_experts={self.draft_experts}: must be at least 1")
        if self.draft_policy not in DRAFT_POLICIES:
            raise BadInput(f"unknown draft policy {self.draft_policy!r}; allowed: {', '.join(DRAFT_POLICIES)}")
        if not 0 <= float(self.decay) < 1:
            raise BadInput(f"specmoe decay={self.decay}: must be in [0, 1)")


def affinity_distances(store: ExpertStore, layer: int, chunk: int = 1 << 24) -> torch.Tensor:
    """[E, E] L2 distances between the experts of one layer, all their weights flattened. Computed from the Gram
    matrix in chunks of the parameter dimension, on the device when it is CUDA, accumulated in float64."""
    E = store.num_experts
    gram = torch.zeros(E, E, dtype=torch.float64, device=store.device)
    for t in store.host[layer].values():  # [E, ...]
        flat = t.reshape(E, -1)
        for start in range(0, flat.shape[1], chunk):
            x = flat[:, start:start + chunk].to(store.device, torch.float32)
            gram += (x @ x.T).double()
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt().cpu()


class SpecMoEPolicy(ExpertPolicy):
    """Two modes. draft: serve every routed expert from the resident draft set, substituting the nearest
    resident expert; never copy. verify: exact experts; copy each missing one once for this layer and pass,
    then refresh the layer's draft set from recent usage, keeping copies made this pass instead of re-copying."""

    def __init__(self, n: int, policy: str, decay: float, seed: int, sync_free: bool = False):
        self.n, self.policy, self.decay, self.seed, self.sync_free = n, policy, decay, seed, sync_free
        self.mode = "verify"
        self.draft_requests = 0
        self.draft_substituted = 0

    def bind(self, store: ExpertStore) -> None:
        super().bind(store)
        E, L = store.num_experts, store.num_layers
        self.distances = [affinity_distances(store, layer) for layer in range(L)]
        self.scores = [torch.zeros(E, dtype=torch.float64) for _ in range(L)]
        rng = random.Random(self.seed)
        initial = [sorted(rng.sample(range(E), self.n)) if self.policy == "random" else list(range(self.n))
                   for _ in range(L)]
        self.draft_sets: list[list[int]] = [[] for _ in range(L)]
        self.substitute: list[list[int]] = [[] for _ in range(L)]  # nearest resident expert of every expert
        self.plans: list[DensePlan | None] = [None] * L  # the same substitution as a device-side table
        for layer in range(L):
            self.set_draft_experts(layer, initial[layer])

    def set_draft_experts(self, layer: int, experts: list[int], fresh: dict | None = None) -> None:
        """Make `experts` the layer's resident draft set; reuse copies in `fresh` (made this pass)."""
        old = set(self.draft_sets[layer])
        for e in old - set(experts):
            self.store.drop(layer, e)
        for e in experts:
            if e not in old:
                self.store.keep(layer, e, fresh[e] if fresh and e in fresh else self.store.copy_to_device(layer, e))
        self.draft_sets[layer] = sorted(experts)
        resident = torch.tensor(self.draft_sets[layer])  # a resident expert is its own nearest (distance 0)
        nearest = self.distances[layer][:, resident].argmin(dim=1)  # [E] index into the draft set
        self.substitute[layer] = resident[nearest].tolist()
        self.plans[layer] = DensePlan([self.store.resident[(layer, e)] for e in self.draft_sets[layer]],
                                      nearest.to(self.store.device))

    def dense_plan(self, layer):
        return self.plans[layer] if self.mode == "draft" and self.sync_free else None

    def weights_for(self, layer, experts):
        if self.mode == "draft":
            sub = self.substitute[layer]
            self.draft_requests += len(experts)
            self.draft_substituted += sum(sub[e] != e for e in experts)
            return {e: self.store.resident[(layer, sub[e])] for e in experts}
        out = super().weights_for(layer, experts)  # copies each missing expert once for this layer and pass
        if self.policy == "hot-temporal":
            scores = self.scores[layer]
            scores *= self.decay
            scores[experts] += 1.0
            current = set(self.draft_sets[layer])
            # highest score first; on ties keep what is resident, then the lower id (no churn on ties)
            score = scores.tolist()  # one conversion, not one .item() per expert, on this per-layer path
            ranked = sorted(range(self.store.num_experts), key=lambda e: (-score[e], e not in current, e))
            chosen = ranked[: self.n]
            if set(chosen) != current:
                self.set_draft_experts(layer, chosen, fresh=out)
        return out


class SpecMoEEngine(RuntimeEngine):
    name = "specmoe"
    summary = "SpecMoE: self-assisted drafting with N resident draft experts, coalesced fetching in verification"
    Options = SpecMoEOptions
    speculate = True

    def make_policy(self, hardware):
        store, o = self.runtime.store, self.options
        if o.draft_experts > store.num_experts:
            raise BadInput(f"specmoe draft_experts={o.draft_experts}: the model has only {store.num_experts} "
                           "experts per layer")
        n = o.draft_experts
        if self.expert_budget is not None:
            fits = self.expert_budget // (store.expert_bytes * store.num_layers)
            if fits < 1:
                raise BadInput(f"hardware {hardware.spec!r}: the expert budget cannot hold one draft expert per "
                               f"layer ({store.expert_bytes * store.num_layers} bytes)")
            n = min(n, fits)
        self.draft_experts = n
        self.adaptive_state: dict[int, dict] = {}  # batch size -> tokens/s of each mode and the step count
        self.policy = SpecMoEPolicy(n, o.draft_policy, o.decay, o.seed, o.sync_free_draft)
        return self.policy

    def _prepare(self, prompts, settings) -> None:
        if self.options.draft_policy == "hot-global":  # the globally hottest experts of a profiling pass
            usage = [torch.zeros(self.runtime.store.num_experts) for _ in range(self.runtime.store.num_layers)]
            for _, layer, experts in self.record_routing(prompts, settings):
                usage[layer][experts] += 1
            for layer, u in enumerate(usage):
                order = sorted(range(len(u)), key=lambda e: (-u[e].item(), e))
                self.policy.set_draft_experts(layer, order[: self.draft_experts])

    def generate(self, prompts, settings) -> Generation:
        self.policy.mode = "verify"
        if not self.speculate:
            gen = self.runtime.generate(prompts, settings)
            gen.stats.update(draft_experts_per_layer=self.draft_experts)
            return gen
        # adaptive: what was learnt about this batch size carries over from one generate call to the next
        rate = self.adaptive_state.setdefault(len(prompts), {"spec": None, "plain": None, "step": 0})
        return SpeculativeDecoder(self.runtime, self.policy, self.options.gamma, self.options.adaptive).run(
            prompts, settings, extra=dict(draft_experts_per_layer=self.draft_experts), rate=rate)


    def teacher_forced_logits(self, prompts, continuations):
        """Feed the continuation in blocks of gamma + 1 tokens, the shape a verification pass has, so that the
        rounding of this engine's own forwards is what gets compared (in bfloat16 it differs from one token at a
        time). Returns [B, C, V] like the runtime's version."""
        if not self.speculate:
            return super().teacher_forced_logits(prompts, continuations)
        rt = self.runtime
        self.policy.mode = "verify"
        with torch.inference_mode():
            first, state = rt.prefill(prompts)
            cont = torch.tensor(continuations, device=rt.device)  # [B, C]
            out, fed, C = [first[:, None, :]], 0, cont.shape[1]
            everyone = torch.ones(cont.shape[0], dtype=torch.bool, device=rt.device)
            while fed < C - 1:  # the last token's own prediction is not needed
                block = cont[:, fed: min(fed + self.options.gamma + 1, C - 1)]
                out.append(state.step(rt, block, everyone))
                fed += block.shape[1]
        return torch.cat(out, dim=1).float().cpu()


class NoSpecEngine(SpecMoEEngine):
    name = "nospec"
    summary = "the SpecMoE engine with speculation off: its expert management alone (ablation)"
    speculate = False


# --------------------------------------------------------------------------------------------------------------
# The speculative decode loop.
# --------------------------------------------------------------------------------------------------------------


def truncate_cache(cache, length: int) -> None:
    """Drop every cache slot from `length` on (negative crop: remove that many slots, in every transformers 5)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class SpeculativeDecoder:
    """Draft gamma tokens per sequence with the draft experts, verify all of them in one full forward, keep each
    sequence's longest accepted prefix plus the bonus token. Rejected slots stay in the KV cache as holes masked
    out of attention; each row continues at its own explicit position."""

    PROBE_EVERY = 8  # adaptive: every this many steps, time the mode not in use again

    def __init__(self, runtime: ModelRuntime, policy: SpecMoEPolicy, gamma: int, adaptive: bool):
        self.rt, self.policy, self.gamma, self.adaptive = runtime, policy, gamma, adaptive

    def run(self, prompts: list[list[int]], settings: SamplingSettings, extra: dict,
            rate: dict | None = None) -> Generation:
        """rate: the adaptive switch's tokens/s of each mode and its step count, updated in place (an engine
        passes the same dict on every call with this batch size, so what was learnt carries over)."""
        rt, policy, store = self.rt, self.policy, self.rt.store
        store.reset_counters()
        policy.draft_requests = policy.draft_substituted = 0
        sampler = Sampler(settings)
        B = len(prompts)
        out = Outputs(B, settings)
        stats = dict(drafted_tokens=0, accepted_tokens=0, draft_time_s=0.0, verify_time_s=0.0, draft_h2d_bytes=0,
                     verify_h2d_bytes=0, spec_steps=0, plain_steps=0, seq_steps=0)
        t_start = time.perf_counter()
        logits, state = rt.prefill(prompts)
        pending = sampler(logits)  # [B] sampled, not yet in the cache
        rt.sync()
        t_first = time.perf_counter()
        out.emit_all(pending)
        step_times, step_tokens = [], []
        rate = rate if rate is not None else {"spec": None, "plain": None, "step": 0}
        while not bool(out.done.all()):
            mode = self.choose(rate, rate["step"])
            t0 = time.perf_counter()
            active = ~out.done
            if mode == "plain":
                logits = state.step(rt, pending.to(rt.device)[:, None], active.to(rt.device))
                pending = sampler(logits[:, -1, :])
                rt.sync()
                n = out.emit_all(pending)
                stats["plain_steps"] += 1
            else:
                pending, n = self.speculate(state, pending, active, sampler, out.emit, stats)
                stats["spec_steps"] += 1
            now = time.perf_counter()
            rate[mode] = n / (now - t0) if rate[mode] is None else 0.5 * rate[mode] + 0.5 * n / (now - t0)
            stats["seq_steps"] += int(active.sum())
            step_times.append(now)
            step_tokens.append(n)
            rate["step"] += 1
        counted = not policy.sync_free  # a sync-free draft never learns its routing on the host
        stats.update(store.counters.snapshot(), draft_expert_requests=policy.draft_requests if counted else None,
                     draft_substituted=policy.draft_substituted if counted else None, **extra)
        return Generation(tokens=out.tokens, prompt_lens=[len(p) for p in prompts], t_start=t_start, t_first=t_first,
                          step_times=step_times, step_tokens=step_tokens, t_end=time.perf_counter(), stats=stats)

    def choose(self, rate: dict, step: int) -> str:
        """Adaptive on/off: use the mode with the higher measured tokens/s, re-timing the other one now and then
        (the paper saw speculation lose at batch 1, where plain decoding with cached experts is cheap)."""
        if not self.adaptive or rate["spec"] is None:
            return "spec"
        if rate["plain"] is None:
            return "plain"
        best = "spec" if rate["spec"] >= rate["plain"] else "plain"
        other = "plain" if best == "spec" else "spec"
        return other if step % self.PROBE_EVERY == 0 else best

    def speculate(self, state, pending, active, sampler: Sampler, emit, stats):
        """One draft + verify step. Returns (new pending tokens [B], tokens emitted across the batch)."""
        rt, policy, store, gamma = self.rt, self.policy, self.rt.store, self.gamma
        B = pending.shape[0]
        dev_active = active.to(rt.device)
        slots0, pos0 = state.mask.shape[1], state.next_pos.clone()

        # draft: gamma forwards with the draft experts; they write the cache, which is rolled back afterwards
        t0, bytes0 = time.perf_counter(), store.counters.h2d_bytes
        policy.mode = "draft"
        x, drafts, q = pending, [], []  # drafts[j]: [B] token ids; q[j]: [B, V] draft probabilities
        on_device = policy.sync_free and sampler.settings.greedy  # greedy drafts need not visit the host
        try:
            for _ in range(gamma):
                logits = state.step(rt, x.to(rt.device)[:, None], dev_active)[:, -1, :]
                if sampler.settings.greedy:
                    x = logits.argmax(-1) if on_device else logits.argmax(-1).cpu()
                else:
                    q.append(sampler.probs(logits))
                    x = torch.multinomial(q[-1], 1, generator=sampler.generator)[:, 0]
                drafts.append(x)
        finally:
            policy.mode = "verify"
        if on_device:
            drafts = list(torch.stack(drafts).cpu())  # the step's one host sync for its drafts
        rt.sync()
        stats["draft_time_s"] += time.perf_counter() - t0
        stats["draft_h2d_bytes"] += store.counters.h2d_bytes - bytes0
        truncate_cache(state.cache, slots0)
        state.mask, state.next_pos = state.mask[:, :slots0], pos0

        # verify: [pending, d1..d_gamma] for every sequence in one forward of the full model
        t0, bytes0 = time.perf_counter(), store.counters.h2d_bytes
        block = torch.stack([pending] + drafts, dim=1)  # [B, gamma + 1]
        logits = state.step(rt, block.to(rt.device), dev_active)  # [B, gamma + 1, V]
        target = logits.argmax(-1).cpu() if sampler.settings.greedy else sampler.probs(logits)
        rt.sync()
        stats["verify_time_s"] += time.perf_counter() - t0
        stats["verify_h2d_bytes"] += store.counters.h2d_bytes - bytes0

        new_pending, emitted = pending.clone(), 0
        for i in range(B):
            if not active[i]:
                continue
            d = [int(drafts[j][i]) for j in range(gamma)]
            if sampler.settings.greedy:
                accepted, bonus = greedy_accept(d, target[i].tolist())
            else:
                accepted, bonus = sample_accept(d, [qj[i] for qj in q], target[i], sampler.generator)
            stats["drafted_tokens"] += gamma
            stats["accepted_tokens"] += accepted
            # slots of the rejected drafts become holes; the row goes on after its last accepted token
            state.mask[i, slots0 + 1 + accepted:] = 0
            state.next_pos[i] = pos0[i] + accepted + 1
            new_pending[i] = bonus
            emitted += emit(i, d[:accepted] + [bonus])
        return new_pending, emitted


def greedy_accept(drafts: list[int], target: list[int]) -> tuple[int, int]:
    """target[j] is the full model's choice after the j-th verified token. Accept the longest prefix of drafts
    that equals it; the bonus is the target's token right after that prefix."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n, target[n]


def sample_accept(drafts: list[int], q: list[torch.Tensor], p: torch.Tensor, gen: torch.Generator):
    """Speculative sampling (Leviathan et al.; Chen et al.): accept draft d_j with probability min(1, p/q); at the
    first rejection sample from normalise(max(0, p - q)); if all pass, the bonus is drawn from p[gamma].
    The emitted tokens are then distributed exactly as the target's. p: [gamma + 1, V]; q[j]: [V]."""
    for j, d in enumerate(drafts):
        if torch.rand((), generator=gen, dtype=torch.float64) < min(1.0, (p[j, d] / q[j][d]).item()):
            continue  # accepted (p >= q always is)
        residual = (p[j] - q[j]).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p[j]
        return j, int(torch.multinomial(residual, 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))
