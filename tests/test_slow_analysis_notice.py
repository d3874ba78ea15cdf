"""A unit-group analysis still running after a few seconds says so once, at the CLI's default
verbosity (swin_v2_t's takes minutes the first time); a fast one, or one from the cache, says nothing."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from wmbench import progress, units
from wmbench.cli import main
from wmbench.registry import MODELS


def test_a_slow_unit_group_analysis_is_announced_once_not_when_cached(digits, monkeypatch, caplog):
    monkeypatch.setattr(units, "_CACHE", OrderedDict())
    analyse = units._analyse
    monkeypatch.setattr(units, "_analyse", lambda *a: (time.sleep(0.5), analyse(*a))[1])  # a large model's minutes
    monkeypatch.setattr(progress, "SLOW_ANALYSIS_S", 0.05)
    example = digits.train_x[:2]
    with caplog.at_level(logging.INFO, logger="wmbench.progress"):
        units.unit_groups(MODELS.build("small_cnn").build(digits), example)
        units.unit_groups(MODELS.build("small_cnn").build(digits), example)  # the same structure: from the cache
    said = [r.getMessage() for r in caplog.records if r.name == "wmbench.progress"]
    assert said == ["analysing the dependency graph of Sequential for 0.05 s so far (cached afterwards; large models take minutes)"], said


def test_a_fast_analysis_is_not_announced(digits, monkeypatch, caplog):
    monkeypatch.setattr(units, "_CACHE", OrderedDict())
    with caplog.at_level(logging.INFO, logger="wmbench.progress"):
        units.unit_groups(MODELS.build("small_cnn").build(digits), digits.train_x[:2])
    assert not [r for r in caplog.records if r.name == "wmbench.progress"]


def test_the_announcement_is_shown_at_the_cli_default_verbosity(capsys):
    """The CLI logs WARNING and above without -v; its progress logger passes INFO all the same."""
    assert main(["list", "attacks"]) == 0
    assert progress.progress_log.level == logging.INFO
