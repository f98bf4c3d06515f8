"""The shared runtime and the baseline engines: same tokens as `resident`, exact byte counts, plug-ins, bad input."""
from __future__ import annotations

import random
import sys
import textwrap

import pytest
import torch

from engines import registry
from engines.accelerate_peer import AccelerateEngine
from engines.baselines import CachingEngine, LRUEngine, OffloadEngine
from engines.errors import BadInput, EngineUnavailable
from engines.hardware import HardwareProfile, parse_size
from engines.runtime import ModelRuntime, SamplingSettings
from harness.equivalence import check_engine, reference, teacher_forcing_inputs
from workloads.models import load_model

CPU = HardwareProfile.parse("cpu")
MODELS = ["tiny-mixtral-random", "tiny-qwen2moe-random"]
ENGINES = [("resident", {}), ("offload", {}), ("overlap", {}), ("caching", {}), ("caching", {"fraction": 0.5}),
           ("lru", {}), ("lru", {"capacity": "3"})]


def prompts_of_different_lengths(n=8, vocab=128, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(rng.randrange(1, 24))] for _ in range(n)]


def loaded(name, options=None, model="tiny-mixtral-random"):
    engine = registry.create(name, **(options or {}))
    engine.load(load_model(model), CPU)
    return engine


@pytest.fixture(scope="module", params=MODELS)
def reference_run(request):
    prompts = prompts_of_different_lengths()
    settings = SamplingSettings(max_new_tokens=12)
    ref = loaded("resident", model=request.param)
    tokens, logits = reference(ref, prompts, settings)
    return request.param, prompts, settings, tokens, logits


@pytest.mark.parametrize("name,options", ENGINES, ids=[f"{n}{o}" for n, o in ENGINES])
def test_every_engine_gives_the_reference_tokens(reference_run, name, options):
    model, prompts, settings, ref_tokens, ref_logits = reference_run
    engine = loaded(name, options, model)
    engine.prepare(prompts, settings, calibration=lambda: prompts_of_different_lengths(seed=1))
    tokens = engine.generate(prompts, settings).tokens
    eq = check_engine(engine, prompts, settings, ref_tokens, ref_logits, tokens=tokens)
    assert eq.equivalent, eq.first_divergence
    assert eq.teacher_forced_top1 == 1.0
    assert eq.max_abs_logit_diff == 0.0
    assert tokens == ref_tokens and all(len(t) == settings.max_new_tokens for t in tokens)


def test_accelerate_says_why_it_cannot_run_on_cpu():
    with pytest.raises(EngineUnavailable, match="needs a CUDA device"):
        loaded("accelerate")


def test_accelerate_teacher_forcing_scores_like_the_runtime(reference_run):
    """The accelerate peer, loaded as it ships (save_pretrained, then from_pretrained with a device_map through
    accelerate), scores teacher-forced continuations as the runtime does. Its load refuses a CPU cell, so the
    hardware here says CUDA while accelerate, finding no GPU, maps every weight to the CPU."""
    pytest.importorskip("accelerate")
    model, prompts, _, ref_tokens, ref_logits = reference_run

    class CudaOnCpu(HardwareProfile):
        is_cuda = property(lambda self: True)

    engine = AccelerateEngine()
    engine.load(load_model(model), CudaOnCpu(spec="cuda", device="cpu"))
    assert {p.device.type for p in engine.model.parameters()} == {"cpu"}
    logits = engine.teacher_forced_logits(prompts, teacher_forcing_inputs(prompts, ref_tokens))
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_engine_independent():
    prompts = prompts_of_different_lengths(4)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    a = loaded("resident").generate(prompts, settings).tokens
    b = loaded("lru", {"capacity": "2"}).generate(prompts, settings).tokens
    c = loaded("resident").generate(prompts, SamplingSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=8))
    assert a == b
    assert a != c.tokens


