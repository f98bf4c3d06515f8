"""SpecMoE's draft length, chosen by measurement: per batch size, the gamma that maximises expected tokens per second.

The model (one per batch size, kept across generate calls, re-estimated after every step):

    rate(g) = (1 + u_1 + ... + u_g) / (g * t_draft + t_rest(g))        rate(0) = 1 / t_rest(0)

u_j is the share of drafted tokens at position j that were accepted; a token at j is accepted only if every draft
before it was, so 1 + sum u_j is what a row gains from a step of length g, the bonus token included. t_draft is one
draft forward; t_rest(g) is the rest of a step of length g: the verification of g + 1 tokens per row and the host's
work of the step; g = 0 is a plain step (no drafts), the on/off switch. Every row of the batch gains the same
expectation, so the row count cancels. The acceptance counts decay by DECAY per step, so the estimates follow the run
(acceptance changes as the draft experts are refreshed and rows finish); a new step time has weight TIME_WEIGHT,
so a first step that paid a one-time cost (a graph capture) is soon forgotten. A candidate not yet timed is tried first
(largest first, which measures every position at once); after that every PROBE_EVERY steps a neighbour of the best
is timed again (rate is near unimodal in g, so the neighbours are where a better choice appears first).
"""
from __future__ import annotations

DECAY = 0.9  # weight of the past in the acceptance counts, per step
TIME_WEIGHT = 0.5  # weight of a new step time against the estimate so far
PROBE_EVERY = 8  # steps between re-timings of a neighbour of the best gamma


class DraftLengthModel:
    def __init__(self, candidates: list[int]):
        self.candidates = sorted(set(candidates))
        top = max(self.candidates)
        self.drafted = [0.0] * (top + 1)  # [j]: decayed count of tokens drafted at position j (1-based)
        self.accepted = [0.0] * (top + 1)
        self.t_draft: float | None = None  # one draft forward, seconds
        self.t_rest: dict[int, float] = {}  # g -> the rest of a step of length g, seconds
        self.timed_at: dict[int, int] = {}  # g -> the step it was last timed at
        self.steps = 0
        self.chosen: dict[int, int] = {}  # g -> steps it was used for

    def choose(self) -> int:
        """The draft length of the next step."""
        untimed = [g for g in self.candidates if g not in self.t_rest or (g > 0 and self.t_draft is None)]
        if untimed:
            return max(untimed)
        best = self.best()
        if self.steps % PROBE_EVERY == 0 and len(self.candidates) > 1:
            i = self.candidates.index(best)
            near = self.candidates[max(0, i - 1): i + 2]
            return min((g for g in near if g != best), key=lambda g: self.timed_at[g])
        return best

    def best(self) -> int:
        """The candidate of the highest expected rate (the largest while none is timed)."""
        rates = {g: self.rate(g) for g in self.candidates}
        known = {g: r for g, r in rates.items() if r is not None}
        return max(known, key=lambda g: (known[g], -g)) if known else max(self.candidates)

    def expected_tokens(self, g: int) -> float:
        """Tokens a row gains from a step of length g, the bonus included (untried positions count as rejected)."""
        return 1.0 + sum(a / d for a, d in zip(self.accepted[1:g + 1], self.drafted[1:g + 1]) if d > 0)

    def rate(self, g: int) -> float | None:
        """Expected tokens per second per row of a step of length g; None until its parts are timed."""
        if g not in self.t_rest or (g > 0 and self.t_draft is None):
            return None
        return self.expected_tokens(g) / (g * (self.t_draft or 0.0) + self.t_rest[g])

    def record(self, g: int, step_s: float, draft_s: float, drafted: list[int], accepted: list[int]) -> None:
        """One step of length g: its wall time, the part of it spent drafting, and per position j (1-based, index
        j - 1) the tokens drafted there and how many of them were accepted."""
        self.drafted = [x * DECAY for x in self.drafted]
        self.accepted = [x * DECAY for x in self.accepted]
        for j, (d, a) in enumerate(zip(drafted, accepted), start=1):
            self.drafted[j] += d
            self.accepted[j] += a
        if g > 0:
            self.t_draft = _blend(self.t_draft, draft_s / g)
        self.t_rest[g] = _blend(self.t_rest.get(g), step_s - draft_s)
        self.timed_at[g] = self.steps
        self.chosen[g] = self.chosen.get(g, 0) + 1
        self.steps += 1

    def summary(self) -> dict:
        """What the model believes now, for the cell's engine_stats."""
        return dict(candidates=self.candidates, best=self.best(), steps_by_gamma=dict(sorted(self.chosen.items())),
                    draft_forward_ms=None if self.t_draft is None else self.t_draft * 1e3,
                    rest_ms={g: t * 1e3 for g, t in sorted(self.t_rest.items())},
                    acceptance_by_position=[a / d if d > 0 else None for a, d in
                                            zip(self.accepted[1:], self.drafted[1:])],
                    expected_tokens_per_s_per_row={g: self.rate(g) for g in self.candidates})


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - TIME_WEIGHT) * old + TIME_WEIGHT * new
