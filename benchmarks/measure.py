"""Measuring helpers shared by the benchmarks: CPU time of a call and its peak extra resident memory."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PeakMemory", "Spread", "cpu_seconds", "resident_bytes", "spread"]


def resident_bytes() -> int:
    """This process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.extra_mb``: the peak resident memory above the level at entry,
    sampled every ``interval`` seconds by a thread (so short spikes between samples can be missed)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.extra_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._base = resident_bytes()
        self._peak = self._base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, resident_bytes())
        self.extra_mb = (self._peak - self._base) / 2**20


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU seconds (user + system, this process) spent in ``fn()``: less sensitive to other processes on a shared
    machine than wall time."""
    start = time.process_time()
    fn()
    return time.process_time() - start


@dataclass
class Spread:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3g} [{self.low:.3g}-{self.high:.3g}]"


def spread(values: list[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values))
