"""The paper-condition recipes (nllb-like, mixtral-like) and the deterministic trainer: the layer pattern and
expert count they ask for is what gets built and saved, the deterministic kernels compute what transformers'
computes, two trainings give the same bits, routing skew is reported by its stated definition, and bad recipes
are one clear line."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from engines import registry
from engines.errors import BadInput
from engines.hardware import HardwareProfile
from engines.runtime import SamplingSettings, find_experts_modules
from workloads import deterministic as det
from workloads.corpus import Corpus, Doc, code_corpus, is_heldout, stdlib_corpus
from workloads.models import load_model
from workloads.train import (TRAIN_PRESETS, get_preset, moe_layer_indices, parse_settings, routing_of,
                             routing_stats, train)

# A learnable toy text: 12 words in a fixed cycle with a per-document offset.
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
TOY = Corpus("toy", [Doc(f"doc{i}.txt", " ".join(WORDS[(i * 7 + j) % 12] for j in range(300))) for i in range(24)])

# The recipes at toy sizes: their layer pattern, expert count, top-k, family and trainer stay as they are.
SCALED = dict(vocab_size=300, hidden_size=32, intermediate_size=48, dense_intermediate_size=64, heads=2, kv_heads=2,
              seq_len=32, batch_size=4, steps=3, eval_windows=2, tokenizer_chars=50_000)
SCALED_LAYERS = {"nllb-like": 8, "mixtral-like": 2}


def scaled(name, tmp_path, **kw):
    settings = dict(SCALED, layers=SCALED_LAYERS[name], **kw)
    return train(name, TOY, tmp_path / name, device="cpu", progress=False, **settings)


def test_recipes_ask_for_the_paper_conditions():
    nllb, mixtral = TRAIN_PRESETS["nllb-like"], TRAIN_PRESETS["mixtral-like"]
    assert nllb.experts >= 64 and nllb.top_k == 2 and nllb.moe_every == 4 and nllb.expert_bytes() >= 20e6
    assert nllb.moe_layers == [3, 7, 11] and nllb.aux_coef <= 0.01
    assert mixtral.layers >= 8 and mixtral.moe_layers == list(range(mixtral.layers))
    assert mixtral.experts == 8 and mixtral.top_k == 2 and mixtral.hidden_size >= 2048
    for p in (nllb, mixtral):
        assert p.trainer == "deterministic" and p.device == "cuda" and p.save_dtype == "bfloat16"
        assert p.corpus == "code"


@pytest.mark.parametrize("name", ["nllb-like", "mixtral-like", "small"])
def test_full_size_recipe_builds_the_layer_pattern_it_asks_for(name):
    """The real shapes, on the meta device (no memory): transformers puts MoE exactly in the recipe's layers, and
    the deterministic trainer's experts forward covers them."""
    from transformers import AutoModelForCausalLM
    p = TRAIN_PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(p.model_config())
    assert moe_layer_indices(model) == p.moe_layers
    det.check_supported(model)
    experts = find_experts_modules(model)
    assert all(m.num_experts == p.experts for _, m in experts)
    gate_up = experts[0][1].gate_up_proj
    assert 3 * gate_up.shape[1] // 2 * gate_up.shape[2] * 2 == p.expert_bytes()  # bf16 bytes of one expert
    params = sum(q.numel() for q in model.parameters())
    print(f"\n{name}: {params / 1e9:.2f}B parameters, expert {p.expert_bytes() / 1e6:.1f} MB, MoE layers {p.moe_layers}")


@pytest.mark.parametrize("name", ["nllb-like", "mixtral-like"])
def test_scaled_down_recipe_trains_on_cpu_and_serves(tmp_path, name):
    result = scaled(name, tmp_path)
    m = result.metrics
    p = TRAIN_PRESETS[name]
    layers = SCALED_LAYERS[name]
    expected = [i for i in range(layers) if (i + 1) % p.moe_every == 0]
    assert m["moe_layers"] == expected and len(m["expert_usage_share"]) == len(expected)
    assert all(len(row) == p.experts for row in m["expert_usage_share"])
    assert m["determinism"]["torch_deterministic_algorithms"] is True
    assert m["determinism"]["cublas_workspace_config"] == ":4096:8"
    saved = json.loads((result.path / "training.json").read_text())
    assert saved["routing_skew"] == m["routing_skew"] and saved["moe_layers"] == expected
    loaded = load_model(str(result.path))
    assert moe_layer_indices(loaded.model) == expected  # the saved config rebuilds the same pattern
    experts = find_experts_modules(loaded.model)
    assert [m_.num_experts for _, m_ in experts] == [p.experts] * len(expected)
    assert loaded.model.config.num_experts_per_tok == p.top_k
    assert loaded.model.config._experts_implementation != det.EXPERTS_IMPLEMENTATION  # not saved with it
    engine = registry.create("offload")
    engine.load(loaded, HardwareProfile.parse("cpu"))
    ids = loaded.tokenizer.encode("alpha beta gamma", add_special_tokens=False)
    assert len(engine.generate([ids], SamplingSettings(max_new_tokens=4)).tokens[0]) == 4
    engine.close()
    assert not torch.are_deterministic_algorithms_enabled()  # the trainer's mode does not leak out


