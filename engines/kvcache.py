"""A static KV cache in which every row writes at its own positions, and the attention masks that go with it.

Column c of a row's cache holds that row's token at position c (prompts start at column 0, right-padded), so a
row's keys are exactly its columns 0..pos. A step writes T tokens per row at columns pos..pos+T-1 with a scatter,
whatever each row's position is: rejected speculative tokens need no rollback, the next step overwrites them, and
a sliding window is a mask over positions. Shapes depend on (batch, T, capacity) only, so every decode, draft and
verification step of one shape is the same kernels on the same buffers (what CUDA graphs and attention backends
that plan per shape need).
"""
from __future__ import annotations

import torch

from .errors import BadInput


class StaticKV:
    """Per layer a key and a value buffer [B, H, S, D], allocated at the first write (prefill, never inside a graph
    capture). `cols` [B, T] (set by the runtime before each forward) says where this forward's tokens go."""

    def __init__(self, batch: int, capacity: int, device: torch.device):
        self.batch, self.capacity, self.device = batch, capacity, torch.device(device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.cols: torch.Tensor | None = None  # [B, T] long

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' Cache.update: write this forward's keys and values, return the layer's whole buffers."""
        if layer_idx not in self.keys:
            self.keys[layer_idx] = self._buffer(key_states)
            self.values[layer_idx] = self._buffer(value_states)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        index = self.cols[:, None, :, None]  # [B, 1, T, 1]
        k.scatter_(2, index.expand(-1, k.shape[1], -1, k.shape[3]), key_states.to(k.dtype))
        v.scatter_(2, index.expand(-1, v.shape[1], -1, v.shape[3]), value_states.to(v.dtype))
        return k, v

    def _buffer(self, states: torch.Tensor) -> torch.Tensor:
        """Zeros (never-written columns are masked out, but 0 x NaN would still poison attention). On CUDA it is
        allocated on the default stream, which the current one then waits for: a first write may come from a
        graph's warm-up on a side stream, and the buffer outlives it."""
        B, H, _, D = states.shape
        if B != self.batch:
            raise ValueError(f"cache for batch {self.batch} got a forward of batch {B}")
        if self.device.type != "cuda":
            return torch.zeros((B, H, self.capacity, D), dtype=states.dtype, device=self.device)
        default = torch.cuda.default_stream(self.device)
        with torch.cuda.stream(default):
            buf = torch.zeros((B, H, self.capacity, D), dtype=states.dtype, device=self.device)
        torch.cuda.current_stream(self.device).wait_stream(default)
        return buf

    # what some model code asks of a cache object; positions are explicit here, so these are never load-bearing
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity

    @property
    def is_compileable(self) -> bool:
        return False

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys.values()) + sum(t.nbytes for t in self.values.values())


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take over every layer (an estimate from the config, for the fit check)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    size = torch.empty((), dtype=dtype).element_size()
    if getattr(text, "kv_lora_rank", None):  # DeepSeek-V2's latent cache: one compressed head per layer
        per_layer = text.kv_lora_rank + getattr(text, "qk_rope_head_dim", 0)
    else:
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        per_layer = 2 * heads * head_dim
    return layers * per_layer * size


def check_positions(config, tokens: int) -> None:
    """BadInput when a row needs more positions than the model was built for (max_position_embeddings)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise BadInput(f"prompt + new tokens = {tokens} positions: more than the model's max_position_embeddings "
                       f"({limit}); use a shorter prompt or fewer new tokens")


def check_fits_in(config, batch: int, tokens: int, dtype: torch.dtype, where: str, memory: int) -> None:
    """BadInput when a batch's static cache of at least `tokens` positions a row is larger than `memory`, all the
    memory of `where`: the check before a run, which cannot know what will be free (check_fits, in the cell,
    knows)."""
    need = batch * tokens * kv_bytes_per_token(config, dtype)
    if need > memory:
        raise BadInput(f"batch {batch} of {tokens} positions a row needs {need / 2**30:.2f} GiB of KV cache; {where} "
                       f"has {memory / 2**30:.2f} GiB in all: use a smaller batch, a shorter prompt or fewer new "
                       "tokens")


def check_fits(config, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
    """BadInput, naming the value and the limit, when a batch's static cache does not fit in the device memory
    that is free."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = batch * capacity * kv_bytes_per_token(config, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise BadInput(f"batch {batch} with a static cache of {capacity} positions needs {need / 2**30:.2f} GiB of "
                       f"KV cache; {device} has {free / 2**30:.2f} GiB free: use a smaller batch or fewer new tokens")


def attention_masks(model, qpos: torch.Tensor, capacity: int, dtype: torch.dtype):
    """Additive masks [B, 1, T, S] for queries at positions qpos [B, T]: key column k is visible when k <= the
    query's position (and, in a sliding-window layer, when position - k < window). What the model's forward takes:
    one tensor, or a dict keyed by layer type for models whose layers differ (GPT-OSS, Qwen2-MoE)."""
    keys = torch.arange(capacity, device=qpos.device)[None, None, :]  # [1, 1, S]
    q = qpos[:, :, None]  # [B, T, 1]
    visible = keys <= q
    blocked = torch.finfo(dtype).min

    def additive(v):
        return torch.zeros(v.shape, dtype=dtype, device=qpos.device).masked_fill_(~v, blocked)[:, None]

    window = model.sliding_window
    full = additive(visible)
    windowed = additive(visible & (q - keys < window)) if window else full
    if model.layer_types is not None:
        return {t: windowed if t == "sliding_attention" else full for t in set(model.layer_types)}
    return windowed if model.uniform_window else full


class MaskShape:
    """What attention_masks needs to know of a model, read once: its window and how its forward takes masks."""

    def __init__(self, model):
        import inspect
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.sliding_window = getattr(text, "sliding_window", None) or None
        types = getattr(text, "layer_types", None)
        base = model.base_model
        takes_dict = "causal_mask_mapping" in inspect.getsource(type(base).forward)
        self.layer_types = list(types) if types is not None and takes_dict else None
        # a model without per-layer masks applies its config's window (if any) to every layer
        self.uniform_window = self.layer_types is None and self.sliding_window is not None
        if self.layer_types is None and types is not None and "sliding_attention" in types and not takes_dict:
            raise BadInput(f"{type(model).__name__}: sliding-window layers whose masks the runtime cannot pass")
