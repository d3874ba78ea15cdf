"""A key too small for the threshold: its detector can read its best possible statistic and still
never reach the threshold (12 bits all right give p = 2^-12 = 2.4e-4 against 1e-6). The row said
only "not detected", to be read as the mark's failure; it now says why."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import train_small

from wmbench.api import Detection
from wmbench.detection import ceiling_note, detect
from wmbench.registry import METHODS


def test_a_statistic_at_its_maximum_above_the_threshold_is_said():
    method = SimpleNamespace(statistic="bit_accuracy")
    note = ceiling_note(method, Detection(1.0, 2.0**-12), 1e-6)
    assert note == ("bit accuracy 1 is the most it can read, yet p = 0.000244 is not below the threshold 1e-06: "
                    "this key cannot be detected at this threshold (too few bits for it)")
    assert ceiling_note(method, Detection(1.0, 2.0**-30), 1e-6) is None  # detected
    assert ceiling_note(method, Detection(0.9, 2.0**-8), 1e-6) is None  # below its maximum: the attack's doing
    assert ceiling_note(SimpleNamespace(statistic="z_score"), Detection(40.0, 0.5), 1e-6) is None  # no maximum
    assert ceiling_note(SimpleNamespace(statistic=""), Detection(1.0, 0.5), 1e-6) is None  # undeclared


def test_a_twelve_bit_uchida_key_says_it_cannot_reach_the_threshold(digits):
    model, key = train_small(digits, "uchida", bits=12)
    stat, p, _, detected, note = detect(METHODS.build("uchida", {"bits": 12}), model, key, 1e-6)
    assert stat == 1.0 and not detected and p == 2.0**-12
    assert "cannot be detected at this threshold" in note
    stat, p, _, detected, note = detect(METHODS.build("uchida", {"bits": 12}), model, key, 1e-3)
    assert detected and note is None
