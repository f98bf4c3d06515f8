"""SpecMoE (arXiv 2604.10152): self-assisted speculative decoding for CPU-offloaded MoE inference, and `nospec`,
the same expert management with speculation off.

Draft: the target model itself, its non-expert layers plus N resident "draft experts" per MoE layer. The router
is unchanged; a routed expert that is not resident is replaced by its nearest resident expert in an affinity
table (L2 distance between the flattened expert weights, gate/up and down together). Drafting copies nothing.
Verification: one forward of the full model over every drafted token of every sequence, exact routing; each
missing expert is copied once per layer per pass and serves every token routed to it (deferred, coalesced).
Draft experts are refreshed from the experts recent verification passes used (hot-temporal).
A draft forward never learns its routing on the host: the substitution is a device-side table from expert id to
the pool slot of its substitute, so drafts are CUDA-graph replays; acceptance, bonus tokens and next positions
are computed on the device for the whole batch, with one host transfer per step.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .base import RuntimeEngine
from .errors import BadInput
from .experts import ExpertCounters, distinct_routed
from .runtime import ExpertPolicy, Generation, ModelRuntime, Outputs, RowMask, Sampler, SamplingSettings
from .store import ExpertStore

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
    seed: int = field(default=0, metadata={"help": "seed of the random draft policy"})

    def __post_init__(self):
        self.gamma, self.draft_experts = int(self.gamma), int(self.draft_experts)
        if isinstance(self.adaptive, str):  # a flag given as text ("true", "off", ...)
            self.adaptive = self.adaptive.lower() in ("1", "true", "yes", "on")
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
    """Two modes. draft: every routed expert is served from the layer's resident draft set, through a device
    table that maps each expert id to the pool slot of its nearest resident expert; nothing is copied and the
    host decides nothing. verify: exact experts; each missing one is copied once for this layer and pass, then
    the layer's draft set is refreshed from recent usage, keeping copies made this pass instead of re-copying."""

    def __init__(self, n: int, policy: str, decay: float, seed: int):
        self.n, self.policy, self.decay, self.seed = n, policy, decay, seed
        self.mode = "verify"

    def slots(self, store: ExpertStore) -> int:
        return self.n * store.num_layers + store.num_experts  # the draft sets, and one layer's verification copies

    def setup(self) -> None:
        store = self.store
        E, L = store.num_experts, store.num_layers
        self.distances = [affinity_distances(store, layer) for layer in range(L)]
        self.scores = [torch.zeros(E, dtype=torch.float64) for _ in range(L)]
        rng = random.Random(self.seed)
        initial = [sorted(rng.sample(range(E), self.n)) if self.policy == "random" else list(range(self.n))
                   for _ in range(L)]
        self.draft_sets: list[list[int]] = [[] for _ in range(L)]
        self.substitute: list[list[int]] = [[] for _ in range(L)]  # nearest resident expert of every expert
        self.sub_slots = torch.full((L, E), -1, dtype=torch.long, device=store.device)  # ... as pool slots
        self.is_draft = torch.zeros((L, E), dtype=torch.bool, device=store.device)
        for layer in range(L):
            self.set_draft_experts(layer, initial[layer])

    def set_draft_experts(self, layer: int, experts: list[int]) -> None:
        """Make `experts` the layer's resident draft set (a copy made this pass is kept, not made again)."""
        store = self.store
        for e in set(self.draft_sets[layer]) - set(experts):
            store.drop(layer, e)
        for e in experts:
            store.keep(layer, e)
        self.draft_sets[layer] = sorted(experts)
        resident = torch.tensor(self.draft_sets[layer])  # a resident expert is its own nearest (distance 0)
        self.substitute[layer] = resident[self.distances[layer][:, resident].argmin(dim=1)].tolist()
        store.sync_layer(layer)  # the draft graphs read these slots: their copies come first
        slots = torch.tensor([store.resident[(layer, e)] for e in self.substitute[layer]])
        draft = torch.zeros(store.num_experts, dtype=torch.bool)
        draft[resident] = True
        if store.device.type == "cuda":  # pinned, so the copies are queued in stream order without a sync
            slots, draft = slots.pin_memory(), draft.pin_memory()
        self.sub_slots[layer].copy_(slots, non_blocking=True)
        self.is_draft[layer].copy_(draft, non_blocking=True)

    def sync_free_table(self, layer):
        return self.sub_slots[layer] if self.mode == "draft" else super().sync_free_table(layer)

    def graphable(self) -> bool:
        return self.mode == "draft" or super().graphable()

    def count_sync_free(self, layer, top_k_index, active, counters: ExpertCounters) -> tuple[str, ...]:
        if self.mode != "draft":
            return super().count_sync_free(layer, top_k_index, active, counters)
        routed = distinct_routed(top_k_index, active, self.store.num_experts)
        counters.add("draft_requests", routed.sum())
        counters.add("draft_substituted", (routed & ~self.is_draft[layer]).sum())
        return ()

    def after_layer(self, layer, experts):
        if experts is None:
            return
        if self.policy == "hot-temporal":
            scores = self.scores[layer]
            scores *= self.decay
            scores[experts] += 1.0
            current = set(self.draft_sets[layer])
            # highest score first; on ties keep what is resident, then the lower id (no churn on ties)
            score = scores.tolist()  # one conversion, not one .item() per expert, on this per-layer path
            ranked = sorted(range(self.store.num_experts), key=lambda e: (-score[e], e not in current, e))
            if set(ranked[: self.n]) != current:
                self.set_draft_experts(layer, ranked[: self.n])
        for e in set(experts) - set(self.draft_sets[layer]):
            self.store.drop(layer, e)


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
        self.policy = SpecMoEPolicy(n, o.draft_policy, o.decay, o.seed)
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
            first, state = rt.prefill(prompts, len(continuations[0]), slack=self.options.gamma + 1)
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


