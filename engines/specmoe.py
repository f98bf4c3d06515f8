"""SpecMoE (arXiv 2604.10152): self-assisted speculative decoding for CPU-offloaded MoE inference, and `nospec`,
the same expert management with speculation off.

Draft: the target model itself, its non-expert layers plus N resident "draft experts" per MoE layer. The router
is unchanged; a routed expert that is not resident is replaced by its nearest resident expert in an affinity
table (L2 distance between the flattened expert weights, gate/up and down together). Drafting copies nothing.
Verification: one forward of the full model over every drafted token of every sequence, exact routing; each
missing expert is copied once per layer per pass and serves every token routed to it (deferred, coalesced).
Draft experts are refreshed from recent verification passes, by each expert's share of their routed pairs
(hot-temporal); every generate call starts from the draft sets `prepare` left (experts 0 .. N-1, or with
`start = "warm"` where serving the calibration prompts leaves them).
Beyond the paper, each one option away from it: `prefetch = "draft"` copies the experts the drafts' router chose
while drafting (engines/prefetch.py); `gamma = "auto"` chooses the draft length per batch size from measured
acceptance and step times (engines/draftlen.py); `draft_experts = "budget"` takes as many draft experts as the
expert budget holds. The three are the defaults, the fastest settings measured (results/h200/acceptance/README.md);
the paper's are gamma = 4, adaptive = false, prefetch = "none", draft_experts = 4.
A draft forward never learns its routing on the host: the substitution is a device-side table from expert id to
the pool slot of its substitute, so drafts are CUDA-graph replays; acceptance, bonus tokens and next positions
are computed on the device for the whole batch, with one host transfer per step (prefetch adds two reads of the
drafts' routing mask, after the first draft forward and after the last).
The file holds the engine, its policy and its decode loop together (over 500 lines) because the three share one
state (the draft sets, the substitution table, the per-batch draft-length model) that splitting would pass around.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .base import RuntimeEngine, check_profile, profile_field
from .draftlen import DraftLengthModel
from .errors import BadInput
from .experts import ExpertCounters, distinct_experts
from .prefetch import DraftPrefetch
from .runtime import ExpertPolicy, Generation, ModelRuntime, Outputs, RowMask, Sampler, SamplingSettings
from .store import ExpertStore

DRAFT_POLICIES = ("hot-temporal", "hot-global", "random")
PREFETCH = ("draft", "none")
STARTS = ("warm", "cold")
PAPER_DRAFT_EXPERTS = 4  # the paper's best N of those it tried


@dataclass
class SpecMoEOptions:
    gamma: int | str = field(default="auto", metadata={
        "help": "draft length: tokens drafted per sequence per step (>= 1), or auto: per batch size, the one of "
                "`gammas` that maximises expected tokens/s from measured acceptance and step times",
        "words": ("auto",)})
    gammas: str = field(default="1,2,4,6,8,10", metadata={"help": "gamma=auto: the draft lengths it chooses from"})
    draft_experts: int | str = field(default="budget", metadata={
        "help": "N, resident draft experts per MoE layer (<= experts per layer; an expert budget may lower it), or "
                "budget (the default): as many as the expert budget holds, or the paper's 4 where every expert fits "
                "(a draft of every expert would be the model itself). Budget left after the draft experts "
                "widens the prefetch window (prefetch=draft); without prefetch it stays unused",
        "words": ("budget",)})
    draft_policy: str = field(default="hot-temporal", metadata={
        "help": "which experts are draft experts: hot-temporal (refreshed from recent verification passes), "
                "hot-global (most used in a profiling pass, fixed), random (fixed, seeded)"})
    prefetch: str = field(default="draft", metadata={
        "help": "draft (the default): copy the experts the drafts' router chose (before substitution) while "
                "drafting, so verification finds them on the device; none: the paper's deferred, coalesced copies "
                "in verification only"})
    start: str = field(default="cold", metadata={
        "help": "hot-temporal: where the draft sets start. cold (the default): experts 0 .. N-1 of every layer, "
                "scores zero; warm: prepare serves the profiling prompts (see profile) once with plain steps, so the "
                "sets and scores start where hot-temporal leaves them after those (on the H100, trained small: "
                "1.02x cold at batch 16, 1.00x at 64, 0.86x at 1; results/h200/draftsets/)"})
    profile: str = profile_field("hot-global (and hot-temporal's warm start)")
    adaptive: bool = field(default=True, metadata={
        "help": "plain steps (gamma 0) are a candidate too: speculation switches off where a plain step is "
                "expected to be faster; what it learns carries over to the next call with the same batch size"})
    decay: float = field(default=0.8, metadata={"help": "hot-temporal: weight of older passes in expert scores"})
    seed: int = field(default=0, metadata={"help": "seed of the random draft policy"})

    def __post_init__(self):
        if isinstance(self.adaptive, str):  # a flag given as text ("true", "off", ...)
            self.adaptive = self.adaptive.lower() in ("1", "true", "yes", "on")
        self.gamma = _whole_or_word(self.gamma, "auto")
        if self.gamma != "auto" and self.gamma < 1:
            raise BadInput(f"specmoe gamma={self.gamma}: the draft length must be at least 1 (or auto)")
        self.gammas = ",".join(map(str, parse_gammas(self.gammas)))
        self.draft_experts = _whole_or_word(self.draft_experts, "budget")
        if self.draft_experts != "budget" and self.draft_experts < 1:
            raise BadInput(f"specmoe draft_experts={self.draft_experts}: must be at least 1 (or budget)")
        if self.draft_policy not in DRAFT_POLICIES:
            raise BadInput(f"unknown draft policy {self.draft_policy!r}; allowed: {', '.join(DRAFT_POLICIES)}")
        if self.prefetch not in PREFETCH:
            raise BadInput(f"specmoe prefetch={self.prefetch!r}; allowed: {', '.join(PREFETCH)}")
        if self.start not in STARTS:
            raise BadInput(f"specmoe start={self.start!r}; allowed: {', '.join(STARTS)}")
        check_profile("specmoe", self.profile)
        if not 0 <= float(self.decay) < 1:
            raise BadInput(f"specmoe decay={self.decay}: must be in [0, 1)")

    def candidates(self) -> list[int]:
        """The draft lengths the step chooses from (0: a plain step)."""
        lengths = parse_gammas(self.gammas) if self.gamma == "auto" else [int(self.gamma)]
        return ([0] if self.adaptive else []) + lengths


def _whole_or_word(value, word: str):
    """An option that is a whole number or one word, as make_options coerced it (or as a caller wrote it)."""
    return value if value == word or isinstance(value, int) else int(value)


def parse_gammas(text) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; BadInput for an empty list or a length below 1."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise BadInput(f"specmoe gammas={text!r}: give draft lengths of at least 1, like 1,2,4,6,8,10")
    return sorted({int(p) for p in parts})


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
    the layer's draft set is refreshed from recent usage, keeping copies made this pass instead of re-copying.
    With `prefetch_slots`, the drafts' routing is noted on the device and its experts copied ahead of verification
    into that many pool slots (engines/prefetch.py)."""

    def __init__(self, n: int, policy: str, decay: float, seed: int, prefetch_slots: int = 0, drafts: bool = True):
        self.n, self.policy, self.decay, self.seed = n, policy, decay, seed
        self.prefetch_slots = prefetch_slots
        self.drafts = drafts  # False for nospec: the substitution tables are never needed
        self.prefetch: DraftPrefetch | None = None
        self.mode = "verify"

    def slots(self, store: ExpertStore) -> int:
        # the draft sets, one layer's verification copies, and the prefetch window
        return self.n * store.num_layers + store.num_experts + self.prefetch_slots

    def setup(self) -> None:
        store = self.store
        E, L = store.num_experts, store.num_layers
        self.distances = [affinity_distances(store, layer) for layer in range(L)]
        self.scores = [[0.0] * E for _ in range(L)]  # hot-temporal's decayed usage (floats: the per-layer path)
        rng = random.Random(self.seed)
        initial = [sorted(rng.sample(range(E), self.n)) if self.policy == "random" else list(range(self.n))
                   for _ in range(L)]
        self.draft_sets: list[list[int]] = [[] for _ in range(L)]
        self.substitute: list[list[int]] = [[] for _ in range(L)]  # nearest resident expert of every expert
        self.sub_slots = torch.full((L, E), -1, dtype=torch.long, device=store.device)  # ... as pool slots
        # [L, 2, E]: per expert, what one draft forward's distinct routed expert adds to draft_requests (1) and to
        # draft_substituted (1 unless it is a draft expert): the two tallies in one product inside the graph
        self.tally_weights = torch.ones((L, 2, E), dtype=torch.long, device=store.device)
        self._stale: set[int] = set()  # layers whose draft set changed since their tables were sent
        self._pairs: list[int] = []  # the routed pairs per expert of the layer being verified (`note_routing`)
        self.prefetch = DraftPrefetch(store, self.prefetch_slots) if self.prefetch_slots else None
        for layer in range(L):
            self.set_draft_experts(layer, initial[layer])

    def set_draft_experts(self, layer: int, experts: list[int]) -> None:
        """Make `experts` the layer's resident draft set (a copy made this pass is kept, not made again). Its
        substitution tables are built at the end of the forward, or before the next draft (`draft_tables`): once
        for every layer a verification changed, off the per-layer path, and never for nospec, which never drafts."""
        store = self.store
        for e in set(self.draft_sets[layer]) - set(experts):
            store.drop(layer, e)
        for e in experts:
            store.keep(layer, e)
        self.draft_sets[layer] = sorted(experts)
        self._stale.add(layer)

    def state(self) -> tuple[list[list[int]], list[list[float]]]:
        """The draft sets and hot-temporal scores, for `restore`."""
        return [list(s) for s in self.draft_sets], [list(s) for s in self.scores]

    def restore(self, state: tuple[list[list[int]], list[list[float]]]) -> bool:
        """Back to a `state`: its draft sets resident (copies queued), its scores. True when a set changed."""
        sets, scores = state
        changed = [layer for layer, experts in enumerate(sets) if experts != self.draft_sets[layer]]
        for layer in changed:
            self.set_draft_experts(layer, experts=sets[layer])
        self.scores = [list(s) for s in scores]
        return bool(changed)

    def draft_tables(self) -> None:
        """The substitution tables of every layer whose draft set changed, on the device (queued, no host sync)."""
        if not self._stale:
            return
        store, E = self.store, self.store.num_experts
        layers = sorted(self._stale)
        self._stale.clear()
        slots = torch.empty((len(layers), E), dtype=torch.long)
        weights = torch.ones((len(layers), 2, E), dtype=torch.long)
        for i, layer in enumerate(layers):
            resident = torch.tensor(self.draft_sets[layer])  # a resident expert is its own nearest (distance 0)
            self.substitute[layer] = resident[self.distances[layer][:, resident].argmin(dim=1)].tolist()
            store.sync_layer(layer)  # the draft graphs read these slots: their copies come first
            slots[i] = torch.tensor([store.resident[(layer, e)] for e in self.substitute[layer]])
            weights[i, 1, resident] = 0  # a draft expert serves itself: not a substitution
        if store.device.type == "cuda":  # pinned, so the copies are queued in stream order without a sync
            slots, weights = slots.pin_memory(), weights.pin_memory()
        if len(layers) == store.num_layers:
            self.sub_slots.copy_(slots, non_blocking=True)
            self.tally_weights.copy_(weights, non_blocking=True)
        else:
            for i, layer in enumerate(layers):
                self.sub_slots[layer].copy_(slots[i], non_blocking=True)
                self.tally_weights[layer].copy_(weights[i], non_blocking=True)

    def sync_free_table(self, layer):
        if self.mode == "draft":
            return self.sub_slots[layer]
        # every expert a draft expert: the pool's table. Not the base class's "pool holds every expert" test: with
        # prefetch the pool can hold them all for a moment, before the rows of slot_of are sent
        return self.store.slot_of[layer] if self.n == self.store.num_experts else None

    def graphable(self) -> bool:
        return self.mode == "draft" or self.n == self.store.num_experts

    def count_sync_free(self, layer, top_k_index, active, counters: ExpertCounters) -> tuple[str, ...]:
        if self.mode != "draft":
            return super().count_sync_free(layer, top_k_index, active, counters)
        routed = distinct_experts(top_k_index, active, self.store.num_experts)  # [E] long, 0 or 1
        counters.add_vector(("draft_requests", "draft_substituted"), (routed * self.tally_weights[layer]).sum(-1))
        if self.prefetch is not None:
            self.prefetch.note(layer, routed > 0)
        return ()

    def after_layer(self, layer, experts):
        if experts is None:
            return
        if self.policy == "hot-temporal":
            self._refresh(layer, experts)
        prefetched = self.prefetch.settle(layer, experts) if self.prefetch is not None else set()
        for e in (set(experts) | prefetched) - set(self.draft_sets[layer]):
            self.store.drop(layer, e)
        if self.prefetch is not None:
            self.prefetch.fill(after=layer)  # the slots just given back take later layers' predicted experts

    def note_routing(self, layer, pairs):
        self._pairs = pairs

    def _refresh(self, layer: int, experts: list[int]) -> None:
        """Hot-temporal: the layer's draft set becomes the N experts of the highest decayed usage. A pass adds
        each expert's share of the pass's routed pairs: counting each used expert once instead, a pass of a large
        batch, which uses every expert, left all scores tied, and the set moved only in the ragged tail."""
        decay, pairs = float(self.decay), self._pairs
        score = self.scores[layer] = [s * decay for s in self.scores[layer]]
        total = sum(pairs)
        for e in experts:
            score[e] += pairs[e] / total
        current = set(self.draft_sets[layer])
        # highest score first; on ties keep what is resident, then the lower id (no churn on ties)
        ranked = sorted(range(self.store.num_experts), key=lambda e: (-score[e], e not in current, e))
        if set(ranked[: self.n]) != current:
            self.set_draft_experts(layer, ranked[: self.n])

    def end_forward(self) -> None:
        if self.mode == "draft":
            return
        if self.prefetch is not None:  # a verification, or a forward that never drafted
            for layer, e in self.prefetch.finish():
                if e not in self.draft_sets[layer]:
                    self.store.drop(layer, e)
        if self.drafts:  # the host builds the tables while the device still runs this forward's last layers
            self.draft_tables()


