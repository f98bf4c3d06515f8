"""What a decode loop needs besides the model: sampling settings and the sampler, the outputs of a batch (each
row stopping at EOS or its length), the record of one generate call, the device clock that times steps without
syncing, and the padding of prompts. Shared by the runtime's loops, SpecMoE's and the accelerate peer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .errors import BadInput


@dataclass
class SamplingSettings:
    """temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | None = None  # None: never stop early (fixed output length, as benchmarks want)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise BadInput(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise BadInput(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"top_p={self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """What one engine produced for one batch, with the timing of every decode step."""

    tokens: list[list[int]]  # generated ids per sequence (prompt excluded), cut after EOS
    prompt_lens: list[int]
    t_start: float  # perf_counter before prefill
    t_first: float  # perf_counter when the first token of every sequence was known (TTFT)
    step_times: list[float]  # perf_counter after each decode step (after device sync)
    step_tokens: list[int]  # tokens emitted across the batch at each step (speculation emits several)
    t_end: float
    stats: dict  # expert-store counters (StoreCounters) during generation; `seq_steps`: decode steps summed over
    # the sequences that took them (tokens_per_step = sum(step_tokens) / seq_steps); `weight_read_bytes`: weight
    # bytes the forwards read from device memory (non-expert weights plus each layer's distinct experts);
    # speculative engines add drafted_tokens, accepted_tokens, draft_time_s, verify_time_s, draft_h2d_bytes,
    # verify_h2d_bytes
    step_rows: list[int] | None = None  # rows still generating when each decode step began (None: not recorded)


class Sampler:
    """Greedy argmax on the device, or seeded temperature / top-p sampling on the CPU, so every device draws
    the same numbers."""

    def __init__(self, settings: SamplingSettings):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Target distribution after temperature and top-p. logits [..., V] -> probs [..., V] float64 on CPU."""
        s = self.settings
        p = torch.softmax(logits.double().cpu() / s.temperature, dim=-1)
        if s.top_p < 1:
            sorted_p, order = p.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # keep the smallest prefix reaching top_p
            p = torch.zeros_like(p).scatter(-1, order, sorted_p * keep)
            p = p / p.sum(-1, keepdim=True)
        return p

    def next(self, logits: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row from logits [B, V]: (on the device, on the host). Waits for the device."""
        if self.settings.greedy:
            tok = logits.argmax(-1)
            return tok, tok.cpu()
        host = torch.multinomial(self.probs(logits), 1, generator=self.generator)[:, 0]
        return host.to(device), host

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.next(logits, logits.device)[1]


class Outputs:
    """The generated tokens of a batch, kept in one host tensor: each row stops at EOS or at max_new_tokens."""

    def __init__(self, batch: int, settings: SamplingSettings):
        self.settings = settings
        self.buffer = torch.zeros((batch, settings.max_new_tokens), dtype=torch.long)
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.changed = True  # `done` changed since the last RowMask read

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    @property
    def rows_left(self) -> int:
        """Rows still generating."""
        return int((~self.done).sum())

    @property
    def tokens(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.buffer.tolist(), self.lengths.tolist())]

    def emit_block(self, new: torch.Tensor, counts: torch.Tensor) -> int:
        """Append row i's first counts[i] tokens of new [B, W] (host), each row cut at its EOS or its last allowed
        token; finished rows take nothing. Returns how many tokens were kept across the batch."""
        B, W = new.shape
        j = torch.arange(W)[None, :]
        n = torch.where(self.done, 0, counts.clamp(max=W))
        eos = self.settings.eos_token_id
        if eos is not None:
            is_eos = (new == eos) & (j < n[:, None])
            n = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, n)
            hit_eos = is_eos.any(1)
        n = torch.minimum(n, self.settings.max_new_tokens - self.lengths)
        rows, cols = (j < n[:, None]).nonzero(as_tuple=True)
        self.buffer[rows, self.lengths[rows] + cols] = new[rows, cols]
        self.lengths += n
        done = self.done | (self.lengths >= self.settings.max_new_tokens)
        if eos is not None:
            done |= hit_eos & (n > 0)
        self.changed = self.changed or bool((done != self.done).any())
        self.done = done
        return int(n.sum())

    def emit_all(self, next_tok: torch.Tensor) -> int:
        """One new token per row ([B], host); finished rows ignore theirs."""
        return self.emit_block(next_tok[:, None], torch.ones_like(next_tok))

    def emit(self, row: int, new: list[int]) -> int:
        """Append one row's new tokens up to its stop; returns how many were kept."""
        block = torch.zeros((len(self.done), max(1, len(new))), dtype=torch.long)
        counts = torch.zeros(len(self.done), dtype=torch.long)
        block[row, :len(new)] = torch.tensor(new, dtype=torch.long)
        counts[row] = len(new)
        return self.emit_block(block, counts)


class DeviceClock:
    """Host-clock times of points in the device's stream: an event per point, resolved once at the end against an
    anchor event recorded when the host clock read `t0` (right after a sync, so the device was at that point).
    On the CPU every point is already done when it is stamped: it is a host clock reading."""

    def __init__(self, device, t0: float):
        self.cuda = torch.device(device).type == "cuda"
        self.t0, self.stamps = t0, []
        if self.cuda:
            self.anchor = torch.cuda.Event(enable_timing=True)
            self.anchor.record()

    def stamp(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())

    def times(self) -> list[float]:
        if not self.cuda:
            return list(self.stamps)
        if self.stamps:
            self.stamps[-1].synchronize()
        return [self.t0 + self.anchor.elapsed_time(e) / 1e3 for e in self.stamps]


class RowMask:
    """The rows still generating, as a device tensor sent again only when a row finishes."""

    def __init__(self, out: Outputs, device):
        self.out, self.device, self.mask = out, device, None

    def device_mask(self) -> torch.Tensor:
        if self.mask is None or self.out.changed:
            self.mask = (~self.out.done).to(self.device)
            self.out.changed = False
        return self.mask


def right_pad(prompts: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] with every prompt from column 0 (column = position), and the prompt lengths [B]."""
    check_prompts(prompts)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    return ids.to(device), torch.tensor([len(p) for p in prompts]).to(device)


def teacher_forcing_batch(prompts: list[list[int]], continuations: list[list[int]], device):
    """Ids, attention mask and positions [B, L] of prompt + continuation minus its last token, left-padded, so that
    one forward gives the logits at each of the C continuation positions in its last C columns (for a plain
    transformers forward, as the accelerate peer runs it)."""
    full = [p + c[:-1] for p, c in zip(prompts, continuations)] if len(continuations[0]) > 1 else prompts
    ids, mask = left_pad(full, device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def left_pad(prompts: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask [B, L], prompts right-aligned so every row's next token lands at column L
    (the layout transformers' generate expects)."""
    check_prompts(prompts)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def check_prompts(prompts: list[list[int]]) -> None:
    if not prompts:
        raise BadInput("empty batch: give at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise BadInput(f"prompt {i} of the batch is empty: every prompt needs at least one token")
