"""The in-process least-recently-used stores of analyses and models (``wmbench.units``,
``wmbench.prune_groups``, ``wmbench.thief_models``): each module keeps its own ordered dict and
lock, these two functions read and fill them; ``announced_if_slow`` says when an analysis that
fills one takes long."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from typing import Any, Iterator

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


def lru_get(cache: OrderedDict[str, Any], lock: threading.Lock, key: str) -> Any | None:
    """``cache[key]`` marked as used last, or None."""
    with lock:
        found = cache.get(key)
        if found is not None:
            cache.move_to_end(key)
    return found


def lru_put(cache: OrderedDict[str, Any], lock: threading.Lock, key: str, value: Any, size: int) -> None:
    """Store ``value`` under ``key`` as used last, dropping the least recently used beyond ``size``."""
    with lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)
