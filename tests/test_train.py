"""Training the project's own MoE checkpoints: the tiny model learns (loss, routing, locality), training is
deterministic, the small recipe runs scaled down on the CPU, and the per-machine cache trains at most once."""
import json

import pytest
import torch

from engines import registry
from engines.errors import BadInput
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings
from workloads.corpus import Corpus, Doc
from workloads.models import load_model
from workloads.prompts import load_workload
from workloads.train import TRAIN_PRESETS, get_preset, train, trained_checkpoint

CPU = HardwareProfile.parse("cpu")


def toy_corpus(n=24) -> Corpus:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    docs = [Doc(f"doc{i}.txt", " ".join(words[(i * 7 + j) % len(words)] for j in range(300))) for i in range(n)]
    return Corpus("toy", docs)


SMALL_ON_CPU = dict(vocab_size=300, hidden_size=32, intermediate_size=48, shared_intermediate_size=48, layers=2,
                    heads=2, kv_heads=2, seq_len=32, batch_size=4, steps=3, eval_windows=2, tokenizer_chars=50_000)


@pytest.mark.slow
def test_tiny_learns_below_the_unigram_baseline_with_non_uniform_routing(tiny_path):
    m = json.loads((tiny_path / "training.json").read_text())
    print(f"\ntiny: held-out loss {m['heldout_loss']} vs unigram {m['unigram_loss']}; "
          f"usage entropy {m['expert_usage_entropy']} router entropy {m['router_entropy_per_token']} "
          f"max {m['entropy_max']}; {m['train_tokens_per_s']} tokens/s, wall {m.get('wall_seconds')} s")
    assert m["heldout_loss"] < m["unigram_loss"] - 1.0  # clearly better than token frequencies
    assert m["heldout_perplexity"] == pytest.approx(2.718281828 ** m["heldout_loss"], rel=1e-3)
    assert len(m["expert_usage_entropy"]) == TRAIN_PRESETS["tiny"].layers
    # Routing is not uniform: expert usage is skewed, and per token the router is confident. (Random weights give
    # a router entropy of ~0.99 of the maximum per token: their logits are near zero.)
    assert all(0.5 * m["entropy_max"] < e < 0.98 * m["entropy_max"] for e in m["expert_usage_entropy"])
    router = m["router_entropy_per_token"]
    assert max(router) < 0.95 * m["entropy_max"] and sum(router) / len(router) < 0.85 * m["entropy_max"]
    assert m["train_docs"] > 10 * m["heldout_docs"] > 0


@pytest.mark.slow
def test_tiny_loads_as_a_trained_model_with_its_tokenizer(tiny_path):
    loaded = load_model("tiny")
    assert loaded.source == "trained" and loaded.tokenizer is not None
    assert loaded.notes["heldout_loss"] < loaded.notes["unigram_loss"]
    text = "def __init__(self, name):\n    self.name = name\n"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    assert loaded.tokenizer.decode(ids) == text  # byte-level BPE round-trips
    engine = registry.create("offload")
    engine.load(loaded, CPU)
    out = engine.generate([ids], SamplingSettings(max_new_tokens=8)).tokens[0]
    assert len(out) == 8


def lru_hit_rate(model_name: str, prompts) -> float:
    engine = registry.create("lru", capacity="50%")
    engine.load(load_model(model_name), CPU)
    stats = engine.generate(prompts, SamplingSettings(max_new_tokens=32)).stats
    engine.close()
    return stats["hits"] / (stats["hits"] + stats["misses"])


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["code-heldout", "docs-heldout"])
def test_lru_hit_rate_is_higher_on_tiny_than_on_random_weights_of_the_same_shape(tiny_path, workload):
    # At batch 4. At batch 1-2 on code the random model can score higher: its deep layers route almost every
    # token to the same few experts and greedy decoding of random weights repeats itself, which is no locality.
    tokenizer = load_model("tiny").tokenizer
    prompts = load_workload(workload, tokenizer, num_prompts=4, prompt_len=32)
    trained, random_ = lru_hit_rate("tiny", prompts), lru_hit_rate("tiny-random", prompts)
    print(f"\nlru capacity 50%, batch 4, {workload}: hit rate tiny {trained:.3f}, tiny-random {random_:.3f}")
    assert trained > random_ + 0.1


