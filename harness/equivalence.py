"""Output equivalence against the `resident` reference: exact greedy match, first divergence, teacher-forced
top-1 agreement and the largest logit difference."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.base import Engine
from engines.runtime import SamplingSettings


@dataclass
class Equivalence:
    exact_match_rate: float  # share of sequences whose generated tokens equal the reference's exactly
    first_divergence: list[int | None]  # per sequence: first position where the tokens differ, None if never
    teacher_forced_top1: float | None  # share of positions where both argmaxes agree, reference tokens fed in
    max_abs_logit_diff: float | None  # over those positions and the whole vocabulary
    equivalent: bool  # exact_match_rate == 1


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(ref_tokens: list[list[int]], tokens: list[list[int]], ref_logits: torch.Tensor | None = None,
            logits: torch.Tensor | None = None) -> Equivalence:
    """ref_logits / logits: teacher-forced logits [B, C, V] of the reference and the candidate over the same
    (reference) continuation, or None when the candidate cannot be teacher-forced."""
    div = [first_divergence(r, t) for r, t in zip(ref_tokens, tokens)]
    exact = sum(d is None for d in div) / len(div)
    top1 = diff = None
    if ref_logits is not None and logits is not None:
        top1 = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
        diff = (ref_logits.double() - logits.double()).abs().max().item()
    return Equivalence(exact, div, top1, diff, exact == 1.0)


def teacher_forcing_inputs(prompts: list[list[int]], ref_tokens: list[list[int]]) -> list[list[int]]:
    """Continuations of one common length (the shortest reference), so one batched forward scores them."""
    n = min(len(t) for t in ref_tokens)
    return [t[:n] for t in ref_tokens]


def check_engine(engine: Engine, prompts: list[list[int]], settings: SamplingSettings, ref_tokens: list[list[int]],
                 ref_logits: torch.Tensor | None, tokens: list[list[int]] | None = None) -> Equivalence:
    """Compare a loaded engine with reference outputs; generates unless `tokens` are given."""
    if tokens is None:
        tokens = engine.generate(prompts, settings).tokens
    logits = None
    if ref_logits is not None:
        logits = engine.teacher_forced_logits(prompts, teacher_forcing_inputs(prompts, ref_tokens))
    return compare(ref_tokens, tokens, ref_logits, logits)


def reference(engine: Engine, prompts: list[list[int]], settings: SamplingSettings):
    """Tokens and teacher-forced logits of a loaded reference engine (normally `resident`)."""
    tokens = engine.generate(prompts, settings).tokens
    return tokens, engine.teacher_forced_logits(prompts, teacher_forcing_inputs(prompts, tokens))
