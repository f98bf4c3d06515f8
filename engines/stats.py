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
    verify_h2d_bytes: int | None = None  # verification's own copies (prefetched experts are counted apart)
    spec_steps: int | None = None  # draft + verify steps
    plain_steps: int | None = None  # steps with speculation off (gamma 0)
    draft_forwards: int | None = None
    drafted_by_position: list[int] | None = None  # [j]: tokens drafted at draft position j + 1
    accepted_by_position: list[int] | None = None  # [j]: of those, accepted
    steps_by_gamma: dict[int, int] | None = None  # draft length -> steps that used it (0: plain steps)
    # draft-guided prefetch (engines/prefetch.py); each prefetched expert is counted once in h2d_bytes too
    prefetch_h2d_bytes: int | None = None
    prefetch_used_bytes: int | None = None  # routed by the verification they were copied for
    prefetch_wasted_bytes: int | None = None  # not routed there
    # timed by the harness around the call
    host_gc_ms: float | None = None  # Python's garbage collector inside the call
    extra: dict = field(default_factory=dict)  # engine-specific counters (draft_substituted, ...)

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