class SpeculativeDecoder:
    """Draft gamma tokens per sequence with the draft experts, verify all of them in one full forward, keep each
    sequence's longest accepted prefix plus the bonus token. A row's draft and verification tokens are written at
    its own positions in the static cache; the next step overwrites whatever it rejected, so nothing is rolled
    back, and each row continues at its own position."""

    PROBE_EVERY = 8  # adaptive: every this many steps, time the mode not in use again

    def __init__(self, runtime: ModelRuntime, policy: SpecMoEPolicy, gamma: int, adaptive: bool):
        self.rt, self.policy, self.gamma, self.adaptive = runtime, policy, gamma, adaptive

    def run(self, prompts: list[list[int]], settings: SamplingSettings, extra: dict,
            rate: dict | None = None) -> Generation:
        """rate: the adaptive switch's tokens/s of each mode and its step count, updated in place (an engine
        passes the same dict on every call with this batch size, so what was learnt carries over)."""
        rt = self.rt
        rt.reset_stats()
        sampler = Sampler(settings)
        B = len(prompts)
        out = Outputs(B, settings)
        stats = dict(drafted_tokens=0, accepted_tokens=0, draft_h2d_bytes=0, verify_h2d_bytes=0, spec_steps=0,
                     plain_steps=0, seq_steps=0)
        self.clock = StepClock(rt.device)
        t_start = time.perf_counter()
        logits, state = rt.prefill(prompts, settings.max_new_tokens, slack=self.gamma + 1)
        pending, pending_host = sampler.next(logits, rt.device)  # [B] sampled, not yet in the cache
        t_first = time.perf_counter()
        out.emit_all(pending_host)
        step_times, step_tokens = [], []
        rate = rate if rate is not None else {"spec": None, "plain": None, "step": 0}
        active = RowMask(out, rt.device)
        while not out.all_done:
            mode = self.choose(rate, rate["step"])
            t0 = time.perf_counter()
            rows = int((~out.done).sum())
            if mode == "plain":
                logits = state.step(rt, pending[:, None], active.device_mask())
                pending, pending_host = sampler.next(logits[:, -1, :], rt.device)
                n = out.emit_all(pending_host)
                stats["plain_steps"] += 1
            else:
                pending, n = self.speculate(state, pending, active, sampler, out, stats)
                stats["spec_steps"] += 1
            now = time.perf_counter()
            rate[mode] = n / (now - t0) if rate[mode] is None else 0.5 * rate[mode] + 0.5 * n / (now - t0)
            stats["seq_steps"] += rows
            step_times.append(now)
            step_tokens.append(n)
            rate["step"] += 1
        counts = rt.stats()
        stats.update(counts, draft_expert_requests=counts.pop("draft_requests"), **self.clock.totals(), **extra)
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

    def speculate(self, state, pending, active: RowMask, sampler: Sampler, out: Outputs, stats):
        """One draft + verify step. pending [B] (device): each row's token not yet in the cache. Returns (the new
        pending tokens [B], tokens emitted across the batch)."""
        rt, policy, store, gamma = self.rt, self.policy, self.rt.store, self.gamma
        live = active.device_mask()  # [B] bool
        live_host = ~out.done
        pos0 = state.pos

        # draft: gamma forwards with the draft experts (graph replays); each writes its token's slot
        bytes0 = store.counters.h2d_bytes
        self.clock.mark("draft")
        policy.mode = "draft"
        x, drafts, q = pending, [], []  # drafts[j]: [B] token ids (device); q[j]: [B, V] draft probabilities
        try:
            for _ in range(gamma):
                logits = state.step(rt, x[:, None], live)[:, -1, :]
                if sampler.settings.greedy:
                    x = logits.argmax(-1)
                else:
                    q.append(sampler.probs(logits))
                    x = torch.multinomial(q[-1], 1, generator=sampler.generator)[:, 0].to(rt.device)
                drafts.append(x)
        finally:
            policy.mode = "verify"
        stats["draft_h2d_bytes"] += store.counters.h2d_bytes - bytes0

        # verify: [pending, d1..d_gamma] for every sequence in one forward of the full model, at pos0..pos0+gamma
        bytes0 = store.counters.h2d_bytes
        self.clock.mark("verify")
        state.pos = pos0
        block = torch.stack([pending] + drafts, dim=1)  # [B, gamma + 1]
        logits = state.step(rt, block, live)  # [B, gamma + 1, V]
        self.clock.mark(None)
        stats["verify_h2d_bytes"] += store.counters.h2d_bytes - bytes0

        if sampler.settings.greedy:
            target = logits.argmax(-1)  # [B, gamma + 1]: the full model's token after each verified one
            matched = (block[:, 1:] == target[:, :gamma]).long().cumprod(dim=1)
            accepted = matched.sum(dim=1)  # [B]: the longest prefix of drafts the full model agrees with
            bonus = target.gather(1, accepted[:, None])[:, 0]
            host = torch.cat([target, accepted[:, None]], dim=1).cpu()  # the step's one host transfer
            emitted_tokens, accepted_host = host[:, :-1], host[:, -1]  # accepted drafts equal the targets
        else:
            p = sampler.probs(logits)  # [B, gamma + 1, V] on the host
            d = block[:, 1:].cpu()
            emitted_tokens = torch.zeros((pending.shape[0], gamma + 1), dtype=torch.long)
            accepted_host = torch.zeros(pending.shape[0], dtype=torch.long)
            for i in live_host.nonzero().flatten().tolist():
                a, b = sample_accept(d[i].tolist(), [qj[i] for qj in q], p[i], sampler.generator)
                accepted_host[i] = a
                emitted_tokens[i, :a], emitted_tokens[i, a] = d[i, :a], b
            accepted = accepted_host.to(rt.device)
            bonus = emitted_tokens.gather(1, accepted_host[:, None])[:, 0].to(rt.device)
        stats["drafted_tokens"] += gamma * int(live_host.sum())
        stats["accepted_tokens"] += int(accepted_host[live_host].sum())
        # a row goes on after its last accepted token; finished rows stay where they are
        state.pos = torch.where(live, pos0 + accepted + 1, pos0)
        emitted = out.emit_block(emitted_tokens, torch.where(live_host, accepted_host + 1, 0))
        return torch.where(live, bonus, pending), emitted


class StepClock:
    """Time spent drafting and verifying: CUDA events on the device's stream (resolved once, at the end), host
    clocks on the CPU. mark(phase) starts `phase` and ends the one before; mark(None) only ends it."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str | None, object]] = []

    def mark(self, phase: str | None) -> None:
        if self.cuda:
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self.marks.append((phase, stamp))

    def totals(self) -> dict[str, float]:
        out = {"draft_time_s": 0.0, "verify_time_s": 0.0}
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                out[f"{phase}_time_s"] += a.elapsed_time(b) / 1e3 if self.cuda else b - a
        return out


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
