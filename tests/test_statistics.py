"""The interval estimates behind every published figure."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from wmbench.statistics import mean_interval, share_text, wilson_interval


def test_t_interval_matches_scipy():
    x = [1.0, 2.0, 4.0, 7.0]
    got = mean_interval(x)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert got.estimate == pytest.approx(3.5)
    assert (got.low, got.high) == pytest.approx((low, high))
    assert got.n == 4


def test_t_interval_one_value_and_nans():
    one = mean_interval([2.0, math.nan])
    assert one.estimate == 2.0 and math.isnan(one.low) and one.n == 1
    assert math.isnan(mean_interval([]).estimate)


def test_t_interval_of_infinite_values_has_no_interval_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in subtract" would raise
        inf = mean_interval([-16.4, -math.inf, -math.inf])
        mixed = mean_interval([math.inf, -math.inf, 1.0])
    assert inf.estimate == -math.inf and math.isnan(inf.low) and inf.n == 3
    assert math.isnan(mixed.estimate) and mixed.n == 3


def test_t_interval_is_cut_to_bounds_but_keeps_its_mean():
    free = mean_interval([0.97, 1.0, 1.0])
    cut = mean_interval([0.97, 1.0, 1.0], bounds=(0.0, 1.0))
    assert free.high > 1.0 and cut.high == 1.0
    assert (cut.estimate, cut.low, cut.n) == (free.estimate, free.low, free.n)
    assert mean_interval([0.5], bounds=(0.0, 1.0)).text() == "0.50"  # one value: still no interval


def test_wilson_known_values():
    # Wilson 95% interval of 0/10 is [0, 0.2775]; of 5/10 is [0.2366, 0.7634] (standard tables).
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.2775, abs=1e-4)
    half = wilson_interval(5, 10)
    assert (half.low, half.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    full = wilson_interval(3, 3)
    assert full.high == 1.0 and full.low == pytest.approx(0.4385, abs=1e-4)


def test_wilson_covers_nominal_rate():
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 40, 2000
    hits = sum(wilson_interval(int(k), n).low <= p <= wilson_interval(int(k), n).high for k in rng.binomial(n, p, trials))
    assert 0.92 < hits / trials < 0.98


def test_wilson_ends_are_exact():
    for n in (1, 3, 25, 27, 28, 300, 5700):
        assert wilson_interval(0, n).low == 0.0 and wilson_interval(n, n).high == 1.0


@pytest.mark.parametrize("k,n,text", [
    (3, 3, "3/3 [43%, 100%]"), (0, 3, "0/3 [0%, 57%]"), (1, 3, "1/3 [6%, 80%]"), (2, 3, "2/3 [20%, 94%]"),
    (0, 300, "0/300 [0.0%, 1.3%]"), (4, 300, "4/300 [0.5%, 3.4%]"), (0, 0, "n/a"),
])
def test_share_text_rounds_the_interval_outwards(k, n, text):
    """The printed interval contains the computed one (3/3's lower bound is 43.85%: "44%" claimed more)."""
    assert share_text(k, n) == text
    if n:
        w = wilson_interval(k, n)
        low, high = (float(v.rstrip("%")) / 100 for v in text.split("[")[1].rstrip("]").split(", "))
        assert low <= w.low and high >= w.high
