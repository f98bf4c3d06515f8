"""SpecMoE: exact greedy equivalence with `resident`, the target distribution under sampling, zero-byte drafting,
coalesced verification fetches, and bad options."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare

from engines import registry
from engines.errors import BadInput
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from engines.draftlen import PROBE_EVERY
from engines.specmoe import greedy_accept, sample_accept
from workloads.models import load_model

CPU = HardwareProfile.parse("cpu")


def prompts_of_different_lengths(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, 128) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


def loaded(name, model, dtype=torch.float64, **options):
    engine = registry.create(name, **options)
    engine.load(load_model(model, dtype=dtype), CPU)
    return engine


_reference_cache: dict = {}


def reference_tokens(model, dtype, batch, settings):
    key = (model, dtype, batch, settings.max_new_tokens)
    if key not in _reference_cache:
        prompts = prompts_of_different_lengths(batch, seed=batch)
        _reference_cache[key] = loaded("resident", model, dtype).generate(prompts, settings).tokens
    return _reference_cache[key]


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("gamma", [1, 4, 10])
def test_greedy_specmoe_equals_resident_in_float64(model, batch, gamma):
    settings = SamplingSettings(max_new_tokens=14)
    engine = loaded("specmoe", model, gamma=gamma, adaptive=False)
    gen = engine.generate(prompts_of_different_lengths(batch, seed=batch), settings)
    assert gen.tokens == reference_tokens(model, torch.float64, batch, settings)
    assert gen.stats["drafted_tokens"] > 0 and gen.stats["spec_steps"] > 0
    assert gen.stats["draft_h2d_bytes"] == 0


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
@pytest.mark.parametrize("options", [dict(gamma=4, adaptive=False), dict(gamma=10, adaptive=True),
                                     dict(gamma=3, draft_policy="hot-global", adaptive=False),
                                     dict(gamma=3, draft_policy="random", draft_experts=2, adaptive=False)])
def test_greedy_specmoe_equals_resident_in_float32(model, options):
    settings = SamplingSettings(max_new_tokens=14)
    prompts = prompts_of_different_lengths(8, seed=8)
    engine = loaded("specmoe", model, torch.float32, **options)
    engine.prepare(prompts, settings, calibration=lambda: prompts_of_different_lengths(8, seed=80))
    assert engine.generate(prompts, settings).tokens == reference_tokens(model, torch.float32, 8, settings)


def test_adaptive_mode_keeps_what_it_learnt_between_calls():
    """After speculation measured slower than plain steps, the next call of the same batch size decodes plainly,
    timing speculation again only every PROBE_EVERY steps, and still gives resident's tokens."""
    settings = SamplingSettings(max_new_tokens=14)
    prompts = prompts_of_different_lengths(8, seed=8)
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, adaptive=True)
    engine.generate(prompts, settings)
    model = engine.lengths[8]
    assert model.candidates == [0, 4] and set(model.t_rest) == {0, 4} and model.steps > 0
    model.t_rest[4] = 1e3  # as if a speculative step had taken 1000 s
    gen = engine.generate(prompts, settings)
    assert gen.tokens == reference_tokens("tiny-mixtral-random", torch.float32, 8, settings)
    steps = gen.stats["spec_steps"] + gen.stats["plain_steps"]  # a probe every PROBE_EVERY steps of the model's
    assert gen.stats["spec_steps"] <= 1 + (steps - 1) // PROBE_EVERY  # count, which the first call left at any phase
    assert gen.stats["plain_steps"] >= 8  # of 13 decode steps' worth of tokens; a probe gives up to 5


def test_nospec_is_the_same_expert_management_without_drafting():
    settings = SamplingSettings(max_new_tokens=14)
    engine = loaded("nospec", "tiny-mixtral-random", torch.float32)
    gen = engine.generate(prompts_of_different_lengths(8, seed=8), settings)
    assert gen.tokens == reference_tokens("tiny-mixtral-random", torch.float32, 8, settings)
    assert "drafted_tokens" not in gen.stats
    assert gen.step_tokens == [8] * (settings.max_new_tokens - 1)  # one token per sequence per decode step
    assert gen.stats["hits"] > 0  # the resident draft experts serve part of the routing
    offload = loaded("offload", "tiny-mixtral-random", torch.float32)
    assert gen.stats["h2d_bytes"] < offload.generate(prompts_of_different_lengths(8, seed=8), settings).stats[
        "h2d_bytes"]  # and they save copies


