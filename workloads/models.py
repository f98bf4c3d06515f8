"""Model catalogue: every name a user can pass as --model resolves here to a transformers MoE causal LM on the CPU.

Names: a checkpoint the project trains itself (TRAINED: "tiny", "small", "nllb-like", "mixtral-like"; trained on
first use and cached per machine), a toy or an architecture preset of a public model (SYNTHETIC, PRESETS: random weights, labelled
synthetic), a local checkpoint directory, or a hub id (needs network). Loading is deterministic: the same name,
dtype and seed give the same weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from engines.errors import BadInput

from .presets import PRESETS
from .train import TRAIN_PRESETS

if TYPE_CHECKING:
    from engines.hardware import HardwareProfile


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


def _trained_shape(name: str) -> Callable[[], PretrainedConfig]:
    def config() -> PretrainedConfig:
        from .train import TRAIN_PRESETS
        return TRAIN_PRESETS[name].model_config()
    return config


# name -> (config factory, description). Random weights: results carry source "synthetic".
SYNTHETIC: dict[str, tuple[Callable[[], PretrainedConfig], str]] = {
    "tiny-mixtral-random": (_tiny_mixtral, "2-layer Mixtral-family toy, 8 experts top-2, random weights"),
    "tiny-qwen2moe-random": (_tiny_qwen2moe, "2-layer Qwen2-MoE-family toy with a shared expert, random weights"),
    "tiny-random": (_trained_shape("tiny"), "the shape of 'tiny' with random weights (the routing-locality control)"),
    "small-random": (_trained_shape("small"), "the shape of 'small' with random weights (GPU timing without training; "
                                              "its acceptance and hit rates mean nothing)"),
}

# Checkpoints the project trains itself (workloads/train.py); source "trained".
TRAINED = tuple(TRAIN_PRESETS)


def _with_layers(config: PretrainedConfig, layers: int | None) -> tuple[PretrainedConfig, int, int]:
    from .presets import with_layers
    return with_layers(config, layers)


def build_from_config(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Random weights drawn in float32 (the same values at every dtype), then cast to `dtype`. Non-persistent
    buffers (the rotary frequencies) stay as transformers computed them, in float32, as `from_pretrained` leaves
    them: cast to bf16 they would put every position's rotation off by up to 1e-4 and change the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    computed = {}
    for module in model.modules():
        for name in getattr(module, "_non_persistent_buffers_set", ()):
            if module._buffers.get(name) is not None:
                computed[(module, name)] = module._buffers[name]
    model.to(dtype)
    for (module, name), buf in computed.items():
        module._buffers[name] = buf
    return model.eval()


def resolve_model(name: str) -> tuple[str, str]:
    """What a --model value is: (kind, ref) with kind synthetic | preset | trained | checkpoint (ref: the
    directory) | hub (ref: the id). The one place a model name is resolved; the checks before a run and the loader
    both call it. BadInput for anything else."""
    if name in SYNTHETIC:
        return "synthetic", name
    if name in PRESETS:
        return "preset", name
    if name in TRAINED:
        return "trained", name
    path = Path(name).expanduser()
    if path.is_dir() or (os.sep in name and name.count("/") != 1) or name.startswith((".", "~", "/")):
        if not (path / "config.json").is_file():
            where = "that directory" if path.is_dir() else "no such directory"
            raise BadInput(f"model {name!r}: no config.json ({where}); give a checkpoint saved with "
                           f"save_pretrained or one of: {', '.join(known_models())}")
        return "checkpoint", str(path)
    if name.count("/") == 1:
        return "hub", name
    raise BadInput(f"unknown model {name!r}{did_you_mean(name, known_models())}; "
                   f"allowed: {', '.join(known_models())}, a local checkpoint directory or a hub id org/name")


def model_config(name: str) -> PretrainedConfig:
    """The full model's config, without weights (a hub id needs the hub or the local hub cache)."""
    kind, ref = resolve_model(name)
    if kind == "synthetic":
        return SYNTHETIC[name][0]()
    if kind == "preset":
        from .presets import preset_config
        return preset_config(name)
    if kind == "trained":
        from .train import TRAIN_PRESETS
        return TRAIN_PRESETS[name].model_config()
    if kind == "hub":
        _check_hub_reachable(ref, "model")
    return _config(ref, name)


