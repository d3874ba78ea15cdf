"""Warn once: a grid repeats its cells (every strength and seed of one architecture, every row of
one training), so a problem they share is logged the first time only."""

from __future__ import annotations

import logging
from collections.abc import Hashable


class Once:
    """The keys already seen, one set per owner (a module of the process, a worker)."""

    def __init__(self) -> None:
        self._seen: set[Hashable] = set()

    def first(self, key: Hashable) -> bool:
        """True the first time ``key`` is given, False after."""
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


_MESSAGES = Once()


def warn_once(log: logging.Logger, message: str) -> None:
    """Log ``message`` as a warning on ``log`` the first time this process gives it there."""
    if _MESSAGES.first((log.name, message)):
        log.warning(message)
