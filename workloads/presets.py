"""Architecture presets: the true shapes of public MoE models with random weights, always labelled synthetic.

Each preset is a transformers config with the published hyper-parameters (from the model's config.json on the
hub). `--layers K` builds only the first K decoder layers so a preset fits in host memory; the byte and
parameter arithmetic below is computed from a meta-device build of the full model, so it needs no memory.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from engines.errors import BadInput


@dataclass(frozen=True)
class Preset:
    hub_id: str  # the public model whose shapes these are
    description: str
    published_params: float  # total parameters as published (model card), for the arithmetic check
    config: dict  # model_type plus config fields


PRESETS: dict[str, Preset] = {
    "mixtral-8x7b": Preset(
        "mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B: 32 layers, 8 experts top-2, expert 4096x14336", 46.7e9,
        dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
             tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": Preset(
        "Qwen/Qwen1.5-MoE-A2.7B", "Qwen1.5-MoE-A2.7B: 24 layers, 60 experts top-4 + shared expert 5632", 14.3e9,
        dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
             moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
             num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
             decoder_sparse_step=1, norm_topk_prob=False, max_position_embeddings=8192, rms_norm_eps=1e-6,
             tie_word_embeddings=False)),
    "qwen3-30b-a3b": Preset(
        "Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B: 48 layers, 128 experts top-8, expert 2048x768", 30.5e9,
        dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
             moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
             head_dim=128, num_experts=128, num_local_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
             norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "olmoe-1b-7b": Preset(
        "allenai/OLMoE-1B-7B-0924", "OLMoE-1B-7B: 16 layers, 64 experts top-8, expert 2048x1024", 6.92e9,
        dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
             max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=1, eos_token_id=50279,
             tie_word_embeddings=False)),
    "deepseek-v2-lite": Preset(
        "deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite: 27 layers (first dense), 64 routed top-6 + 2 shared, MLA",
        15.7e9,
        dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
             n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
             moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
             v_head_dim=128, head_dim=64, n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False,
             routed_scaling_factor=1.0, max_position_embeddings=4096, rms_norm_eps=1e-6,
             tie_word_embeddings=False)),
    "gpt-oss-20b": Preset(
        "openai/gpt-oss-20b", "GPT-OSS-20B: 24 layers, 32 experts top-4, expert 2880x2880 (bf16, not MXFP4)", 20.9e9,
        dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
             num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
             num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
             layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
             rms_norm_eps=1e-5, tie_word_embeddings=False)),
}


def preset_config(name: str) -> PretrainedConfig:
    """A fresh config of the full public model (every call returns a new object)."""
    from transformers import AutoConfig
    if name not in PRESETS:
        from .models import did_you_mean
        raise BadInput(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; allowed: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name].config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@dataclass
class ShapeReport:
    """Parameter and byte arithmetic of one configuration (all layers of the config given)."""

    total_params: int
    expert_params: int  # routed experts only (what an offloading engine moves)
    params_per_expert: int
    moe_layers: int
    experts_per_layer: int

    def bytes(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
        size = torch.empty(0, dtype=dtype).element_size()
        return dict(expert_bytes=self.params_per_expert * size, total_expert_bytes=self.expert_params * size,
                    total_bytes=self.total_params * size,
                    non_expert_bytes=(self.total_params - self.expert_params) * size)


def shape_report(config: PretrainedConfig) -> ShapeReport:
    """Count parameters of the model this config builds, on the meta device (no memory, no init)."""
    return _shape_report(config.to_json_string())


@lru_cache(maxsize=32)
def _shape_report(config_json: str) -> ShapeReport:
    import json

    from transformers import AutoConfig

    from engines.runtime import find_experts_modules
    fields = json.loads(config_json)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = find_experts_modules(model)
    per_layer = [sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == m.num_experts)
                 for _, m in experts]
    num_experts = experts[0][1].num_experts if experts else 0
    return ShapeReport(total_params=total, expert_params=sum(per_layer),
                       params_per_expert=per_layer[0] // num_experts if experts else 0,
                       moe_layers=len(experts), experts_per_layer=num_experts)


def with_layers(config: PretrainedConfig, layers: int | None) -> tuple[PretrainedConfig, int, int]:
    """A copy of config with only the first `layers` decoder layers; per-layer lists shrink with it."""
    config = copy.deepcopy(config)
    total = config.num_hidden_layers
    if layers is None:
        return config, total, total
    if not 1 <= layers <= total:
        raise BadInput(f"--layers {layers}: must be between 1 and {total} for this model")
    config.num_hidden_layers = layers
    for key in ("layer_types", "mlp_only_layers"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, value[:layers])
    return config, layers, total


def build_random(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Random weights, fast: skip transformers' init (slow on multi-GB expert tensors) and fill each matrix with
    seeded N(0, 0.02) values; norms start at 1, biases and sinks at 0.

    Drawing billions of normals takes minutes on two cores, so tensors larger than a pool of 2^24 draws are
    filled with pool windows at seeded random offsets: every value is N(0, 0.02) and no two experts are equal,
    which is all a synthetic model is for (bytes to move, routing that is not learned)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x: the plain (slower) init is still correct
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(_POOL, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            elif p.numel() <= _POOL:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                _fill_from_pool(p.view(-1), pool, gen)
    return model.eval()


_POOL = (1 << 24) + 43  # not a multiple of any hidden size, so windows do not line up with matrix rows


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> None:
    pos = 0
    while pos < flat.numel():
        start = int(torch.randint(0, _POOL // 2, (1,), generator=gen))
        take = min(_POOL - start, flat.numel() - pos)
        flat[pos:pos + take] = pool[start:start + take]
        pos += take


def host_memory_bytes() -> int:
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