def test_generation_stops_at_eos():
    prompts = prompts_of_different_lengths(4)
    free = loaded("resident").generate(prompts, SamplingSettings(max_new_tokens=12)).tokens
    eos = free[0][3]
    stopped = loaded("offload").generate(prompts, SamplingSettings(max_new_tokens=12, eos_token_id=eos)).tokens
    for full, cut in zip(free, stopped):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]


# -- exact byte counts ----------------------------------------------------------------------------------------


def routing_and_stats(engine, prompts, settings):
    engine.runtime.routing_log = []
    gen = engine.generate(prompts, settings)
    log, engine.runtime.routing_log = engine.runtime.routing_log, None
    return log, gen.stats


def test_offload_moves_exactly_the_routed_experts_of_every_layer_and_step():
    prompts, settings = prompts_of_different_lengths(), SamplingSettings(max_new_tokens=8)
    engine = loaded("offload")
    log, stats = routing_and_stats(engine, prompts, settings)
    expected = sum(len(experts) for _, _, experts in log) * engine.runtime.store.expert_bytes
    assert stats["h2d_bytes"] == expected
    assert stats["h2d_copies"] == sum(len(experts) for _, _, experts in log)
    assert stats["hits"] == 0
    # one prefill plus one forward per further token, each through every MoE layer
    assert len(log) == settings.max_new_tokens * engine.runtime.store.num_layers


def test_lru_with_room_for_every_expert_moves_each_expert_once():
    prompts, settings = prompts_of_different_lengths(), SamplingSettings(max_new_tokens=8)
    engine = loaded("lru", {"capacity": "100%"})
    log, stats = routing_and_stats(engine, prompts, settings)
    used = {(layer, e) for _, layer, experts in log for e in experts}
    assert stats["h2d_copies"] == len(used)
    assert stats["h2d_bytes"] == len(used) * engine.runtime.store.expert_bytes
    again = engine.generate(prompts, settings).stats  # everything is resident now
    assert again["h2d_bytes"] == 0 and again["misses"] == 0


def test_caching_never_moves_a_pinned_expert():
    prompts, settings = prompts_of_different_lengths(), SamplingSettings(max_new_tokens=8)
    engine = loaded("caching", {"fraction": 0.25, "profile": "oracle"})
    engine.prepare(prompts, settings)
    store = engine.runtime.store
    assert len(engine.pinned) == 4  # 25% of 2 layers x 8 experts
    moved = []
    original = store.copy_to_device
    store.copy_to_device = lambda layer, e: moved.append((layer, e)) or original(layer, e)
    stats = engine.generate(prompts, settings).stats
    assert moved and not set(moved) & engine.pinned
    assert stats["hits"] > 0
    assert set(store.resident) == engine.pinned


def test_overlap_prefetches_every_expert_from_the_trace():
    prompts, settings = prompts_of_different_lengths(), SamplingSettings(max_new_tokens=8)
    engine, offload = loaded("overlap"), loaded("offload")
    engine.prepare(prompts, settings)
    stats = engine.generate(prompts, settings).stats
    assert stats["misses"] == 0
    assert stats["h2d_bytes"] == offload.generate(prompts, settings).stats["h2d_bytes"]


# -- loading --------------------------------------------------------------------------------------------------


def test_a_checkpoint_saved_with_save_pretrained_loads_through_the_hub_path(tmp_path):
    original = load_model("tiny-qwen2moe-random")
    original.model.save_pretrained(tmp_path / "ckpt")
    prompts, settings = prompts_of_different_lengths(3), SamplingSettings(max_new_tokens=6)
    from_disk = load_model(str(tmp_path / "ckpt"))
    assert from_disk.source == "checkpoint"
    a = ModelRuntime(original.model, "cpu").generate(prompts, settings).tokens
    b = ModelRuntime(from_disk.model, "cpu").generate(prompts, settings).tokens
    assert a == b


