"""The in-process least-recently-used stores of analyses and models (``wmbench.units``,
``wmbench.prune_groups``, ``wmbench.thief_models``): each module keeps its own ordered dict and
lock, these two functions read and fill them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


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
