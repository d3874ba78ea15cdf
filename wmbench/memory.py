"""Peak memory of a block of work: CUDA max allocated, or the process's resident set on the CPU."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import torch


def resident_mb() -> float | None:
    """This process's resident set size in MiB (Linux /proc), or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb``: on CUDA the allocator's peak during
    the block; on the CPU the largest resident set size sampled every 20 ms during it."""

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = resident_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(resident_mb())

    def _record(self, value: float | None) -> None:
        if value is not None:
            self.peak_mb = max(self.peak_mb or 0.0, value)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._record(resident_mb())