@pytest.mark.parametrize("model", ["tiny-mixtral-random", "tiny-qwen2moe-random"])
def test_a_synthetic_model_in_bf16_is_the_model_from_pretrained_would_load(model, tmp_path):
    """Built from a config, cast to bf16, saved and loaded back: the same logits, bit for bit, because the rotary
    frequencies stay float32 as transformers computes them (cast to bf16 they changed top-1 at 1 of 128 positions)."""
    built = load_model(model, dtype=torch.bfloat16).model
    assert {n: b.dtype for n, b in built.named_buffers()} == {"model.rotary_emb.inv_freq": torch.float32,
                                                              "model.rotary_emb.original_inv_freq": torch.float32}
    assert all(p.dtype == torch.bfloat16 for p in built.parameters())
    built.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16).model
    ids = torch.tensor([prompts_of_different_lengths(1)[0]])
    with torch.inference_mode():
        assert torch.equal(built(input_ids=ids).logits, loaded(input_ids=ids).logits)


# -- plug-ins ------------------------------------------------------------------------------------------------


def test_unknown_engine_gets_did_you_mean():
    with pytest.raises(BadInput, match=r"unknown engine 'ofload' \(did you mean 'offload'\?\); available engines"):
        registry.create("ofload")


def test_a_third_party_engine_registers_through_its_entry_point(tmp_path, monkeypatch):
    pkg = tmp_path / "thirdparty_engine.py"
    pkg.write_text(textwrap.dedent("""
        from engines.baselines import OffloadEngine
        class Mine(OffloadEngine):
            name = "mine"
            summary = "a third-party engine"
    """))
    dist = tmp_path / "thirdparty_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[specmoe_bench.engines]\nmine = thirdparty_engine:Mine\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.available()["mine"] == "thirdparty_engine:Mine"
    engine = registry.create("mine")
    engine.load(load_model("tiny-mixtral-random"), CPU)
    assert engine.generate([[1, 2, 3]], SamplingSettings(max_new_tokens=3)).stats["h2d_bytes"] > 0
    sys.modules.pop("thirdparty_engine", None)


# -- bad input -----------------------------------------------------------------------------------------------


def test_lru_capacity_smaller_than_one_expert():
    engine = registry.create("lru", capacity="1KiB")
    with pytest.raises(BadInput, match="lru capacity '1KiB' holds no expert"):
        engine.load(load_model("tiny-mixtral-random"), CPU)


def test_unknown_engine_option():
    with pytest.raises(BadInput, match="engine 'lru' has no option 'size'; its options: capacity"):
        registry.create("lru", size=3)


def test_empty_prompt_in_batch():
    with pytest.raises(BadInput, match="prompt 1 of the batch is empty"):
        loaded("offload").generate([[1, 2], []], SamplingSettings(max_new_tokens=2))


def test_model_without_moe_layers():
    from transformers import LlamaConfig, LlamaForCausalLM
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(BadInput, match="has no MoE layers"):
        ModelRuntime(dense, "cpu")


def test_unknown_model_and_missing_directory(tmp_path):
    with pytest.raises(BadInput, match="unknown model 'tiny-mixtral'"):
        load_model("tiny-mixtral")
    with pytest.raises(BadInput, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec,message", [
    ("cuda:7", "needs CUDA|does not exist"),
    ("tpu", "unknown hardware 'tpu'"),
    ("cuda:budget=lots", "bad size 'lots'"),
])
def test_bad_hardware(spec, message):
    if torch.cuda.is_available() and spec == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(BadInput, match=message):
        HardwareProfile.parse(spec)


def test_sizes():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert HardwareProfile.parse("cuda:budget=8GiB", check_available=False).memory_budget_bytes == 8 * 2**30


