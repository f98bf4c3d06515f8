"""Model catalogue: every name a user can pass as --model resolves here to a transformers MoE causal LM on the CPU.

Names: a preset in SYNTHETIC (random weights, labelled synthetic), a local checkpoint directory, or a hub id
(needs network). Loading is deterministic: the same name, dtype and seed give the same weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from engines.errors import BadInput


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    source: str  # "synthetic" | "trained" | "checkpoint" | "hub"
    tokenizer: object | None = None
    layers_loaded: int | None = None
    layers_total: int | None = None
    notes: dict = field(default_factory=dict)


def _tiny_mixtral() -> PretrainedConfig:
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=512, tie_word_embeddings=False)


def _tiny_qwen2moe() -> PretrainedConfig:
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                          shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                          decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False)


# name -> (config factory, description). Random weights: results carry source "synthetic".
SYNTHETIC: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "tiny-mixtral-random": (_tiny_mixtral, "2-layer Mixtral-family toy, 8 experts top-2, random weights"),
    "tiny-qwen2moe-random": (_tiny_qwen2moe, "2-layer Qwen2-MoE-family toy with a shared expert, random weights"),
}


def _with_layers(config: PretrainedConfig, layers: int | None) -> tuple[PretrainedConfig, int, int]:
    total = config.num_hidden_layers
    if layers is None:
        return config, total, total
    if not 1 <= layers <= total:
        raise BadInput(f"--layers {layers}: must be between 1 and {total} for this model")
    config.num_hidden_layers = layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists must shrink with the layer count
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, value[:layers])
    return config, layers, total


def build_from_config(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype).eval()


def load_model(name: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0) -> LoadedModel:
    """Resolve a --model value. Raises BadInput for a name that is neither a preset, a directory nor a hub id."""
    if name in SYNTHETIC:
        config, loaded, total = _with_layers(SYNTHETIC[name][0](), layers)
        return LoadedModel(build_from_config(config, seed, dtype), name, "synthetic",
                           layers_loaded=loaded, layers_total=total)
    path = Path(name).expanduser()
    if path.is_dir() or (os.sep in name and name.count("/") != 1) or name.startswith((".", "~", "/")):
        if not (path / "config.json").is_file():
            raise BadInput(f"model {name!r}: no config.json in that directory; "
                           f"give a checkpoint saved with save_pretrained or one of: {', '.join(known_models())}")
        source = "checkpoint"
    elif name.count("/") == 1:
        source = "hub"
    else:
        raise BadInput(f"unknown model {name!r}{did_you_mean(name, known_models())}; "
                       f"allowed: {', '.join(known_models())}, a local checkpoint directory or a hub id org/name")
    return _from_pretrained(str(path) if source == "checkpoint" else name, name, source, dtype, layers)


def _from_pretrained(ref: str, name: str, source: str, dtype, layers) -> LoadedModel:
    """The single loading path for a local directory and a hub id (transformers resolves both)."""
    try:
        config = AutoConfig.from_pretrained(ref)
    except OSError as exc:
        raise BadInput(f"model {name!r} could not be loaded ({str(exc).splitlines()[0]})") from None
    config, loaded, total = _with_layers(config, layers)
    model = AutoModelForCausalLM.from_pretrained(ref, config=config, dtype=dtype).eval()
    tokenizer = None
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError, TypeError):
        pass
    return LoadedModel(model, name, source, tokenizer, layers_loaded=loaded, layers_total=total)


def known_models() -> list[str]:
    return sorted(SYNTHETIC)


def did_you_mean(name: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
