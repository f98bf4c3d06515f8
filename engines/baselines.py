"""The engines SpecMoE is compared against. Each is an ExpertPolicy on the shared runtime; nothing else differs.

resident  every expert on the device (the reference)
offload   the paper's MoE-OnDemand: copy each needed expert when its layer runs, keep nothing
overlap   offload with oracle prefetch of the next layer's experts (from a recorded trace) on a copy stream
caching   the paper's MoE-Caching: a static set of the most-used experts (from a profiling pass) stays resident
lru       an LRU expert cache of fixed capacity (the mixtral-offloading design)
"""
from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .base import RuntimeEngine, check_profile, profile_field
from .errors import BadInput
from .hardware import HardwareProfile, parse_size
from .runtime import ExpertPolicy
from .store import ExpertStore


class ResidentPolicy(ExpertPolicy):
    def slots(self, store: ExpertStore) -> int:
        return store.num_layers * store.num_experts

    def setup(self) -> None:
        for layer in range(self.store.num_layers):
            for e in range(self.store.num_experts):
                self.store.keep(layer, e)


class ResidentEngine(RuntimeEngine):
    name = "resident"
    summary = "every weight on the device; plain decoding (the reference for equivalence)"

    def load(self, model, hardware: HardwareProfile) -> None:
        if hardware.has_budget:
            raise BadInput(f"engine 'resident' keeps every expert on the device; it cannot run under the expert "
                           f"budget of {hardware.spec!r} (use the plain device profile)")
        super().load(model, hardware)

    def make_policy(self, hardware):
        return ResidentPolicy()


class OffloadEngine(RuntimeEngine):
    name = "offload"
    summary = "naive offload (MoE-OnDemand): each needed expert copied when its layer runs, nothing kept"


# -- overlap: oracle prefetch ---------------------------------------------------------------------------------


class OverlapPolicy(ExpertPolicy):
    """Copies layer l+1's experts (known from the trace) while layer l computes. On CUDA the copies run on the
    store's copy stream into slots of their own; on CPU they are made at the same point but cannot overlap
    (functional only)."""

    def __init__(self, trace: dict[tuple[int, int], list[int]]):
        self.trace = trace
        self.forward = 0
        self.pending: dict[int, set[int]] = {}  # layer -> experts prefetched for it this forward

    def slots(self, store: ExpertStore) -> int:
        return 3 * store.num_experts  # this layer's, the next layer's prefetch, and misses the trace did not see

    def _prefetch(self, layer: int) -> None:
        if layer >= self.store.num_layers or layer in self.pending:
            return
        experts = self.trace.get((self.forward, layer), [])
        for e in experts:
            if (layer, e) not in self.store.resident:
                self.store.copy_to_device(layer, e)
        self.pending[layer] = set(experts)

    def begin_forward(self, forward_index: int) -> None:
        self.forward = forward_index
        self._drop_pending()
        self._prefetch(0)

    def serve(self, layer, experts):
        ready = self.pending.get(layer, set())
        for e in experts:
            if e in ready:
                self.store.counters.hits += 1
            else:  # the trace missed this expert: fetch on demand, ahead of the next layer's prefetch
                self.store.counters.misses += 1
                self.store.copy_to_device(layer, e)
        self._prefetch(layer + 1)  # queued behind this layer's copies, overlapping its compute

    def after_layer(self, layer, experts):
        for e in self.pending.pop(layer, set()) | set(experts or ()):
            self.store.drop(layer, e)

    def end_forward(self) -> None:
        self._drop_pending()

    def _drop_pending(self) -> None:
        for layer, experts in self.pending.items():
            for e in experts:
                self.store.drop(layer, e)
        self.pending.clear()


class OverlapEngine(RuntimeEngine):
    name = "overlap"
    summary = "offload with oracle prefetch of the next layer's experts from a recorded routing trace"

    def _prepare(self, prompts, settings) -> None:
        log = self.record_routing(prompts, settings)
        self.runtime.set_policy(OverlapPolicy({(f, layer): experts for f, layer, experts in log}))


# -- caching: static hottest experts ------------------------------------------------------------------------


@dataclass
class CachingOptions:
    fraction: float = field(default=0.10, metadata={"help": "fraction of all experts kept resident (0-1]"})
    profile: str = profile_field("the choice of the most-used experts")

    def __post_init__(self):
        self.fraction = float(self.fraction)
        if not 0 < self.fraction <= 1:
            raise BadInput(f"caching fraction={self.fraction}: must be in (0, 1]")
        check_profile("caching", self.profile)


