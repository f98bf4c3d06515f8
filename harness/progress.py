"""Progress over cells and over tokens within a cell: a redrawn bar when stderr is a terminal, plain lines when
it is not (CI logs, pipes), nothing with `quiet` but the warnings (`note`)."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, stream=None, tty: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.quiet = quiet
        self.total = 0
        self.done = 0
        self.current = ""
        self.expected_tokens = 0
        self.phase = ""
        self.tokens = 0
        self.t_cell = 0.0
        self.lock = threading.Lock()  # progress lines arrive from the reader thread

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def cell_start(self, cell) -> None:
        with self.lock:
            self.current = cell.key()
            self.expected_tokens = cell.batch_size * cell.max_new_tokens * max(cell.min_iterations, 1)
            self.phase, self.tokens, self.t_cell = "start", 0, time.perf_counter()
            if self.quiet:
                return
            if self.tty:
                self._draw()
            else:
                self._line(f"[{self.done + 1}/{self.total}] {self.current} ...")

    def cell_progress(self, event: dict) -> None:
        with self.lock:
            self.phase = event.get("phase", self.phase)
            if self.phase == "measure":
                self.tokens = event.get("tokens", self.tokens)
            if self.tty and not self.quiet:
                self._draw()

    def cell_done(self, cell, result, resumed: bool = False) -> None:
        with self.lock:
            self.done += 1
            if self.quiet:
                return
            status = result.status if result.status != "ok" or result.valid else "ok (invalid)"
            tps = result.metrics.tokens_per_s
            what = f"{tps:.1f} tok/s" if tps is not None else (result.error or "")[:100]
            took = "already finished, skipped" if resumed else f"{time.perf_counter() - self.t_cell:.1f} s"
            if self.tty:
                self.stream.write("\r\033[K")
            self._line(f"[{self.done}/{self.total}] {cell.key()}: {status}, {what} ({took})")

    def note(self, text: str) -> None:
        """A warning about the run (a corrupt cell file measured again): shown even when quiet."""
        with self.lock:
            if self.tty and not self.quiet:
                self.stream.write("\r\033[K")
            self._line(f"warning: {text}")

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self) -> None:
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        tok = f"{self.tokens}/{self.expected_tokens} tokens" if self.phase == "measure" else self.phase
        text = f"[{bar}] {self.done}/{self.total} cells | {self.current[:60]} | {tok}"
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