class SpecMoEEngine(RuntimeEngine):
    name = "specmoe"
    summary = "SpecMoE: self-assisted drafting with N resident draft experts, coalesced fetching in verification"
    Options = SpecMoEOptions
    speculate = True

    def make_policy(self, hardware):
        o = self.options
        self.draft_experts = self._draft_experts(hardware)
        prefetching = self.speculate and o.prefetch == "draft"  # nospec never drafts, so it has nothing to prefetch
        self.prefetch_slots = self._prefetch_window(self.draft_experts) if prefetching else 0
        self.lengths: dict[int, DraftLengthModel] = {}  # batch size -> its draft length model, kept across calls
        self.policy = SpecMoEPolicy(self.draft_experts, o.draft_policy, o.decay, o.seed, self.prefetch_slots,
                                    drafts=self.speculate)
        self._start = None  # the draft sets every generate call starts from (`_start_from_prepared`)
        return self.policy

    def _draft_experts(self, hardware) -> int:
        """N: as asked, at most what the expert budget holds. `budget`: all that it holds, the best N in every cell
        measured (results/h200/acceptance/README.md, s5; results/h200/paper/README.md, the N sweep); where every
        expert fits (or there is no budget), the paper's N = 4, since a draft of every expert is the model itself."""
        store, asked = self.runtime.store, self.options.draft_experts
        if asked != "budget" and asked > store.num_experts:
            raise BadInput(f"specmoe draft_experts={asked}: the model has only {store.num_experts} experts per layer")
        fits = store.num_experts
        if self.expert_budget is not None:
            fits = min(fits, self.expert_budget // (store.expert_bytes * store.num_layers))
            if fits < 1:
                raise BadInput(f"hardware {hardware.spec!r}: the expert budget cannot hold one draft expert per "
                               f"layer ({store.expert_bytes * store.num_layers} bytes)")
        if asked != "budget":
            return min(asked, fits)
        return fits if fits < store.num_experts else min(PAPER_DRAFT_EXPERTS, store.num_experts)

    def _prefetch_window(self, n: int) -> int:
        """Pool slots for prefetched experts: two layers' worth, the room `overlap`'s prefetch holds, plus what the
        expert budget leaves after the draft sets; never more than every expert that is not a draft expert."""
        store = self.runtime.store
        others = store.num_layers * (store.num_experts - n)
        spare = others if self.expert_budget is None else \
            max(0, self.expert_budget // store.expert_bytes - n * store.num_layers)
        return min(others, 2 * store.num_experts + spare)

    def _prepare(self, prompts, settings) -> None:
        if self.options.draft_policy == "hot-global":  # the globally hottest experts of a profiling pass
            usage = [torch.zeros(self.runtime.store.num_experts) for _ in range(self.runtime.store.num_layers)]
            for _, layer, experts in self.record_routing(self.profiling_prompts(prompts), settings):
                usage[layer][experts] += 1
            for layer, u in enumerate(usage):
                order = sorted(range(len(u)), key=lambda e: (-u[e].item(), e))
                self.policy.set_draft_experts(layer, order[: self.draft_experts])
        elif self.options.draft_policy == "hot-temporal":
            self._setup["draft_start"] = self._warm_start(prompts, settings)

    def _warm_start(self, prompts, settings) -> str:
        """Hot-temporal's sets and scores after serving the profiling prompts once with plain steps (the same
        refresh a verification pass makes), so that a call does not start at experts 0 .. N-1 and spend its first
        steps learning what any served traffic would teach. Cold where asked, or where no calibration set was
        given (a direct library call)."""
        if self.options.start == "cold" or (self.options.profile != "oracle" and self._calibration is None):
            return "cold"
        profiling = self.profiling_prompts(prompts)
        self.policy.mode = "verify"
        self.runtime.generate(profiling, settings)
        return f"warm: {self._setup['profiled_on']}"

    def length_model(self, batch: int) -> DraftLengthModel:
        if batch not in self.lengths:
            self.lengths[batch] = DraftLengthModel(self.options.candidates())
        return self.lengths[batch]

    def prepare(self, prompts, settings, calibration=None) -> None:
        super().prepare(prompts, settings, calibration)
        self._start = self.policy.state()

    def _start_from_prepared(self) -> None:
        """Each generate call starts from the draft sets and scores prepare left (the initial or the profiled
        ones), so the iterations of a cell are samples of the same work. Carried over from call to call instead,
        hot-temporal's sets made bytes per token differ by up to 50% between iterations of one cell on the H200
        (results/h200/hostpath/). The copies this takes land before the call starts and are not its bytes."""
        if self._start is None:
            self._start = self.policy.state()
        elif self.policy.restore(self._start):
            self.runtime.store.sync_all()
            self.runtime.sync()

    def generate(self, prompts, settings) -> Generation:
        self._start_from_prepared()
        self.policy.mode = "verify"
        if not self.speculate:
            gen = self.runtime.generate(prompts, settings)
            gen.stats.update(draft_experts_per_layer=self.draft_experts)
            return gen
        return SpeculativeDecoder(self.runtime, self.policy, self.length_model(len(prompts))).run(
            prompts, settings, extra=dict(draft_experts_per_layer=self.draft_experts))

    def setup_stats(self) -> dict:
        out = dict(super().setup_stats(), draft_experts_per_layer=self.draft_experts)
        if self.speculate:
            out.update(prefetch_slots=self.prefetch_slots,
                       draft_length={b: m.summary() for b, m in sorted(self.lengths.items())})
        return out

    def teacher_forced_logits(self, prompts, continuations):
        """Feed the continuation in blocks of gamma + 1 tokens (gamma: the draft length this batch size uses now),
        the shape a verification pass has, so that the rounding of this engine's own forwards is what gets compared
        (in bfloat16 it differs from one token at a time). Returns [B, C, V] like the runtime's version."""
        if not self.speculate:
            return super().teacher_forced_logits(prompts, continuations)
        rt, width = self.runtime, self.length_model(len(prompts)).best() + 1
        self.policy.mode = "verify"
        with torch.inference_mode():
            first, state = rt.prefill(prompts, len(continuations[0]), slack=width)
            cont = torch.tensor(continuations, device=rt.device)  # [B, C]
            out, fed, C = [first[:, None, :]], 0, cont.shape[1]
            everyone = torch.ones(cont.shape[0], dtype=torch.bool, device=rt.device)
            while fed < C - 1:  # the last token's own prediction is not needed
                block = cont[:, fed: min(fed + width, C - 1)]
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
    back, and each row continues at its own position. Each step's gamma comes from the length model
    (engines/draftlen.py); gamma 0 is a plain step."""

    def __init__(self, runtime: ModelRuntime, policy: SpecMoEPolicy, lengths: DraftLengthModel):
        self.rt, self.policy, self.lengths = runtime, policy, lengths

    def run(self, prompts: list[list[int]], settings: SamplingSettings, extra: dict) -> Generation:
        rt, top = self.rt, max(self.lengths.candidates)
        rt.reset_stats()
        if self.policy.prefetch is not None:
            self.policy.prefetch.reset_counters()
        sampler = Sampler(settings)
        out = Outputs(len(prompts), settings)
        stats = dict(drafted_tokens=0, accepted_tokens=0, draft_h2d_bytes=0, verify_h2d_bytes=0, spec_steps=0,
                     plain_steps=0, seq_steps=0, draft_forwards=0, drafted_by_position=[0] * top,
                     accepted_by_position=[0] * top, steps_by_gamma={})
        self.clock = StepClock(rt.device)
        t_start = time.perf_counter()
        logits, state = rt.prefill(prompts, settings.max_new_tokens, slack=top + 1)
        pending, pending_host = sampler.next(logits, rt.device)  # [B] sampled, not yet in the cache
        t_first = time.perf_counter()
        out.emit_all(pending_host)
        step_times, step_tokens, step_rows = [], [], []
        active = RowMask(out, rt.device)
        while not out.all_done:
            gamma, t0 = self.lengths.choose(), time.perf_counter()
            step_rows.append(out.rows_left)
            if gamma == 0:
                logits = state.step(rt, pending[:, None], active.device_mask())
                pending, pending_host = sampler.next(logits[:, -1, :], rt.device)
                n, accepted = out.emit_all(pending_host), torch.zeros(0, dtype=torch.long)
                stats["plain_steps"] += 1
            else:
                pending, n, accepted = self.speculate(state, pending, active, sampler, out, stats, gamma)
            now = time.perf_counter()
            self._count(stats, gamma, accepted, now - t0)
            stats["seq_steps"] += step_rows[-1]
            step_times.append(now)
            step_tokens.append(n)
        return self._generation(prompts, out, stats, extra, t_start, t_first, step_times, step_tokens, step_rows)

    def _count(self, stats: dict, gamma: int, accepted: torch.Tensor, step_s: float) -> None:
        """A step's draft positions into the stats and the length model. accepted [live rows]: drafts each kept."""
        drafted = [len(accepted)] * gamma
        kept = (accepted[:, None] >= torch.arange(1, gamma + 1)).sum(0).tolist()  # accepted at each position
        for j in range(gamma):
            stats["drafted_by_position"][j] += drafted[j]
            stats["accepted_by_position"][j] += kept[j]
        stats["steps_by_gamma"][gamma] = stats["steps_by_gamma"].get(gamma, 0) + 1
        self.lengths.record(gamma, step_s, self.clock.last("draft") if gamma else 0.0, drafted, kept)

    def _generation(self, prompts, out, stats, extra, t_start, t_first, step_times, step_tokens, step_rows):
        counts = self.rt.stats()
        stats.update(counts, draft_expert_requests=counts.pop("draft_requests"), **self.clock.totals(), **extra)
        if self.policy.prefetch is not None:
            stats.update(self.policy.prefetch.stats())
        return Generation(tokens=out.tokens, prompt_lens=[len(p) for p in prompts], t_start=t_start, t_first=t_first,
                          step_times=step_times, step_tokens=step_tokens, t_end=time.perf_counter(), stats=stats,
                          step_rows=step_rows)

    def speculate(self, state, pending, active: RowMask, sampler: Sampler, out: Outputs, stats, gamma: int):
        """One draft + verify step. pending [B] (device): each row's token not yet in the cache. Returns (the new
        pending tokens [B], tokens emitted across the batch, drafts accepted by each live row [live] (host))."""
        rt, policy, store = self.rt, self.policy, self.rt.store
        live = active.device_mask()  # [B] bool
        live_host = ~out.done
        pos0 = state.pos

        # draft: gamma forwards with the draft experts (graph replays); each writes its token's slot
        mark = self._bytes()
        self.clock.mark("draft")
        drafts, q = self._draft(state, pending, live, sampler, gamma)
        stats["draft_h2d_bytes"] += self._own_bytes(mark)
        stats["draft_forwards"] += gamma

        # verify: [pending, d1..d_gamma] for every sequence in one forward of the full model, at pos0..pos0+gamma
        mark = self._bytes()
        self.clock.mark("verify")
        state.pos = pos0
        block = torch.stack([pending] + drafts, dim=1)  # [B, gamma + 1]
        logits = state.step(rt, block, live)  # [B, gamma + 1, V]
        self.clock.mark(None)
        stats["verify_h2d_bytes"] += self._own_bytes(mark)

        if sampler.settings.greedy:
            target = logits.argmax(-1)  # [B, gamma + 1]: the full model's token after each verified one
            matched = (block[:, 1:] == target[:, :gamma]).long().cumprod(dim=1)
            accepted = matched.sum(dim=1)  # [B]: the longest prefix of drafts the full model agrees with
            bonus = target.gather(1, accepted[:, None])[:, 0]
            host = torch.cat([target, accepted[:, None]], dim=1).cpu()  # the step's one host transfer
            emitted_tokens, accepted_host = host[:, :-1], host[:, -1]  # accepted drafts equal the targets
        else:
            emitted_tokens, accepted_host = self._sample_accept(block, logits, q, live_host, sampler)
            accepted = accepted_host.to(rt.device)
            bonus = emitted_tokens.gather(1, accepted_host[:, None])[:, 0].to(rt.device)
        stats["drafted_tokens"] += gamma * int(live_host.sum())
        stats["accepted_tokens"] += int(accepted_host[live_host].sum())
        stats["spec_steps"] += 1
        # a row goes on after its last accepted token; finished rows stay where they are
        state.pos = torch.where(live, pos0 + accepted + 1, pos0)
        emitted = out.emit_block(emitted_tokens, torch.where(live_host, accepted_host + 1, 0))
        return torch.where(live, bonus, pending), emitted, accepted_host[live_host]

    def _draft(self, state, pending, live, sampler: Sampler, gamma: int):
        """gamma draft forwards from `pending`. Returns (drafts[j]: [B] token ids on the device, q[j]: [B, V] draft
        probabilities when sampling). With prefetch, the drafts' routing is read after the first forward and after
        the last, and its missing experts copied while the next forwards run."""
        rt, policy, prefetch = self.rt, self.policy, self.policy.prefetch
        x, drafts, q = pending, [], []
        if prefetch is not None:
            prefetch.start()
        policy.draft_tables()
        policy.mode = "draft"
        try:
            for j in range(gamma):
                logits = state.step(rt, x[:, None], live)[:, -1, :]
                if sampler.settings.greedy:
                    x = logits.argmax(-1)
                else:
                    q.append(sampler.probs(logits))
                    x = torch.multinomial(q[-1], 1, generator=sampler.generator)[:, 0].to(rt.device)
                drafts.append(x)
                if prefetch is not None and j in (0, gamma - 1):
                    prefetch.plan()
        finally:
            policy.mode = "verify"
        return drafts, q

    @staticmethod
    def _sample_accept(block, logits, q, live_host, sampler: Sampler):
        """Speculative sampling for every live row (on the host): (emitted tokens [B, gamma + 1], accepted [B])."""
        p = sampler.probs(logits)  # [B, gamma + 1, V] on the host
        d = block[:, 1:].cpu()
        B, gamma = d.shape
        emitted = torch.zeros((B, gamma + 1), dtype=torch.long)
        accepted = torch.zeros(B, dtype=torch.long)
        for i in live_host.nonzero().flatten().tolist():
            a, b = sample_accept(d[i].tolist(), [qj[i] for qj in q], p[i], sampler.generator)
            accepted[i] = a
            emitted[i, :a], emitted[i, a] = d[i, :a], b
        return emitted, accepted

    def _bytes(self) -> tuple[int, int]:
        """(all expert bytes copied so far, of which prefetched)."""
        prefetch = self.policy.prefetch
        return self.rt.store.counters.h2d_bytes, prefetch.h2d_bytes if prefetch is not None else 0

    def _own_bytes(self, mark: tuple[int, int]) -> int:
        """Bytes a phase copied for itself since `mark`: prefetched copies are counted apart."""
        now = self._bytes()
        return (now[0] - mark[0]) - (now[1] - mark[1])


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

    def last(self, phase: str) -> float:
        """Seconds of the latest `phase` (ended, and on CUDA already past on the device: the host read since)."""
        i = max(k for k, (p, _) in enumerate(self.marks) if p == phase)
        a, b = self.marks[i][1], self.marks[i + 1][1]
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

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
