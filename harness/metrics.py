"""Turn an engine's Generations (one per measured iteration) into the Metrics of a cell.

Definitions (per iteration, then the mean over iterations; `samples` keeps the per-iteration values):
  tokens_per_s          output tokens of all sequences / (t_end - t_start); prefill included
  decode_tokens_per_s   tokens emitted by decode steps / (last step time - t_first); absent with no decode step
  steady_tokens_per_s   the same over the leading decode steps that began with every row of the batch still
                        generating (Generation.step_rows): the rate before the ragged tail of a batch whose rows
                        finish at different steps; absent where the engine does not record step_rows
  prefill_tokens_per_s  prompt tokens of all sequences / TTFT
  ttft_ms               t_first - t_start: the whole batch's first tokens are known
  tpot_ms_pNN           percentiles over every decode step of every iteration of the per-token time of that step
                        for one sequence: step duration / (tokens the step emitted / rows still generating when it
                        began; the batch size where the engine does not record step_rows). For plain decoding that
                        is the step duration; a speculative step that gives each sequence 3 tokens counts a third
                        of its duration per token, also in a ragged tail where few rows are left
  h2d_bytes_per_token   expert bytes copied host -> device / output tokens
  h2d_gb_per_s          those bytes / (t_end - t_start), in 1e9 bytes/s: the copy rate the engine achieved over
                        the whole generate call (compute included); near the link's rate on copy-bound cells
  expert_hit_rate       hits / (hits + misses) of expert requests
  tokens_per_step       tokens a sequence gains per decode step, bonus token included (vLLM's convention):
                        sum(step_tokens) / seq_steps; 1.0 for plain decoding
  acceptance_rate       accepted / drafted tokens; absent for engines that do not draft
  acceptance_by_position  the same per draft position j (drafted there: every live row of a step of length >= j)
  draft_forward_ms, verify_pass_ms   draft / verification time over the draft forwards / verification passes
  gamma_chosen          the draft length of most decode steps over the iterations (0: plain steps)
  prefetch_*_bytes      draft-guided prefetch: copied, used by the verification, wasted (per iteration)
  weight_read_bytes     weight bytes the forwards read from device memory: non-expert weights (less the input
                        embedding, of which only the tokens' rows are read) plus each MoE layer's distinct experts
  bound_tokens_per_s, pct_of_bound, bound   the cell against its hardware bound (harness/bounds.py)
A value that was not measured stays None; nothing defaults to 0.
"""
from __future__ import annotations

import statistics

from engines.runtime import Generation
from engines.stats import GenerationStats

from .schema import Metrics

# Per-iteration values kept in CellResult.samples (significance tests compare these across runs).
# max_step_ms (the longest decode step) and host_gc_ms (Python's garbage collector inside the call, timed by the
# runner) are there to tell an iteration with a stall from a uniformly slow one.
SAMPLE_KEYS = ("tokens_per_s", "decode_tokens_per_s", "steady_tokens_per_s", "prefill_tokens_per_s", "ttft_ms",
               "e2e_latency_ms", "tpot_ms_p50", "h2d_bytes_per_token", "h2d_gb_per_s", "max_step_ms", "host_gc_ms")


def _ratio(num, den) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def iteration_values(g: Generation) -> dict[str, float | None]:
    """The per-iteration metrics of one Generation."""
    out_tokens = sum(len(t) for t in g.tokens)
    e2e = g.t_end - g.t_start
    ttft = g.t_first - g.t_start
    decode_tokens = sum(g.step_tokens)
    decode_time = (g.step_times[-1] - g.t_first) if g.step_times else None
    stats = GenerationStats.of(g.stats)
    return {
        "output_tokens": out_tokens,
        "tokens_per_s": _ratio(out_tokens, e2e),
        "decode_tokens_per_s": _ratio(decode_tokens, decode_time) if decode_tokens else None,
        "steady_tokens_per_s": steady_tokens_per_s(g),
        "prefill_tokens_per_s": _ratio(sum(g.prompt_lens), ttft),
        "ttft_ms": ttft * 1e3,
        "e2e_latency_ms": e2e * 1e3,
        "h2d_bytes": stats.h2d_bytes,
        "h2d_bytes_per_token": _ratio(stats.h2d_bytes, out_tokens),
        "h2d_gb_per_s": None if stats.h2d_bytes is None else stats.h2d_bytes / e2e / 1e9,
        "tpot_ms_p50": percentile(tpot_samples_ms(g), 50),  # this iteration's median, for significance tests
        "max_step_ms": max(((b - a) * 1e3 for a, b in zip([g.t_first] + g.step_times, g.step_times)), default=None),
        "host_gc_ms": stats.host_gc_ms,
    }


def steady_tokens_per_s(g: Generation) -> float | None:
    """Tokens / time of the leading decode steps that began with every row still generating (see the docstring)."""
    if g.step_rows is None:
        return None
    batch, steady = len(g.tokens), 0
    while steady < len(g.step_rows) and g.step_rows[steady] == batch:
        steady += 1
    tokens = sum(g.step_tokens[:steady])
    return _ratio(tokens, g.step_times[steady - 1] - g.t_first) if tokens else None


def tpot_samples_ms(g: Generation) -> list[float]:
    """Per-token time of each decode step for one sequence (see the module docstring)."""
    rows = g.step_rows or [len(g.tokens)] * len(g.step_times)
    out, prev = [], g.t_first
    for t, n, live in zip(g.step_times, g.step_tokens, rows):
        if n > 0:
            out.append((t - prev) * 1e3 * live / n)
        prev = t
    return out