def test_drafting_moves_nothing_and_verification_fetches_each_missing_expert_once_per_layer_and_pass():
    """The paper's fetching (prefetch none): deferred to verification and coalesced."""
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, draft_experts=2, adaptive=False,
                    prefetch="none")
    store, policy = engine.runtime.store, engine.policy
    copies = []
    original = store.copy_to_device

    def spy(layer, expert):
        copies.append((policy.mode, engine.runtime.forward_index, layer, expert))
        return original(layer, expert)

    store.copy_to_device = spy
    gen = engine.generate(prompts_of_different_lengths(16, seed=3), SamplingSettings(max_new_tokens=12))
    assert copies and all(mode == "verify" for mode, *_ in copies)
    per_pass = Counter((f, layer, e) for _, f, layer, e in copies)
    assert max(per_pass.values()) == 1
    assert gen.stats["draft_h2d_bytes"] == 0
    assert gen.stats["h2d_bytes"] == len(copies) * store.expert_bytes
    assert gen.stats["draft_expert_requests"] > 0


def test_sample_accept_reproduces_the_target_distribution():
    """The acceptance rule alone: with a fixed draft q and target p, emitted first tokens follow p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 2, dtype=torch.float64)
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3], dtype=torch.float64)
    n = 20000
    firsts = []
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        accepted, bonus = sample_accept([d], [q], p, gen)
        firsts.append(d if accepted else bonus)
    counts = [Counter(firsts)[v] for v in range(5)]
    assert chisquare(counts, (p[0] * n).tolist()).pvalue > 1e-3  # fixed seed; a wrong rule gives p ~ 0
    drawn = Counter(int(torch.multinomial(q, 1, generator=gen)) for _ in range(n))
    wrong = [drawn[v] for v in range(5)]
    assert chisquare(wrong, (p[0] * n).tolist()).pvalue < 1e-6  # the test can tell q from p


@pytest.mark.parametrize("prefetch", ["none", "draft"])
def test_sampled_specmoe_matches_the_resident_token_distribution(prefetch):
    """Two-sample chi-square on the 2nd and 3rd generated tokens of 600 copies of one prompt (small vocabulary,
    temperature 1.5 so the distribution is broad). Tokens seen fewer than 10 times are pooled."""
    settings_for = lambda seed: SamplingSettings(max_new_tokens=3, temperature=1.5, top_p=0.95, seed=seed)
    prompt = [[5, 17, 42, 9]] * 300
    spec = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=2, draft_experts=2, adaptive=False,
                  prefetch=prefetch)
    ref = loaded("resident", "tiny-mixtral-random", torch.float32)
    spec_tokens = [t for s in (1, 2) for t in spec.generate(prompt, settings_for(s)).tokens]
    ref_tokens = [t for s in (3, 4) for t in ref.generate(prompt, settings_for(s)).tokens]
    for position in (1, 2):
        a, b = Counter(t[position] for t in spec_tokens), Counter(t[position] for t in ref_tokens)
        common = [v for v in set(a) | set(b) if a[v] + b[v] >= 10]
        table = [[a[v] for v in common] + [sum(a.values()) - sum(a[v] for v in common)],
                 [b[v] for v in common] + [sum(b.values()) - sum(b[v] for v in common)]]
        assert chi2_contingency(table).pvalue > 1e-3, position


def test_greedy_accept_rule():
    assert greedy_accept([4, 5, 6], [4, 5, 7, 9]) == (2, 7)
    assert greedy_accept([4, 5, 6], [4, 5, 6, 9]) == (3, 9)
    assert greedy_accept([4], [1, 2]) == (0, 1)


@pytest.mark.parametrize("options,message", [
    (dict(draft_experts=9), "draft_experts=9: the model has only 8 experts per layer"),
    (dict(gamma=0), "gamma=0: the draft length must be at least 1"),
    (dict(gamma="often"), "option gamma='often': expected a whole number or auto"),
    (dict(gamma="auto", gammas="2,0"), "gammas='2,0': give draft lengths of at least 1, like 1,2,4,6,8,10"),
    (dict(gamma="auto", gammas=""), "gammas='': give draft lengths of at least 1, like 1,2,4,6,8,10"),
    (dict(prefetch="always"), "prefetch='always'; allowed: draft, none"),
    (dict(draft_experts="most"), "option draft_experts='most': expected a whole number or budget"),
    (dict(profile="measured"), "specmoe profile='measured'; allowed: calibration, oracle"),
    (dict(draft_policy="hottest"), "unknown draft policy 'hottest'; allowed: hot-temporal, hot-global, random"),
    (dict(start="hot"), "specmoe start='hot'; allowed: warm, cold"),
])
def test_bad_options(options, message):
    with pytest.raises(BadInput, match=message):
        loaded("specmoe", "tiny-mixtral-random", torch.float32, **options)


def test_teacher_forcing_runs_verification_shaped_blocks_and_agrees_in_float32():
    prompts, settings = prompts_of_different_lengths(8, seed=8), SamplingSettings(max_new_tokens=14)
    ref = loaded("resident", "tiny-mixtral-random", torch.float32)
    tokens = ref.generate(prompts, settings).tokens
    expected = ref.teacher_forced_logits(prompts, tokens)
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, adaptive=False)
    got = engine.teacher_forced_logits(prompts, tokens)
    assert got.shape == expected.shape == (8, 14, 128)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (got - expected).abs().max() < 1e-4


# -- draft-guided prefetch (issue 13) ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
@pytest.mark.parametrize("dtype,batch,gamma", [(torch.float64, 1, 4), (torch.float64, 32, 10), (torch.float32, 8, 3)])
def test_greedy_specmoe_with_prefetch_equals_resident(model, dtype, batch, gamma):
    settings = SamplingSettings(max_new_tokens=14)
    engine = loaded("specmoe", model, dtype, gamma=gamma, draft_experts=2, prefetch="draft", adaptive=False)
    gen = engine.generate(prompts_of_different_lengths(batch, seed=batch), settings)
    assert gen.tokens == reference_tokens(model, dtype, batch, settings)
    assert gen.stats["prefetch_h2d_bytes"] > 0 and gen.stats["draft_h2d_bytes"] == 0


def prefetch_spy(engine):
    """Every expert copy as (forward index, layer, expert, made by the prefetcher?), and per verification pass and
    layer the experts verification routed (what `serve` was asked for)."""
    store, policy, rt = engine.runtime.store, engine.policy, engine.runtime
    copies, routed = [], {}
    copy, fill, serve = store.copy_to_device, policy.prefetch.fill, policy.serve
    state = {"prefetching": False}

    def spy_copy(layer, expert):
        copies.append((rt.forward_index, layer, expert, state["prefetching"]))
        return copy(layer, expert)

    def spy_fill(after):
        state["prefetching"] = True
        try:
            fill(after)
        finally:
            state["prefetching"] = False

    def spy_serve(layer, experts):
        routed[(rt.forward_index, layer)] = list(experts)
        serve(layer, experts)

    store.copy_to_device, policy.prefetch.fill, policy.serve = spy_copy, spy_fill, spy_serve
    return copies, routed


def test_prefetch_counts_each_expert_once_and_splits_used_from_wasted():
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, draft_experts=2, prefetch="draft",
                    adaptive=False)
    copies, routed = prefetch_spy(engine)
    gen = engine.generate(prompts_of_different_lengths(16, seed=3), SamplingSettings(max_new_tokens=12))
    eb, stats = engine.runtime.store.expert_bytes, gen.stats
    assert stats["h2d_bytes"] == len(copies) * eb  # every copy counted once, prefetched ones included
    prefetched = [(f, layer, e) for f, layer, e, by_prefetch in copies if by_prefetch]
    assert stats["prefetch_h2d_bytes"] == len(prefetched) * eb > 0
    # a prefetched expert is verification's: it is never copied again before that verification ran its layer
    verify_of = {f: min(v for v, _ in routed if v >= f) for f, _, _ in prefetched}  # the next verification
    for f, layer, e in prefetched:
        again = [c for c in copies if c[1:3] == (layer, e) and f <= c[0] <= verify_of[f] and not c[3]]
        assert not again, (f, layer, e)
    used = sum(e in routed[(verify_of[f], layer)] for f, layer, e in prefetched)
    assert stats["prefetch_used_bytes"] == used * eb
    assert stats["prefetch_wasted_bytes"] == (len(prefetched) - used) * eb
    assert stats["draft_h2d_bytes"] == 0


def test_prefetch_takes_most_of_verifications_copies():
    """The drafts' routing predicts verification's: with prefetch, verification's own copies fall by more than half
    (tokens and every other setting the same)."""
    prompts, settings = prompts_of_different_lengths(16, seed=3), SamplingSettings(max_new_tokens=12)
    runs = {p: loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, draft_experts=2, prefetch=p,
                      adaptive=False).generate(prompts, settings) for p in ("none", "draft")}
    assert runs["draft"].tokens == runs["none"].tokens
    assert runs["draft"].stats["verify_h2d_bytes"] < 0.5 * runs["none"].stats["verify_h2d_bytes"]
    assert "prefetch_h2d_bytes" not in runs["none"].stats  # not measured where there is no prefetch


# -- draft experts from the budget -------------------------------------------------------------------------------

HALF = HardwareProfile(spec="cpu:half", device="cpu", expert_share=0.5)  # a CPU run under half the experts' bytes


@pytest.mark.parametrize("options,n,window", [
    (dict(draft_experts="budget", prefetch="none"), 4, 0),  # 2 layers x 4 experts fill the budget of 8
    (dict(draft_experts=6, prefetch="none"), 4, 0),  # more than fits: capped
    (dict(draft_experts=2, prefetch="draft"), 2, 12),  # two layers' worth plus the 4 left over, at most the 12 others
    (dict(draft_experts="budget", prefetch="draft"), 4, 8),  # nothing left over: two layers' worth (2 x 8 > 8 others)
])
def test_draft_experts_and_prefetch_window_from_the_budget(options, n, window):
    engine = registry.create("specmoe", **options)
    engine.load(load_model("tiny-mixtral-random", dtype=torch.float32), HALF)
    store = engine.runtime.store
    assert engine.draft_experts == n and engine.prefetch_slots == window
    assert store.num_slots == n * store.num_layers + store.num_experts + window
    assert engine.setup_stats()["resident_experts"] == n * store.num_layers


@pytest.mark.parametrize("hardware,n", [
    (HardwareProfile(spec="cpu:quarter", device="cpu", expert_share=0.25), 2),  # all that fit
    (HALF, 4),
    (HardwareProfile(spec="cpu:all", device="cpu", expert_share=1.0), 4),  # every expert fits: the paper's 4, not 8
    (HardwareProfile(spec="cpu", device="cpu"), 4),  # no budget
])
def test_draft_experts_default_is_all_that_the_budget_holds(hardware, n):
    engine = registry.create("specmoe")
    engine.load(load_model("tiny-mixtral-random", dtype=torch.float32), hardware)
    assert engine.options.draft_experts == "budget" and engine.draft_experts == n


def test_a_draft_of_every_expert_is_the_model():
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, draft_experts=8)
    assert engine.draft_experts == 8
    gen = engine.generate(prompts_of_different_lengths(4), SamplingSettings(max_new_tokens=6))
    assert gen.stats["accepted_tokens"] == gen.stats["drafted_tokens"]


# -- the draft length chosen by measurement ----------------------------------------------------------------------


def test_auto_gamma_gives_resident_tokens_and_reports_its_model():
    settings = SamplingSettings(max_new_tokens=14)
    prompts = prompts_of_different_lengths(8, seed=8)
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma="auto", gammas="1,3,6", prefetch="draft")
    for _ in range(2):  # the second call starts from what the first learnt
        gen = engine.generate(prompts, settings)
        assert gen.tokens == reference_tokens("tiny-mixtral-random", torch.float32, 8, settings)
    model = engine.setup_stats()["draft_length"][8]
    assert model["candidates"] == [0, 1, 3, 6] and set(model["rest_ms"]) == {0, 1, 3, 6}  # each one timed
    assert model["best"] in (0, 1, 3, 6) and sum(model["steps_by_gamma"].values()) == engine.lengths[8].steps
    assert len(gen.stats["drafted_by_position"]) == 6
    assert sum(gen.stats["steps_by_gamma"].values()) == len(gen.step_times)


@pytest.mark.parametrize("name,options", [("specmoe", dict(gamma=4, adaptive=False, prefetch="none")),
                                          ("specmoe", dict(gamma=4, adaptive=False, prefetch="draft")),
                                          ("nospec", {})])
def test_every_generate_starts_from_the_prepared_draft_sets(name, options):
    """The iterations of a cell are samples of the same work: hot-temporal's draft sets, changed by one call, are
    back to what prepare left when the next call starts, so a second call copies and accepts exactly as the first."""
    settings = SamplingSettings(max_new_tokens=14)
    prompts = prompts_of_different_lengths(8, seed=8)
    engine = loaded(name, "tiny-mixtral-random", torch.float32, draft_experts=2, **options)
    engine.prepare(prompts, settings)
    prepared = engine.policy.state()
    first = engine.generate(prompts, settings)
    assert engine.policy.state() != prepared  # the call refreshed the sets: what the next one must undo
    second = engine.generate(prompts, settings)
    assert second.tokens == first.tokens
    keys = ("h2d_bytes", "h2d_copies", "accepted_tokens", "drafted_tokens", "spec_steps")
    assert {k: second.stats.get(k) for k in keys} == {k: first.stats.get(k) for k in keys}
    assert first.stats["h2d_bytes"] > 0


def test_hot_temporal_follows_the_experts_that_serve_the_most_pairs():
    """A verification of a large batch routes to every expert; the draft set follows where most of its pairs went
    (each expert's share), not merely which experts were used, which would tie every score."""
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, adaptive=False, prefetch="none",
                    draft_experts=2)
    policy, E = engine.policy, engine.runtime.store.num_experts
    assert policy.draft_sets[0] == [0, 1]
    pairs = [1] * E
    pairs[5], pairs[6] = 40, 30
    policy.mode = "verify"
    policy.note_routing(0, pairs)
    policy.after_layer(0, list(range(E)))
    assert policy.draft_sets[0] == [5, 6]
    assert policy.draft_sets[1] == [0, 1]  # another layer's set is its own


