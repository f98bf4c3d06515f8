"""Every model family the project claims, as a user brings it: a small random checkpoint saved with save_pretrained
(no tokenizer files), loaded from its directory, run by every engine on the CPU in float32. Each engine must give
`resident`'s greedy tokens exactly, on the default workload and on synthetic-ids, with prompts of different
lengths; `resident` itself must give transformers' own logits. GPT-OSS has a sliding window shorter than prompt +
new tokens, so speculation's rejected tokens and the window's edge meet."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

from engines import registry
from engines.hardware import HardwareProfile
from engines.runtime import ModelRuntime, SamplingSettings, teacher_forcing_batch
from workloads.models import load_model
from workloads.prompts import load_workload

CPU = HardwareProfile.parse("cpu")
WINDOW = 8  # GPT-OSS's sliding window: shorter than any prompt + new tokens below
NEW_TOKENS = 10
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, tie_word_embeddings=False)


def family_configs() -> dict:
    c = _COMMON
    return {
        "mixtral": T.MixtralConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **c),
        "qwen2_moe": T.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2, **c),
        "qwen3_moe": T.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=8,
                                      num_experts_per_tok=2, head_dim=16, **c),
        "olmoe": T.OlmoeConfig(intermediate_size=48, num_experts=8, num_experts_per_tok=2, **c),
        "deepseek_v2": T.DeepseekV2Config(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8,
                                          num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                          kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                                          qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                                          **dict(c, num_key_value_heads=4)),  # MLA: one KV head per query head
        "gpt_oss": T.GptOssConfig(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                                  sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], **c),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a directory saved with save_pretrained: config and weights, no tokenizer files."""
    out = {}
    for family, config in family_configs().items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
        out[family] = str(path)
    return out


ENGINES = [("resident", {}), ("offload", {}), ("overlap", {}), ("caching", {"fraction": 0.25}),
           ("lru", {"capacity": "3"}), ("nospec", {"draft_experts": 2}),
           ("specmoe", {"gamma": 4, "adaptive": False, "draft_experts": 2}),
           ("specmoe", {"gamma": 1, "adaptive": False, "draft_experts": 2})]


def prompts_for(path: str, workload: str) -> list[list[int]]:
    """Four prompts of different lengths (the built-in text's windows are cut to 13, 9, 5 and 2 tokens)."""
    loaded = load_model(path)
    prompts = [list(p) for p in load_workload(workload, model=loaded, batch_size=4, prompt_len=13)]
    return prompts if workload == "synthetic-ids" else [p[:n] for p, n in zip(prompts, (13, 9, 5, 2))]


@pytest.mark.parametrize("workload", ["code-heldout", "synthetic-ids"])
@pytest.mark.parametrize("family", list(family_configs()))
def test_every_engine_gives_residents_tokens(checkpoints, family, workload):
    prompts = prompts_for(checkpoints[family], workload)
    calibration = [list(p) for p in load_workload(workload, model=load_model(checkpoints[family]), batch_size=4,
                                                  prompt_len=13, split="calibration")]
    assert len({len(p) for p in prompts}) > 1
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    reference = None
    for name, options in ENGINES:
        engine = registry.create(name, **options)
        engine.load(load_model(checkpoints[family]), CPU)
        engine.prepare(prompts, settings, calibration=lambda: calibration)
        gen = engine.generate(prompts, settings)
        reference = reference or gen.tokens
        assert gen.tokens == reference, (name, options)
        if name == "specmoe" and family == "gpt_oss":
            assert min(len(p) for p in prompts) + NEW_TOKENS > WINDOW  # the window is full before the end
            assert 0 < gen.stats["accepted_tokens"] < gen.stats["drafted_tokens"]  # ragged: rejections happened
        engine.close()


@pytest.mark.parametrize("family", list(family_configs()))
def test_resident_gives_transformers_own_logits(checkpoints, family):
    """The runtime's static cache, masks (the sliding window too) and grouped experts against transformers' own
    forward of the same checkpoint (left-padded, its own masks, its eager experts), in float64."""
    prompts = prompts_for(checkpoints[family], "synthetic-ids")
    continuations = [[(7 * i + j) % 120 + 1 for j in range(12)] for i in range(len(prompts))]
    hf = load_model(checkpoints[family], dtype=torch.float64).model
    hf.set_experts_implementation("eager")
    ids, mask, pos = teacher_forcing_batch(prompts, continuations, "cpu")
    with torch.inference_mode():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -12:].float()
    got = ModelRuntime(load_model(checkpoints[family], dtype=torch.float64).model, "cpu").teacher_forced_logits(
        prompts, continuations)
    assert (got - expected).abs().max() < 1e-6


def test_a_checkpoint_without_tokenizer_files_falls_back_to_bytes_and_says_why(checkpoints):
    loaded = load_model(checkpoints["qwen2_moe"])
    assert loaded.tokenizer is None  # transformers' stand-in has one id and would encode every prompt to nothing
    assert "1 id" in loaded.notes["tokenization"]
    workload = load_workload("code-heldout", model=loaded, batch_size=2, prompt_len=8)
    assert workload.metadata()["tokenization"].startswith("utf-8 bytes modulo vocab 128")
    assert all(len(p) == 8 for p in workload)


def _compare(tmp_path, *args) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "compare", "--hardware", "cpu", "--batch-sizes", "4",
                           "--max-new-tokens", "10", "--prompt-len", "12", "--iterations", "1", "--cpu-threads", "1", "--results-dir",
                           str(tmp_path / "runs"), "--json", str(out), "-q", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc, json.loads(out.read_text()) if out.exists() else []


@pytest.mark.slow
def test_compare_runs_specmoe_on_a_gpt_oss_checkpoint(checkpoints, tmp_path):
    proc, rows = _compare(tmp_path, "--engines", "specmoe", "--model", checkpoints["gpt_oss"],
                          "--option", "specmoe.adaptive=false")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert rows and all(r["valid"] and r["equivalent"] for r in rows)


@pytest.mark.slow
def test_compare_runs_the_default_workload_on_a_qwen2_moe_checkpoint_without_tokenizer(checkpoints, tmp_path):
    proc, rows = _compare(tmp_path, "--engines", "offload", "--model", checkpoints["qwen2_moe"])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cells = list((tmp_path / "runs").glob("*/cells/*.json"))
    info = json.loads(cells[0].read_text())["workload_info"]
    assert info["workload"] == "code-heldout" and info["tokenization"].startswith("utf-8 bytes")
    assert rows and rows[0]["valid"]
