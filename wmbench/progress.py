"""Announcements of slow work at the CLI's default verbosity: ``announced_if_slow`` wraps an
analysis that can take minutes the first time (``wmbench.units``, ``wmbench.prune_groups``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

# Announcements of slow work, at INFO: the CLI shows this logger's INFO lines at its default verbosity.
progress_log = logging.getLogger("wmbench.progress")
SLOW_ANALYSIS_S = 5.0  # an analysis still running after this many seconds is announced


@contextlib.contextmanager
def announced_if_slow(what: str, cached: bool = True) -> Iterator[None]:
    """Log ``analysing <what> for 5 s so far (cached afterwards; large models take minutes)`` at
    INFO on ``progress_log`` once the block has run for ``SLOW_ANALYSIS_S`` seconds (a timer
    thread), and nothing for a block that ends sooner: a small model's analysis goes unannounced.
    ``cached``: whether the analysis will be stored (a model without a structure key's is not)."""
    after = "cached afterwards; " if cached else ""
    message = f"analysing {what} for {SLOW_ANALYSIS_S:g} s so far ({after}large models take minutes)"
    timer = threading.Timer(SLOW_ANALYSIS_S, progress_log.info, (message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