@pytest.mark.parametrize("name", ["specmoe", "nospec"])
def test_a_warm_start_is_where_hot_temporal_leaves_the_sets_after_the_calibration_prompts(name):
    """start=warm: prepare serves the calibration prompts once with plain steps, so the draft sets and scores are
    those a cold engine has after serving them, whatever the measured prompts are; without a calibration set, and
    with start=cold, the sets stay at experts 0 .. N-1."""
    settings = SamplingSettings(max_new_tokens=10)
    calibration = prompts_of_different_lengths(8, seed=31)
    options = dict(draft_experts=2, gamma=4, adaptive=False, prefetch="none")
    cold = loaded(name, "tiny-mixtral-random", torch.float32, **options)
    initial = cold.policy.state()
    assert initial[0] == [[0, 1]] * len(initial[0])
    cold.prepare(prompts_of_different_lengths(8, seed=7), settings, calibration=lambda: calibration)
    assert cold.policy.state() == initial and cold.setup_stats()["draft_start"] == "cold"
    cold.runtime.generate(calibration, settings)
    served = cold.policy.state()
    assert served[0] != initial[0]  # serving moved some set: the comparison below tests something

    for seed in (7, 8):  # two sets of measured prompts: neither changes where the sets start
        warm = loaded(name, "tiny-mixtral-random", torch.float32, start="warm", **options)
        warm.prepare(prompts_of_different_lengths(8, seed=seed), settings, calibration=lambda: calibration)
        assert warm.policy.state() == served
        assert warm.setup_stats()["draft_start"] == "warm: calibration"
        assert warm.setup_stats()["prepare_h2d_bytes"] > 0
    bare = loaded(name, "tiny-mixtral-random", torch.float32, start="warm", **options)
    bare.prepare(calibration, settings)  # a direct library call with no calibration set
    assert bare.policy.state() == initial and bare.setup_stats()["draft_start"] == "cold"
