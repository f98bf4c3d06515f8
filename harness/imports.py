"""The garbage collector around the heavy imports (torch, transformers, the engines): they allocate hundreds of
thousands of objects and free almost none, so collecting while they run, and again as the process ends, is CPU spent
for nothing. Measured on this project's 2-core machine: importing them and exiting took 5.3 s of CPU, 3.5 s with
both skipped. Every `run` pays them twice (its parent checks the cells, the cell process measures them)."""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def no_collection():
    """No collection inside the block (imports); the collector as it was after it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def skip_final_collection() -> None:
    """As a process ends: what exists now is never collected, so the interpreter's last collections skip it
    (atexit handlers and buffered output still run). Only at the end: a frozen heap during a cell would change the
    collector pauses it measures."""
    gc.freeze()