def test_budget_scales_with_the_loaded_layers_and_leaves_room_for_non_expert_weights():
    hw = HardwareProfile.parse("cuda:budget=24GiB", check_available=False)
    assert hw.expert_budget(2 * 2**30) == 22 * 2**30
    # 4 of 32 layers loaded; 1 GiB of non-expert weights of which 0.5 GiB sit in the 4 layers: the whole model
    # has 0.5 + 0.5 * 8 = 4.5 GiB of them, leaving 19.5 GiB of experts, of which the 4 layers get 1/8
    assert hw.expert_budget(2**30, layers_loaded=4, layers_total=32, layer_non_expert_bytes=2**29) == \
        int(19.5 * 2**30 / 8)
    with pytest.raises(BadInput, match=r"budget \(24.00 GiB\) is smaller than the non-expert weights of the whole "
                                       r"model \(32.00 GiB\)"):
        hw.expert_budget(2**30, layers_loaded=1, layers_total=32, layer_non_expert_bytes=2**30)


def test_budget_as_a_share_of_the_experts():
    hw = HardwareProfile.parse("cuda:budget=25%", check_available=False)
    assert hw.has_budget and hw.memory_budget_bytes is None
    assert hw.expert_budget(10**9, layers_loaded=2, layers_total=32, total_expert_bytes=8 * 10**9) == 2 * 10**9
    for bad in ("cuda:budget=0%", "cuda:budget=150%", "cuda:budget=x%"):
        with pytest.raises(BadInput, match=r"bad expert share .*percentage in \(0, 100\]"):
            HardwareProfile.parse(bad, check_available=False)
    assert HardwareProfile.parse("cpu").expert_budget(10**9) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_experts_computed_stage_by_stage_equal_one_pass_to_the_bit(dtype):
    """A layer whose copies are still landing is computed a group of slots at a time (engines/experts.Stages): the
    same output as computing every pair at once, bit for bit, with padding rows and a slot in no stage unread."""
    import types

    from engines import experts
    g = torch.Generator().manual_seed(0)
    S, H, I, N, K = 6, 32, 24, 7, 2
    module = types.SimpleNamespace(has_gate=True, is_transposed=False,
                                   _apply_gate=lambda h: torch.nn.functional.silu(h[:, :I]) * h[:, I:])
    pool = {"gate_up_proj": torch.randn(S, 2 * I, H, generator=g, dtype=dtype),
            "down_proj": torch.randn(S, H, I, generator=g, dtype=dtype)}
    table = torch.tensor([3, 0, 5, 1, 4, 2])
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    index = torch.stack([torch.randperm(6, generator=g)[:K] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    active = torch.tensor([True, True, False, True, True, True, True])
    one_pass = experts.run_experts(module, pool, table, hidden, index, weights, active, experts.ExpertCounters("cpu"))
    stage_of = torch.tensor([2, 0, 1, 0, 3, 1, -1])  # four stages; the sentinel slot S in none
    stage = stage_of[table[index]][active]  # the runtime counts each stage's routed pairs on the host
    sizes = [int((stage == j).sum()) for j in range(4)]
    staged = experts.run_experts(module, pool, table, hidden, index, weights, active, experts.ExpertCounters("cpu"),
                                 stages=experts.Stages(stage_of, [None] * 4, sizes))
    assert torch.equal(staged, one_pass)
    assert (staged[2] == 0).all() and (staged.abs().sum(-1)[active] > 0).all()


def test_landing_gives_each_read_slot_its_last_copy_in_order_and_keeps_later_copies_pending():
    """ExpertStore.landing (the runtime's stages are built from it): the copies a pass must wait for are each read
    slot's last one, in the order they land; a copy queued after the last of them stays pending."""
    from engines.store import ExpertStore
    store = ExpertStore([{"w": torch.zeros(4, 2, 2)}], "cpu")
    store.allocate(4)
    store._landing[0] = [(1, "a"), (2, "b"), (0, "x"), (1, "c"), (3, "d")]  # events stand in as names
    assert store.landing(0, {1, 2}) == [(2, "b"), (1, "c")]
    assert store._landing[0] == [(3, "d")]
    assert store.landing(0, {0}) == [] and store._landing[0] == [(3, "d")]
