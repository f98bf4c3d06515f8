"""Draft-guided prefetch for SpecMoE: the experts the drafts' router chose (before substitution) are the experts the
verification that follows will most likely need, so they are copied ahead and verification finds them in the pool.

The drafts are graph replays, so the host learns nothing while they run: each draft forward ORs the experts its
router chose into a device mask [L, E] (`note`, recorded in the graph like the draft counters). The decoder reads
the mask once after the first draft forward, so that the first copies run while the other drafts compute, and once
after the last (`plan`). What is not in the pool is queued in layer order and copied on the store's copy stream into
a window of `slots` pool slots. As verification finishes a layer (`settle`) the slots of that layer's prefetched
experts come back and the queue refills them with later layers' experts, which then copy while the host waits for
the routing of the layer in between. Verification copies only what the drafts did not predict.

Bytes are counted where the copies are made: `h2d_bytes` (every prefetched expert, each once; the store counts them
in its h2d_bytes too), `used_bytes` (routed by the verification they were fetched for), `wasted_bytes` (not).
"""
from __future__ import annotations

import torch

from .store import ExpertStore


class DraftPrefetch:
    def __init__(self, store: ExpertStore, slots: int):
        self.store, self.slots = store, slots
        self.wanted = torch.zeros((store.num_layers, store.num_experts), dtype=torch.bool, device=store.device)
        self.queue: list[tuple[int, int]] = []  # predicted (layer, expert) not copied yet, in layer order
        self.ready: dict[int, set[int]] = {}  # layer -> experts copied ahead for the coming verification
        self.reset_counters()

    def reset_counters(self) -> None:
        self.h2d_bytes = self.used_bytes = self.wasted_bytes = 0

    def start(self) -> None:
        """Before the drafts of a step: forget what the drafts of earlier steps chose."""
        self.wanted.zero_()

    def note(self, layer: int, routed: torch.Tensor) -> None:
        """Inside a draft forward: routed [E] bool, the experts this layer's router chose. No host sync."""
        self.wanted[layer].logical_or_(routed)

    def plan(self) -> None:
        """After a draft forward: one host read of the mask (it waits for the drafts queued so far); queue what is
        neither in the pool nor already queued, and copy as much of it as the window holds."""
        known = set(self.queue) | {(layer, e) for layer, es in self.ready.items() for e in es}
        new = [key for key in map(tuple, self.wanted.cpu().nonzero().tolist())
               if key not in known and key not in self.store.resident]
        self.queue = sorted(self.queue + new)
        self.fill(after=-1)

    def fill(self, after: int) -> None:
        """Copy queued experts of the layers after `after` while the window has room (earlier ones are too late)."""
        self.queue = [(layer, e) for layer, e in self.queue if layer > after]
        held = sum(len(es) for es in self.ready.values())
        while self.queue and held < self.slots:
            layer, e = self.queue.pop(0)
            if (layer, e) in self.store.resident:
                continue
            self.store.copy_to_device(layer, e)
            self.ready.setdefault(layer, set()).add(e)
            self.h2d_bytes += self.store.expert_bytes
            held += 1

    def settle(self, layer: int, routed: list[int]) -> set[int]:
        """After verification ran a layer: its prefetched experts counted as used (routed) or wasted. Returns them;
        the caller gives back the slots of those it does not keep."""
        ready = self.ready.pop(layer, set())
        used = len(ready & set(routed))
        self.used_bytes += used * self.store.expert_bytes
        self.wasted_bytes += (len(ready) - used) * self.store.expert_bytes
        return ready

    def finish(self) -> list[tuple[int, int]]:
        """After a forward: what is still prefetched for it (a layer it did not run) counts as wasted and is
        returned for its slots to be given back; the queue is dropped."""
        self.queue = []
        left = [(layer, e) for layer in sorted(self.ready) for e in sorted(self.settle(layer, []))]
        return left

    def stats(self) -> dict[str, int]:
        return dict(prefetch_h2d_bytes=self.h2d_bytes, prefetch_used_bytes=self.used_bytes,
                    prefetch_wasted_bytes=self.wasted_bytes)
