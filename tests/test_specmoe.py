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
from engines.specmoe import SpeculativeDecoder, greedy_accept, sample_accept
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
    engine.prepare(prompts, settings)
    assert engine.generate(prompts, settings).tokens == reference_tokens(model, torch.float32, 8, settings)


def test_adaptive_mode_keeps_what_it_learnt_between_calls():
    """After speculation measured slower than plain steps, the next call of the same batch size decodes plainly,
    probing speculation only every PROBE_EVERY steps, and still gives resident's tokens."""
    settings = SamplingSettings(max_new_tokens=14)
    prompts = prompts_of_different_lengths(8, seed=8)
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, adaptive=True)
    engine.generate(prompts, settings)
    state = engine.adaptive_state[8]
    assert state["spec"] is not None and state["plain"] is not None and state["step"] > 0
    state.update(spec=1e-6, plain=1e9, step=1)  # as if speculation had been hopeless so far
    gen = engine.generate(prompts, settings)
    assert gen.tokens == reference_tokens("tiny-mixtral-random", torch.float32, 8, settings)
    assert gen.stats["spec_steps"] <= 1 + gen.stats["plain_steps"] // SpeculativeDecoder.PROBE_EVERY
    assert gen.stats["plain_steps"] >= 10


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
    engine = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=4, draft_experts=2, adaptive=False)
    store, policy = engine.runtime.store, engine.policy
    copies = []
    original = store.copy_to_device

    def spy(layer, expert, stream=None):
        copies.append((policy.mode, engine.runtime.forward_index, layer, expert))
        return original(layer, expert, stream)

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


def test_sampled_specmoe_matches_the_resident_token_distribution():
    """Two-sample chi-square on the 2nd and 3rd generated tokens of 600 copies of one prompt (small vocabulary,
    temperature 1.5 so the distribution is broad). Tokens seen fewer than 10 times are pooled."""
    settings_for = lambda seed: SamplingSettings(max_new_tokens=3, temperature=1.5, top_p=0.95, seed=seed)
    prompt = [[5, 17, 42, 9]] * 300
    spec = loaded("specmoe", "tiny-mixtral-random", torch.float32, gamma=2, draft_experts=2, adaptive=False)
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
    (dict(draft_policy="hottest"), "unknown draft policy 'hottest'; allowed: hot-temporal, hot-global, random"),
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
