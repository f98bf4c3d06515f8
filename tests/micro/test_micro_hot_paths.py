"""Micro-benchmarks of the hot paths (`make bench-micro`): the expert store's copy, the experts function on a small
batch, SpecMoE's affinity lookup while drafting and its acceptance step. The plain test run calls each once,
untimed (`--benchmark-disable` in pyproject's addopts), so its result is checked and timings never decide pass or
fail."""
import pytest
import torch

from engines.runtime import ModelRuntime
from workloads.models import load_model

specmoe = pytest.importorskip("engines.specmoe", reason="engines/specmoe.py not present: SpecMoE benchmarks skipped")


@pytest.fixture(scope="module")
def runtime():
    return ModelRuntime(load_model("tiny-mixtral-random").model, "cpu")


def test_expert_store_copy_to_device(benchmark, runtime):
    store = runtime.store
    store.reset_counters()

    def copy_and_give_back():  # a copy into a pool slot, and the slot back, as an on-demand layer does
        slot = store.copy_to_device(1, 5)
        store.drop(1, 5)
        return slot

    slot = benchmark(copy_and_give_back)
    calls = store.counters.h2d_copies
    assert calls >= 1 and store.counters.h2d_bytes == calls * store.expert_bytes
    for name, t in store.pool.items():
        assert torch.equal(t[slot], store.host[1][name][5]) and t.data_ptr() != store.host[1][name].data_ptr()


def test_experts_function_small_batch(benchmark, runtime):
    module = runtime.experts_modules[0]
    g = torch.Generator().manual_seed(0)
    N, H, K = 8, runtime.model.config.hidden_size, runtime.top_k  # 8 tokens, top-2 of 8 experts
    hidden = torch.randn(N, H, generator=g)
    index = torch.stack([torch.randperm(runtime.store.num_experts, generator=g)[:K] for _ in range(N)])
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    with torch.inference_mode():
        out = benchmark(runtime._run_experts, module, 0, hidden, index, weights)
    assert out.shape == (N, H) and torch.isfinite(out).all()
    assert runtime.store.counters.h2d_copies > 0  # on-demand policy: every expert needed was copied


def test_draft_layer_through_the_substitution_table(benchmark, runtime):
    policy = specmoe.SpecMoEPolicy(n=2, policy="hot-global", decay=0.8, seed=0)
    runtime.set_policy(policy)
    policy.draft_tables()  # as the decoder does before its draft forwards: the tables are built lazily
    policy.mode = "draft"
    store, module = runtime.store, runtime.experts_modules[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, runtime.model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(store.num_experts, generator=g)[:2] for _ in range(8)])
    weights = torch.softmax(torch.randn(8, 2, generator=g), -1)
    before = store.counters.h2d_bytes
    with torch.inference_mode():
        out = benchmark(runtime._run_experts, module, 0, hidden, index, weights)
    assert store.counters.h2d_bytes == before  # drafting copies nothing
    draft_slots = {store.resident[(0, e)] for e in policy.draft_sets[0]}
    assert set(policy.sync_free_table(0).tolist()) <= draft_slots  # every expert id lands on a draft expert
    assert out.shape == hidden.shape and torch.isfinite(out).all()


def test_affinity_table_build(benchmark, runtime):
    d = benchmark(specmoe.affinity_distances, runtime.store, 0)
    E = runtime.store.num_experts
    assert d.shape == (E, E) and torch.allclose(d.diagonal(), torch.zeros(E, dtype=d.dtype), atol=1e-3)


def test_acceptance_step_greedy(benchmark):
    drafts = [5, 9, 2, 7, 1, 3, 8, 4, 6, 0]  # gamma = 10
    target = [5, 9, 2, 7, 11, 3, 8, 4, 6, 0, 12]
    assert benchmark(specmoe.greedy_accept, drafts, target) == (4, 11)


def test_acceptance_step_sampling(benchmark):
    gamma, V = 10, 128
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(gamma + 1, V, generator=g, dtype=torch.float64), -1)
    q = [row.clone() for row in p[:gamma]]  # draft == target: every draft token is accepted
    drafts = [int(torch.argmax(row)) for row in q]
    accepted, bonus = benchmark(specmoe.sample_accept, drafts, q, p, torch.Generator().manual_seed(1))
    assert accepted == gamma and 0 <= bonus < V