def _sum_stat(gens: list[Generation], key: str) -> float | None:
    """Sum of one engine counter over iterations; None when any iteration lacks it (not measured)."""
    values = [getattr(GenerationStats.of(g.stats), key) for g in gens]
    if not values or any(v is None for v in values):
        return None
    return sum(values)


def _speculation(gens: list[Generation], n: int) -> dict:
    """The Metrics fields of draft lengths, per-position acceptance, forward times and prefetch (absent: None)."""
    stats = [GenerationStats.of(g.stats) for g in gens]
    out = {k: _per_iteration(gens, k, n) for k in ("prefetch_h2d_bytes", "prefetch_used_bytes",
                                                   "prefetch_wasted_bytes")}
    out["draft_forward_ms"] = _ratio(_sum_stat(gens, "draft_time_s"), _sum_stat(gens, "draft_forwards"))
    out["verify_pass_ms"] = _ratio(_sum_stat(gens, "verify_time_s"), _sum_stat(gens, "spec_steps"))
    out = {k: (v * 1e3 if k.endswith("_ms") and v is not None else v) for k, v in out.items()}
    if all(s.drafted_by_position is not None for s in stats):
        drafted = [sum(col) for col in zip(*(s.drafted_by_position for s in stats))]
        accepted = [sum(col) for col in zip(*(s.accepted_by_position for s in stats))]
        out["acceptance_by_position"] = [_ratio(a, d) for a, d in zip(accepted, drafted)]
    if all(s.steps_by_gamma for s in stats):
        steps: dict[int, int] = {}
        for s in stats:
            for gamma, k in s.steps_by_gamma.items():
                steps[int(gamma)] = steps.get(int(gamma), 0) + k
        out["gamma_chosen"] = max(steps, key=lambda gamma: (steps[gamma], gamma))
    return out


def _per_iteration(gens: list[Generation], key: str, n: int) -> int | None:
    total = _sum_stat(gens, key)
    return None if total is None else round(total / n)


def compute(gens: list[Generation]) -> tuple[Metrics, dict[str, list[float]]]:
    """Metrics (means per iteration) and per-iteration samples from the measured Generations."""
    if not gens:
        return Metrics(), {}
    n = len(gens)
    per = [iteration_values(g) for g in gens]
    samples = {k: [p[k] for p in per] for k in SAMPLE_KEYS if all(p[k] is not None for p in per)}
    tpot = [x for g in gens for x in tpot_samples_ms(g)]

    def per_iter(key):  # a counter summed over iterations, reported per iteration
        total = _sum_stat(gens, key)
        return None if total is None else total / n

    out_tokens = sum(p["output_tokens"] for p in per)
    hits, misses = _sum_stat(gens, "hits"), _sum_stat(gens, "misses")
    drafted, accepted = _sum_stat(gens, "drafted_tokens"), _sum_stat(gens, "accepted_tokens")
    seq_steps = _sum_stat(gens, "seq_steps")
    step_tokens = sum(sum(g.step_tokens) for g in gens)
    h2d = _sum_stat(gens, "h2d_bytes")
    draft_s, verify_s = per_iter("draft_time_s"), per_iter("verify_time_s")
    m = Metrics(
        tokens_per_s=_mean(p["tokens_per_s"] for p in per),
        decode_tokens_per_s=_mean(p["decode_tokens_per_s"] for p in per),
        steady_tokens_per_s=_mean(p["steady_tokens_per_s"] for p in per),
        prefill_tokens_per_s=_mean(p["prefill_tokens_per_s"] for p in per),
        ttft_ms=_mean(p["ttft_ms"] for p in per),
        tpot_ms_p50=percentile(tpot, 50),
        tpot_ms_p90=percentile(tpot, 90),
        tpot_ms_p99=percentile(tpot, 99),
        e2e_latency_ms=_mean(p["e2e_latency_ms"] for p in per),
        output_tokens=round(out_tokens / n),
        iterations=n,
        h2d_bytes=None if h2d is None else round(h2d / n),
        h2d_bytes_per_token=_ratio(h2d, out_tokens),
        h2d_gb_per_s=_mean(p["h2d_gb_per_s"] for p in per),
        h2d_copies=None if per_iter("h2d_copies") is None else round(per_iter("h2d_copies")),
        expert_hit_rate=_ratio(hits, None if hits is None or misses is None else hits + misses),
        drafted_tokens=None if drafted is None else round(drafted / n),
        accepted_tokens=None if accepted is None else round(accepted / n),
        acceptance_rate=_ratio(accepted, drafted),
        tokens_per_step=_ratio(step_tokens, seq_steps),
        draft_time_ms=None if draft_s is None else draft_s * 1e3,
        verify_time_ms=None if verify_s is None else verify_s * 1e3,
        draft_h2d_bytes=None if per_iter("draft_h2d_bytes") is None else round(per_iter("draft_h2d_bytes")),
        verify_h2d_bytes=None if per_iter("verify_h2d_bytes") is None else round(per_iter("verify_h2d_bytes")),
        weight_read_bytes=None if per_iter("weight_read_bytes") is None else round(per_iter("weight_read_bytes")),
        **_speculation(gens, n),
    )
    return m, samples
