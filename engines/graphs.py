"""CUDA graphs for forwards that need no host decision: captured once per shape, replayed after.

The way gpt-fast and vLLM do it: static input buffers, a few eager warm-up runs on a side stream (so lazy
allocations and library handles exist before capture), capture into a shared memory pool, then copy new inputs
into the static buffers and replay. A replay runs no Python, so device-side counters are what keep tallies;
the warm-up runs would count twice, so the counters are restored after capture and the first call replays once.
"""
from __future__ import annotations

from typing import Callable

import torch

WARMUP_RUNS = 2


class GraphCache:
    """The graphs of one static cache, in one memory pool (a new cache gets a new cache of graphs and pool)."""

    def __init__(self, device: torch.device, counters: torch.Tensor):
        self.device = torch.device(device)
        self.counters = counters  # tensors the warm-up runs change and the capture must not keep
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def run(self, key: tuple, body: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """body(**inputs) -> a tensor, replayed from a graph captured for `key`. The result is a static buffer:
        it is overwritten by the next replay of the same key, so read (or clone) it before then."""
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(body, inputs)
            self.graphs[key] = entry
        graph, static, out = entry
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return out

    def _capture(self, body, inputs):
        static = {name: value.clone() for name, value in inputs.items()}
        saved = self.counters.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                body(**static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body(**static)
        self.counters.copy_(saved)
        self.captures += 1
        return graph, static, out
