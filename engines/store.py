"""Where experts live: every expert in (pinned) host memory, and a preallocated device pool of expert slots.

The pool holds one stacked tensor per expert parameter, [slots, ...], like mixtral-offloading's packed storage:
a copy lands in a slot, never in a fresh allocation. `slot_of` [L, E] (on the device) maps (layer, expert) to the
slot that holds it, -1 where none does; the experts forward reads it on the device, so a layer whose experts are
all in the pool needs no host decision. Every host-to-device expert copy in the project goes through
`copy_to_device`, which counts its bytes. With the disk tier (engines/disktier.py) the experts live in a file on
local disk and each copy is read from it first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .disktier import DiskTier


@dataclass
class StoreCounters:
    h2d_bytes: int = 0  # bytes copied host -> device for experts
    h2d_copies: int = 0  # expert copies (one expert = one copy of all its tensors)
    hits: int = 0  # expert requests served by a device copy (resident, or already prefetched)
    misses: int = 0  # expert requests that needed a copy

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


class ExpertStore:
    def __init__(self, host: list[dict[str, torch.Tensor]], device: torch.device, disk: DiskTier | None = None):
        self.disk = disk  # the disk tier (`host=disk`): copies are read from its file, host holds its memory map
        self.host = disk.host if disk is not None else host  # [layer] -> {param name: [E, ...]}
        self.device = torch.device(device)
        self.num_layers = len(host)
        self.num_experts = next(iter(host[0].values())).shape[0]
        self.expert_bytes = sum(t[0].nbytes for t in host[0].values())
        self.counters = StoreCounters()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pool: dict[str, torch.Tensor] = {}
        self.num_slots = 0
        self.resident: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot, the host's view of slot_of
        self.free: list[int] = []
        self.slot_of = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.long, device=self.device)
        self._rows = [[-1] * self.num_experts for _ in range(self.num_layers)]  # slot_of as the host sees it
        self._dirty: set[int] = set()  # layers whose row the device has not been sent yet
        self._landing: dict[int, list[tuple[int, torch.cuda.Event]]] = {}  # layer -> (slot, event) per queued copy

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes * self.num_experts * self.num_layers

    def allocate(self, slots: int) -> None:
        """The device pool: `slots` expert slots, allocated once (a policy says how many it needs)."""
        slots = max(1, slots)
        self.pool = {name: torch.empty((slots, *t.shape[1:]), dtype=t.dtype, device=self.device)
                     for name, t in self.host[0].items()}
        self.num_slots = slots
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.resident.clear()
        self._rows = [[-1] * self.num_experts for _ in range(self.num_layers)]
        self.slot_of.fill_(-1)

    # -- placing experts -----------------------------------------------------------------------------------------

    def copy_to_device(self, layer: int, expert: int) -> int:
        """Copy one expert host -> device into a free slot, count its bytes, and return the slot. On CUDA the copy
        runs on the copy stream (after everything the compute stream has queued so far, so a freed slot is not
        overwritten while a queued kernel still reads it) and records an event; `sync_layer` or `landing` makes
        the compute stream wait for it."""
        slot = self.free.pop()
        if self.disk is not None:  # read from the disk into a pinned staging buffer first (on the host)
            source, staging = self.disk.read(layer, expert)
        else:
            source, staging = {name: t[expert] for name, t in self.host[layer].items()}, None
        if self.copy_stream is None:
            for name, t in source.items():
                self.pool[name][slot].copy_(t)
            event = None
        else:
            copy = self.copy_stream
            copy.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(copy):
                for name, t in source.items():
                    self.pool[name][slot].copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(copy)
            self._landing.setdefault(layer, []).append((slot, event))
        if staging is not None:
            self.disk.used(staging, event)
        self._place(layer, expert, slot)
        self.counters.h2d_bytes += self.expert_bytes
        self.counters.h2d_copies += 1
        return slot

    def copy_within(self, layer: int, expert: int, src_slot: int) -> int:
        """Place (layer, expert) in a new slot by a device-to-device copy from `src_slot` (counted as no H2D)."""
        slot = self.free.pop()
        for t in self.pool.values():
            t[slot].copy_(t[src_slot])
        self._place(layer, expert, slot)
        return slot

    def _place(self, layer: int, expert: int, slot: int) -> None:
        self.resident[(layer, expert)] = slot
        self._rows[layer][expert] = slot
        self._dirty.add(layer)

    def drop(self, layer: int, expert: int) -> None:
        """Give the expert's slot back (a later copy into it waits for the kernels queued before that copy)."""
        slot = self.resident.pop((layer, expert), None)
        if slot is not None:
            self.free.append(slot)
            self._rows[layer][expert] = -1
            self._dirty.add(layer)

    def keep(self, layer: int, expert: int) -> None:
        """Copy the expert in unless it is already in the pool (a policy's resident set)."""
        if (layer, expert) not in self.resident:
            self.copy_to_device(layer, expert)

    def sync_layer(self, layer: int) -> None:
        """Before a layer's experts run: the compute stream waits for that layer's copies, and the device gets the
        layer's row of slot_of if it changed. Queued in stream order: no host sync."""
        landing = self._landing.pop(layer, [])
        if landing:  # the copies run in order on one stream: the last one's event covers them all
            torch.cuda.current_stream(self.device).wait_event(landing[-1][1])
        self.send_row(layer)

    def landing(self, layer: int, slots: set[int]) -> list[tuple[int, torch.cuda.Event]]:
        """The last queued copy into each of `slots` (the slots a pass reads) that has not been waited for, as
        (slot, event) in the order they land; the compute stream is to wait for each event before it reads that
        slot. Copies queued after the last of them stay pending for the next `sync_layer` or `landing` (the ones
        before are covered by it: one copy stream). Sends the layer's row of slot_of."""
        queued = self._landing.pop(layer, [])
        last = max((i for i, (slot, _) in enumerate(queued) if slot in slots), default=-1)
        if last + 1 < len(queued):
            self._landing[layer] = queued[last + 1:]
        self.send_row(layer)
        latest = {slot: i for i, (slot, _) in enumerate(queued[:last + 1]) if slot in slots}
        return [queued[i] for i in sorted(latest.values())]

    def send_row(self, layer: int) -> None:
        """The device gets the layer's row of slot_of if it changed (in stream order, no host sync)."""
        if layer in self._dirty:
            self._dirty.discard(layer)
            row = torch.tensor(self._rows[layer], dtype=torch.long)
            if self.device.type == "cuda":  # from pinned memory, so the copy is asynchronous; the caching host
                row = row.pin_memory()      # allocator keeps the buffer until the copy has run
            self.slot_of[layer].copy_(row, non_blocking=True)

    def sync_all(self) -> None:
        for layer in range(self.num_layers):
            self.sync_layer(layer)

    def all_resident(self) -> bool:
        return len(self.resident) == self.num_layers * self.num_experts

    def reset_counters(self) -> None:
        self.counters = StoreCounters()
