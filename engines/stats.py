"""What one generate call counted (Generation.stats), typed: the expert-store counters, decode steps, and the
speculation counters of engines that draft. A counter an engine does not keep stays None (not measured)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    # the expert store (runtime.StoreCounters) during the call
    h2d_bytes: int | None = None  # expert bytes copied host -> device
    h2d_copies: int | None = None
    hits: int | None = None  # expert requests served by a device-resident copy
    misses: int | None = None  # expert requests that needed a copy
    seq_steps: int | None = None  # decode steps summed over the sequences that took them
    weight_read_bytes: int | None = None  # weight bytes the forwards read from device memory
    # speculation
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    draft_time_s: float | None = None
    verify_time_s: float | None = None
    draft_h2d_bytes: int | None = None
    verify_h2d_bytes: int | None = None
    # timed by the harness around the call
    host_gc_ms: float | None = None  # Python's garbage collector inside the call
    extra: dict = field(default_factory=dict)  # engine-specific counters (spec_steps, draft_substituted, ...)

    @classmethod
    def of(cls, stats: "GenerationStats | dict | None") -> "GenerationStats":
        """Typed stats from what an engine returned: this class already, or a dict keyed by the field names
        (the form engines return today); keys that are not fields go to `extra`."""
        if isinstance(stats, cls):
            return stats
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        given = dict(stats or {})
        extra = {k: given.pop(k) for k in list(given) if k not in names}
        return cls(**given, extra=extra)