def check_model(name: str, layers: int | None = None, dtype: str = "float32") -> PretrainedConfig:
    """Validation before a run, without loading weights: the name resolves, its config loads (and asks to run
    no code of its own), --layers fits it, a preset fits in host memory, and it has MoE layers that the engines
    can offload. Returns the config of the layers loaded."""
    from .presets import shape_report
    config, _, _ = _with_layers(model_config(name), layers)
    if name in PRESETS:
        check_preset_fits(name, layers, getattr(torch, dtype))
    try:
        moe_layers = shape_report(config).moe_layers
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a model from
        raise BadInput(f"model {name!r}: transformers cannot build a causal LM from its config "
                       f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from None
    if not moe_layers:
        from engines.runtime import SUPPORTED_FAMILIES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        arch = (getattr(config, "architectures", None)
                or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)])[0]
        raise BadInput(f"model {name!r} ({arch}) has no MoE layers with a fused experts module that the runtime can "
                       f"serve; supported families: {SUPPORTED_FAMILIES}")
    return config


def check_cache_fits(name: str, config: PretrainedConfig, dtype: str, tokens: int, batch: int,
                     hardware: HardwareProfile, check_memory: bool) -> None:
    """Validation before a run, on the config check_model returned: a row of `tokens` positions (prompt + new
    tokens) fits the model's position limit, and (with `check_memory`) the batch's static cache fits all the memory
    of the hardware's device; the runtime repeats both with the prompts it is given and the memory that is free."""
    from engines.kvcache import check_fits_in, check_positions
    memory = hardware.memory_bytes() if check_memory else None
    try:
        check_positions(config, tokens)
        if memory is not None:
            check_fits_in(config, batch, tokens, getattr(torch, dtype), hardware.device, memory)
    except BadInput as exc:
        raise BadInput(f"model {name!r}: {exc}") from None


def load_model(name: str, dtype: torch.dtype = torch.float32, layers: int | None = None, seed: int = 0) -> LoadedModel:
    """Resolve a --model value and load it. Raises BadInput for a name that is neither a preset, a directory
    nor a hub id."""
    kind, ref = resolve_model(name)
    if kind == "synthetic":
        config, loaded, total = _with_layers(SYNTHETIC[name][0](), layers)
        return LoadedModel(build_from_config(config, seed, dtype), name, "synthetic",
                           layers_loaded=loaded, layers_total=total, notes=dict(synthetic=True))
    if kind == "preset":
        return _load_preset(name, dtype, layers, seed)
    if kind == "trained":
        from .train import trained_checkpoint
        # The weights are fixed by training (seed 0); `seed` does not retrain another model.
        loaded = _from_pretrained(str(trained_checkpoint(name)), name, "trained", dtype, layers)
        loaded.notes.update(_training_notes(Path(loaded.notes["checkpoint"])))
        return loaded
    return _from_pretrained(ref, name, kind, dtype, layers)


def _config(ref: str, name: str) -> PretrainedConfig:
    """A checkpoint's config. trust_remote_code=False: code that comes with a checkpoint never runs here."""
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise BadInput(f"model {name!r} needs the Python code that comes with the checkpoint (auto_map); "
                           "specmoe-bench never runs a checkpoint's own code (trust_remote_code=False)") from None
        raise BadInput(f"model {name!r}: its config cannot be loaded ({text[:200]})") from None


def _weights(ref: str) -> tuple[dict, dict]:
    """from_pretrained arguments and model notes for a local checkpoint: safetensors in preference to pickle; a
    pickle-only checkpoint is read with torch.load(weights_only=True), so no code in it runs, and says so."""
    path = Path(ref)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return dict(use_safetensors=None, weights_only=True), {}
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if not pickles:
        return dict(use_safetensors=None, weights_only=True), {}
    return dict(use_safetensors=False, weights_only=True), {
        "weights": f"pickle ({', '.join(pickles[:3])}) loaded with torch.load(weights_only=True): tensors only, "
                   "no code run; safetensors is preferred where a checkpoint has it"}


def _from_pretrained(ref: str, name: str, source: str, dtype, layers) -> LoadedModel:
    """The single loading path for a local directory and a hub id (transformers resolves both)."""
    if source == "hub":
        _check_hub_reachable(ref, "model")
    config, loaded, total = _with_layers(_config(ref, name), layers)
    kw, notes = _weights(ref)
    model = AutoModelForCausalLM.from_pretrained(ref, config=config, dtype=dtype, trust_remote_code=False,
                                                 **kw).eval()
    tokenizer, why = None, "the checkpoint has no tokenizer files"
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        why = unusable_tokenizer(tokenizer, model.config.get_text_config().vocab_size)
    except (OSError, ValueError, TypeError, KeyError):
        pass
    if why:  # text workloads then use the byte encoding of tokenizer-less models
        tokenizer = None
        notes["tokenization"] = f"utf-8 bytes: {why}"
    notes.update({"checkpoint": ref} if source != "hub" else {"hub_id": ref})
    if loaded != total:
        notes["layers"] = f"{loaded} of {total} decoder layers loaded"
    return LoadedModel(model, name, source, tokenizer, layers_loaded=loaded, layers_total=total, notes=notes)