class CachingPolicy(ExpertPolicy):
    """A static set of pinned experts stays in the pool; every other needed expert is copied for its layer."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pinned: set[tuple[int, int]] = set()

    def slots(self, store: ExpertStore) -> int:
        return self.capacity + store.num_experts

    def pin(self, experts: list[tuple[int, int]]) -> None:
        for key in list(self.store.resident):
            self.store.drop(*key)
        self.pinned = set(experts[: self.capacity])
        for layer, e in sorted(self.pinned):
            self.store.keep(layer, e)
        self.store.sync_all()

    def after_layer(self, layer, experts):
        for e in experts or ():
            if (layer, e) not in self.pinned:
                self.store.drop(layer, e)


class CachingEngine(RuntimeEngine):
    name = "caching"
    summary = "MoE-Caching: the most-used experts (10% by default, from a profiling pass on calibration prompts) " \
              "stay on the device"
    Options = CachingOptions

    def make_policy(self, hardware):
        store = self.runtime.store
        slots = max(1, math.floor(self.options.fraction * store.num_layers * store.num_experts))
        if self.expert_budget is not None:
            slots = min(slots, self.expert_budget // store.expert_bytes)
        return CachingPolicy(slots)

    def _prepare(self, prompts, settings) -> None:
        trace = self.record_routing(self.profiling_prompts(prompts), settings)
        usage = Counter((layer, e) for _, layer, experts in trace for e in experts)
        self.runtime.policy.pin(sorted(usage, key=lambda key: (-usage[key], key)))
        self.pinned = self.runtime.policy.pinned


# -- lru: an expert cache ---------------------------------------------------------------------------------------


@dataclass
class LRUOptions:
    capacity: str = field(default="25%", metadata={
        "help": "cache size: a number of experts (64), a share of all experts (25%) or bytes (2GiB); "
                "under a hardware expert budget the budget caps it"})

    def __post_init__(self):
        check_capacity(self.capacity)


class LRUPolicy(ExpertPolicy):
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.order: OrderedDict[tuple[int, int], None] = OrderedDict()

    def slots(self, store: ExpertStore) -> int:
        return self.capacity + store.num_experts  # the cache, and room for one layer's misses before eviction

    def serve(self, layer, experts):
        super().serve(layer, experts)  # hits from the pool, misses copied in
        for e in experts:
            self.order[(layer, e)] = None
            self.order.move_to_end((layer, e))

    def after_layer(self, layer, experts):
        while len(self.order) > self.capacity:
            self.store.drop(*self.order.popitem(last=False)[0])


def check_capacity(text: str) -> None:
    """The form of a capacity, before any model is loaded: whole experts >= 1, a share in (0, 100]%, or a size."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise BadInput(f"lru capacity {text!r}: give at least 1 expert")
    elif text.endswith("%"):
        if not re.fullmatch(r"\d+(\.\d+)?%", text) or not 0 < float(text[:-1]) <= 100:
            raise BadInput(f"lru capacity {text!r}: a share of the experts must be in (0%, 100%]")
    else:
        try:
            parse_size(text)
        except BadInput:
            raise BadInput(f"lru capacity {text!r}: give a number of experts (64), a share (25%) or a size "
                           "(2GiB)") from None


def parse_capacity(text: str, store: ExpertStore) -> int:
    """'64' experts, '25%' of all experts, or a byte size -> a number of experts (at least one, or BadInput)."""
    text = str(text).strip()
    total = store.num_layers * store.num_experts
    if re.fullmatch(r"\d+", text):
        n = int(text)
    elif re.fullmatch(r"\d+(\.\d+)?%", text):
        n = math.floor(float(text[:-1]) / 100 * total)
    else:
        n = parse_size(text) // store.expert_bytes
    if n < 1:
        raise BadInput(f"lru capacity {text!r} holds no expert: one expert is {store.expert_bytes} bytes "
                       f"and the model has {total}; give at least 1 expert")
    return min(n, total)


class LRUEngine(RuntimeEngine):
    name = "lru"
    summary = "an LRU expert cache of fixed capacity on the device; misses fetched on demand"
    Options = LRUOptions

    def make_policy(self, hardware):
        capacity = parse_capacity(self.options.capacity, self.runtime.store)
        if self.expert_budget is not None:
            capacity = min(capacity, self.expert_budget // self.runtime.store.expert_bytes)
        self.capacity = capacity
        return LRUPolicy(capacity)
