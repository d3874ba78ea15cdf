"""One warn-once helper (``wmbench.warn_once``) serves the worker's at-chance warning (per worker,
by training), detection's raising carriers() (per process, by method) and pruning's notes (per
process, by message)."""

from __future__ import annotations

import logging

from wmbench import structured_pruning
from wmbench.warn_once import Once, warn_once


def test_a_key_is_first_once_per_owner():
    a, b = Once(), Once()
    assert [a.first("x"), a.first("x"), a.first("y"), b.first("x")] == [True, False, True, True]


def test_a_message_is_logged_once_per_logger_and_pruning_keeps_its_logger(caplog):
    first, second = logging.getLogger("wmbench.test_warn_once.a"), logging.getLogger("wmbench.test_warn_once.b")
    with caplog.at_level(logging.WARNING, logger="wmbench"):
        for _ in range(2):
            warn_once(first, "the same problem")
            warn_once(second, "the same problem")
            warn_once(structured_pruning.log, "prune: test_warn_once's own note")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("wmbench.test_warn_once.a", "the same problem"), ("wmbench.test_warn_once.b", "the same problem"),
        ("wmbench.structured_pruning", "prune: test_warn_once's own note")]