def test_training_is_deterministic_and_the_checkpoint_loads(tmp_path):
    a = train("tiny", toy_corpus(), tmp_path / "a", seed=3, progress=False, **SMALL_ON_CPU)
    b = train("tiny", toy_corpus(), tmp_path / "b", seed=3, progress=False, **SMALL_ON_CPU)
    assert a.metrics["loss_curve"] == b.metrics["loss_curve"]
    assert a.metrics["heldout_loss"] == b.metrics["heldout_loss"]
    assert a.metrics["weights_sha256"] == b.metrics["weights_sha256"]  # on CPU the same weights, bit for bit
    other = train("tiny", toy_corpus(), tmp_path / "c", seed=4, progress=False, **SMALL_ON_CPU)
    assert other.metrics["weights_sha256"] != a.metrics["weights_sha256"]
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    for key in ("heldout_loss", "heldout_perplexity", "unigram_loss", "train_tokens_per_s", "wall_seconds",
                "expert_usage_entropy", "entropy_max", "corpus_fingerprint"):
        assert key in saved
    loaded = load_model(str(tmp_path / "a"))
    assert loaded.source == "checkpoint" and loaded.tokenizer is not None
    assert saved["weights_sha256"] == a.metrics["weights_sha256"]
    assert loaded.model.config.num_local_experts == 8 and loaded.model.config.output_router_logits is False


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_small_recipe_runs_scaled_down_on_cpu(tmp_path, arch):
    result = train("small", toy_corpus(), tmp_path / arch, device="cpu", progress=False, arch=arch, **SMALL_ON_CPU)
    assert result.metrics["preset"]["save_dtype"] == "bfloat16" and result.metrics["train_tokens_seen"] == 3 * 4 * 32
    loaded = load_model(str(tmp_path / arch))
    assert next(loaded.model.parameters()).dtype == torch.float32  # load_model's dtype, whatever was saved
    if arch == "qwen2_moe":
        assert loaded.model.config.shared_expert_intermediate_size == 48


def test_small_preset_shape_has_experts_of_at_least_100_mb_in_bf16():
    p = TRAIN_PRESETS["small"]
    assert 3 * p.hidden_size * p.intermediate_size * 2 >= 100 * 2**20
    assert p.device == "cuda" and p.save_dtype == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_small_on_a_cpu_machine_is_bad_input_unless_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMOE_BENCH_CACHE", str(tmp_path))
    with pytest.raises(BadInput, match="needs a CUDA GPU"):
        trained_checkpoint("small")
    with pytest.raises(BadInput, match="needs a CUDA GPU"):
        load_model("small")


def test_the_cache_returns_a_finished_checkpoint_without_training(tmp_path, monkeypatch):
    import workloads.train as tr
    monkeypatch.setenv("SPECMOE_BENCH_CACHE", str(tmp_path))
    final = tr.cached_checkpoint("tiny")
    final.mkdir(parents=True)
    (final / "training.json").write_text("{}")
    monkeypatch.setattr(tr, "train", lambda *a, **k: pytest.fail("trained again"))
    assert trained_checkpoint("tiny") == final


def test_bad_training_settings_are_bad_input():
    with pytest.raises(BadInput, match="unknown training preset 'big'"):
        get_preset("big")
    with pytest.raises(BadInput, match="has no setting 'hiden_size'"):
        get_preset("tiny", hiden_size=3)
    with pytest.raises(BadInput, match="architecture 'llama'"):
        get_preset("tiny", arch="llama")
    with pytest.raises(BadInput, match="holds no text"):
        train("tiny", "/dev/null", progress=False)


def test_two_concurrent_requests_train_once_and_never_see_half_a_checkpoint(tmp_path, monkeypatch):
    import threading
    import time

    import workloads.train as tr
    monkeypatch.setenv("SPECMOE_BENCH_CACHE", str(tmp_path))
    calls = []

    def fake_train(preset, corpus, out, **kw):
        calls.append(out)
        out.mkdir(parents=True)
        time.sleep(0.5)  # the other request arrives while this one trains
        (out / "training.json").write_text("{}")

    monkeypatch.setattr(tr, "train", fake_train)
    results = []
    threads = [threading.Thread(target=lambda: results.append(trained_checkpoint("tiny", progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and calls[0].name.startswith(".")  # trained into a temporary directory
    assert results[0] == results[1] == tr.cached_checkpoint("tiny")
    assert (results[0] / "training.json").is_file()
    assert [p.name for p in results[0].parent.iterdir() if p.is_dir()] == [results[0].name]  # no temp left