TOKENIZER_PROBE = "def mean(xs):\n    return sum(xs) / len(xs)  # the average\n"


def unusable_tokenizer(tokenizer, vocab_size: int) -> str | None:
    """Why a checkpoint's tokenizer cannot encode text for this model, or None when it can. transformers gives a
    directory without tokenizer files a tokenizer of a single id for some families (Qwen2-MoE, Qwen3-MoE, OLMoE),
    which would turn every prompt into nothing."""
    name = type(tokenizer).__name__
    if len(tokenizer) < 2:
        return f"its tokenizer ({name}) has {len(tokenizer)} id, so it cannot encode text"
    ids = tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unk for i in ids):
        return f"its tokenizer ({name}, {len(tokenizer)} ids) encodes a line of code to nothing or to unknowns"
    if max(ids) >= vocab_size:
        return f"its tokenizer ({name}) gives id {max(ids)}, beyond the model's vocabulary of {vocab_size}"
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect quickly (so an offline machine fails fast)."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host.split(":")[0], 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub_reachable(ref: str, what: str) -> None:
    """A hub id without network: use the local hub cache if it has the files, else fail fast with one line."""
    if hub_reachable():
        return
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            os.environ["HF_HUB_OFFLINE"] = "1"  # cached: load from disk without retries against the network
            return
    except Exception:
        pass
    raise BadInput(f"{what} {ref!r} is a hub id but the hub cannot be reached from this machine (no network) and it "
                   "is not in the local hub cache; give a local checkpoint directory or one of the built-in names")


def _training_notes(path: Path) -> dict:
    import json
    info = json.loads((path / "training.json").read_text())
    keep = ("heldout_loss", "heldout_perplexity", "unigram_loss", "corpus", "corpus_fingerprint", "seed",
            "train_tokens_seen", "expert_usage_entropy", "entropy_max", "routing_skew", "weights_sha256")
    return {k: info[k] for k in keep if k in info}


def check_preset_fits(name: str, layers: int | None, dtype: torch.dtype) -> None:
    """BadInput, with the --layers that would fit, when a preset's random weights do not fit in host memory."""
    from .presets import host_memory_bytes, preset_config, shape_report, with_layers
    full = preset_config(name)
    config, loaded, total = with_layers(full, layers)
    need = shape_report(config).bytes(dtype)["total_bytes"]
    have = host_memory_bytes()
    if need > 0.8 * have:
        per_layer = shape_report(with_layers(full, 2)[0]).bytes(dtype)["total_bytes"] - \
            shape_report(with_layers(full, 1)[0]).bytes(dtype)["total_bytes"]
        base = need - loaded * per_layer
        fits = max(0, int((0.8 * have - base) // per_layer))
        raise BadInput(f"model {name!r} with {loaded} layers needs {need / 2**30:.1f} GiB in {str(dtype)[6:]}; "
                       f"this machine has {have / 2**30:.1f} GiB: use --layers K with K <= {min(fits, total)} "
                       "or a smaller dtype")


def _load_preset(name: str, dtype: torch.dtype, layers: int | None, seed: int) -> LoadedModel:
    """A public model's shapes with random weights; only `layers` decoder layers are built."""
    from .presets import PRESETS, build_random, preset_config, shape_report, with_layers
    full = preset_config(name)
    config, loaded, total = with_layers(full, layers)
    check_preset_fits(name, layers, dtype)
    full_bytes, here = shape_report(full).bytes(dtype), shape_report(config).bytes(dtype)
    notes = dict(synthetic=True, preset=name, shapes_of=PRESETS[name].hub_id,
                 expert_bytes=here["expert_bytes"], total_expert_bytes=here["total_expert_bytes"],
                 full_model_total_expert_bytes=full_bytes["total_expert_bytes"],
                 full_model_params=shape_report(full).total_params)
    if loaded != total:
        notes["layers"] = f"{loaded} of {total} decoder layers loaded"
    model = build_random(config, seed, dtype)
    return LoadedModel(model, name, "synthetic", None, layers_loaded=loaded, layers_total=total, notes=notes)


def known_models() -> list[str]:
    from .presets import PRESETS
    return sorted(SYNTHETIC) + sorted(PRESETS) + list(TRAINED)


def did_you_mean(name: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