def test_deterministic_trainer_gives_the_same_bits_twice_and_learns(tmp_path):
    a = scaled("nllb-like", tmp_path / "a", steps=40, warmup=5, aux_coef=0.01, lr=1e-2)
    b = scaled("nllb-like", tmp_path / "b", steps=40, warmup=5, aux_coef=0.01, lr=1e-2)
    assert a.metrics["weights_sha256"] == b.metrics["weights_sha256"]
    assert a.metrics["loss_curve"] == b.metrics["loss_curve"] and a.metrics["routing_skew"] == b.metrics["routing_skew"]
    assert a.metrics["heldout_loss"] < a.metrics["unigram_loss"] - 1.0  # the toy text is learnable
    other = scaled("nllb-like", tmp_path / "c", steps=40, warmup=5, aux_coef=0.01, lr=9e-3)
    assert other.metrics["weights_sha256"] != a.metrics["weights_sha256"]


def _experts_of(name):
    from transformers import AutoModelForCausalLM
    p = get_preset(name, **dict(SCALED, layers=SCALED_LAYERS[name], experts=8))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(p.model_config(), dtype=torch.float32)
    return find_experts_modules(model)[0][1]


@pytest.mark.parametrize("name", ["nllb-like", "mixtral-like"])
def test_deterministic_experts_compute_what_transformers_eager_loop_computes(name):
    ex = _experts_of(name)
    torch.manual_seed(1)
    h = torch.randn(37, ex.hidden_dim, requires_grad=True)  # N = 37 tokens
    idx = torch.stack([torch.randperm(ex.num_experts)[:2] for _ in range(37)])  # [N, 2]; some experts get none
    idx[:, 0] = idx[:, 0].clamp(max=5)  # expert 6, 7 only as second picks: uneven groups
    w = torch.rand(37, 2, requires_grad=True)
    probe = torch.linspace(-1, 1, 37 * ex.hidden_dim).view(37, -1)
    results = {}
    for impl in ("eager", det.EXPERTS_IMPLEMENTATION):
        ex.config._experts_implementation = impl
        for t in (h, w, ex.gate_up_proj, ex.down_proj):
            t.grad = None
        out = ex(h, idx, w)
        (out * probe).sum().backward()
        results[impl] = [out.detach()] + [t.grad.clone() for t in (h, w, ex.gate_up_proj, ex.down_proj)]
    for ours, theirs in zip(results[det.EXPERTS_IMPLEMENTATION], results["eager"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lm_and_balance_losses_match_transformers():
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    p = get_preset("mixtral-like", **dict(SCALED, layers=2))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(p.model_config(), dtype=torch.float32)
    x = torch.randint(0, 300, (3, 16))
    out = model(input_ids=x, labels=x, output_router_logits=True)
    lm = out.loss - p.aux_coef * out.aux_loss  # transformers' LM loss alone
    torch.testing.assert_close(det.lm_loss(out.logits, x), lm, rtol=1e-5, atol=1e-6)
    per_layer = [load_balancing_loss_func((r,), p.experts, p.top_k) for r in out.router_logits]
    torch.testing.assert_close(det.balance_loss(out.router_logits, p.top_k), torch.stack(per_layer).mean())
    pooled = load_balancing_loss_func(tuple(out.router_logits), p.experts, p.top_k)  # what the transformers trainer adds
    torch.testing.assert_close(det.balance_loss(out.router_logits, p.top_k, pooled=True), pooled)
    torch.testing.assert_close(out.aux_loss, pooled)
    assert not torch.allclose(pooled, torch.stack(per_layer).mean())  # the two are different losses


def test_small_trains_deterministically_with_the_pooled_balance_it_had(tmp_path):
    p = TRAIN_PRESETS["small"]
    assert p.trainer == "deterministic" and p.balance == "pooled" and p.aux_coef == 0.02
    toy = dict(SCALED, dense_intermediate_size=0, shared_intermediate_size=48, layers=2, steps=20, warmup=3, lr=1e-2)
    a = train("small", TOY, tmp_path / "a", device="cpu", progress=False, **toy)
    b = train("small", TOY, tmp_path / "b", device="cpu", progress=False, **toy)
    assert a.metrics["weights_sha256"] == b.metrics["weights_sha256"]
    assert "pooled balance loss" in a.metrics["determinism"]["kernels"]
    per_layer = train("small", TOY, tmp_path / "c", device="cpu", progress=False, **dict(toy, balance="per-layer"))
    assert per_layer.metrics["weights_sha256"] != a.metrics["weights_sha256"]  # the balance option is used


def test_routing_skew_follows_its_definition():
    uniform = routing_stats([[1 / 8] * 8])
    assert uniform["routing_skew"] == 0.25 and uniform["routing_gini"] == [0.0]
    assert uniform["routing_entropy_skew"] == [0.0]
    one_quarter = routing_stats([[0.5, 0.5] + [0.0] * 6])
    assert one_quarter["routing_skew"] == 1.0 and one_quarter["routing_entropy_skew"] == [round(1 - 1 / 3, 4)]
    mixed = routing_stats([[0.1, 0.4, 0.2, 0.3], [0.25] * 4])  # E = 4: the hottest ceil(4/4) = 1 expert
    assert mixed["routing_skew_per_layer"] == [0.4, 0.25] and mixed["routing_skew"] == 0.325
    assert mixed["hottest_experts"] == [[[1, 0.4]], [[0, 0.25]]]
    sixty_four = routing_stats([[1 / 16] * 16 + [0.0] * 48])  # all picks on 16 of 64 experts
    assert sixty_four["routing_skew"] == 1.0 and len(sixty_four["hottest_experts"][0]) == 16
    assert "hottest ceil(E/4)" in uniform["routing_skew_definition"]
    # A training.json from before the statistics existed gets them from its usage shares.
    assert routing_of({"expert_usage_share": [[0.1, 0.4, 0.2, 0.3]]})["routing_skew"] == 0.4


def test_code_corpus_adds_training_text_and_keeps_the_stdlib_held_out():
    code, std = code_corpus(), stdlib_corpus()
    train_docs, held = code.split()
    assert held == std.split()[1]  # the same held-out documents as every other model
    assert code.chars > 4 * std.chars and len(train_docs) > len(std.split()[0]) + 1000
    assert any(d.name.startswith("site-packages/transformers/") for d in code.train_only)
    assert any(is_heldout(d.name) for d in code.train_only)  # names that would hash out still train
    assert not any("/tests/" in d.name or d.name.split("/")[-1].startswith("modular_") for d in code.train_only)
    assert Corpus("s", std.docs).fingerprint == std.fingerprint  # train_only empty: the old fingerprint


def test_settings_parse_by_field_type():
    assert parse_settings(["steps=5", "lr=1e-3", "arch=qwen3_moe", "moe-every=2", "tokenizer_chars=4_000"]) == \
        dict(steps=5, lr=1e-3, arch="qwen3_moe", moe_every=2, tokenizer_chars=4000)
    with pytest.raises(BadInput, match="--set 'steps=five': steps takes a whole number"):
        parse_settings(["steps=five"])
    with pytest.raises(BadInput, match="--set 'hiden=3': write KEY=VALUE"):
        parse_settings(["hiden=3"])


@pytest.mark.parametrize("args, needle", [
    (["--preset", "nllb-like", "--set", "moe_every=5"], "moe_every=5: must divide layers=12"),
    (["--preset", "nllb-like", "--set", "top_k=65"], "top_k=65: must be between 1 and experts=64"),
    (["--preset", "mixtral-like", "--set", "moe_every=2"], "moe_every=2: the mixtral family has MoE in every layer"),
    (["--preset", "tiny", "--set", "trainer=fast"], "trainer 'fast': allowed transformers, deterministic"),
    (["--preset", "tiny", "--set", "balance=global"], "balance 'global': allowed None, per-layer, pooled"),
    (["--preset", "tiny", "--set", "balance=per-layer"], "balance 'per-layer' needs trainer 'deterministic'"),
    (["--preset", "tiny", "--set", "steps=x"], "--set 'steps=x': steps takes a whole number"),
])
def test_bad_recipe_is_one_line_naming_the_value_exit_2(args, needle):
    from workloads.cli import model_group
    result = CliRunner().invoke(model_group, ["train", *args])
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], result.output


def test_list_models_shows_the_new_checkpoints():
    from workloads.cli import list_models_rows
    rows = {r["name"]: r for r in list_models_rows()}
    assert rows["nllb-like"]["source"] == rows["mixtral-like"]["source"] == "trained"
    assert "12 layers, MoE in 3 x 64 experts top-2, expert 24.00 MiB (bfloat16)" in rows["nllb-like"]["sizes"]
    assert "8 layers x 8 experts top-2, expert 48.00 MiB (bfloat16)" in rows["mixtral-like"]["sizes"]
    assert "model train --preset nllb-like" in rows["nllb-like"]["sizes"] or "cached" in rows["nllb-like"]["sizes"]


def test_model_info_shows_routing_of_a_trained_checkpoint(tmp_path):
    from workloads.cli import model_group
    result = scaled("nllb-like", tmp_path)
    out = CliRunner().invoke(model_group, ["info", str(result.path), "--dtype", "float32"])
    assert out.exit_code == 0, out.output
    rows = dict(line.split(": ", 1) for line in out.output.splitlines() if ": " in line)
    assert rows["moe_layers"] == "2" and rows["experts_per_layer"] == "64"
    assert float(rows["routing_skew"]) == result.metrics["routing_skew"]
    assert rows["hottest_experts_per_layer"].count("|") == 1  # two MoE layers
    assert math.isclose(sum(result.metrics["expert_usage_share"][0]), 1.0, abs_tol=1e-3)
