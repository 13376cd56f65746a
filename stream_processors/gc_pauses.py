"""Time the interpreter spends in its cyclic garbage collector, per generation; pausing it."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["WORKER_GC_THRESHOLDS", "GcPauses", "cyclic_gc_paused"]

# The worker's and the meter's cyclic collector runs after 50,000 allocations (Python's default:
# 700). What the meter allocates per take lives until the take is sent, and each young collection
# traversed all of it for nothing (records are trees, freed by reference counting): 0.30 s of
# collections per 300,000 events metered at the default, 0.017 s at these (bench/pipeline.py, GC
# seconds from /metrics).
WORKER_GC_THRESHOLDS = (50_000, 20, 20)


class GcPauses:
    """Counts collections and their pauses from `gc.callbacks` until `close()`."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_seconds = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        g, pause = info["generation"], time.perf_counter() - self._started
        self.runs[g] += 1
        self.seconds[g] += pause
        self.max_seconds[g] = max(self.max_seconds[g], pause)

    def summary(self) -> dict[str, Any]:
        """{"gen0": {"runs": n, "max_ms": ms}, ...}"""
        return {
            f"gen{g}": {"runs": self.runs[g], "max_ms": round(self.max_seconds[g] * 1000, 2)}
            for g in range(3)
        }

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic collector off for the block (unless it already was).

    For blocks that allocate many records which stay alive together (the meter pricing a take,
    the sink decoding rows): the collector ran every 700 allocations and moved them through its
    generations, each pass traversing what survived, for nothing: the records are trees (no
    cycles), freed by reference counting. Measured (bench/README.md): a third of the meter's CPU.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
