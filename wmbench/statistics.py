"""Interval estimates for published figures: a t interval over seeds, a Wilson interval for k/n."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import special  # not scipy.stats: that import alone takes seconds, and stats.t/norm.ppf call these

# The values a published figure can take; its interval over seeds is cut to them.
PERCENT_RANGE = (0.0, 100.0)  # an error or an accuracy, in %
DELTA_RANGE = (-100.0, 100.0)  # a difference of two errors (error_delta, imperceptibility), in points
LOG10_P_RANGE = (-math.inf, 0.0)
DURATION_RANGE = (0.0, math.inf)
ANY = (-math.inf, math.inf)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval (``low``/``high`` NaN when undefined)."""

    estimate: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return self.text()

    def text(self, digits: int = 2, signed: bool = False) -> str:
        """``mean [low, high]``; the mean alone from one value; ``n/a`` from none."""
        if math.isnan(self.estimate):
            return "n/a"
        spec = f"{'+' if signed else ''}.{digits}f"
        if math.isnan(self.low):
            return _fixed(self.estimate, spec)
        return f"{_fixed(self.estimate, spec)} [{_fixed(self.low, spec)}, {_fixed(self.high, spec)}]"


def _fixed(value: float, spec: str) -> str:
    """``value`` formatted, with a zero written without a sign ("-0.00" and "+0.00" are "0.00")."""
    text = format(value, spec)
    return text.lstrip("+-") if float(text) == 0 else text


def mean_interval(values: Iterable[float], confidence: float = 0.95, bounds: tuple[float, float] = ANY) -> Interval:
    """Mean of ``values`` (NaNs dropped) with Student's t interval, cut to ``bounds``, the range the
    quantity can take (a bit accuracy's [0, 1]: the t interval is symmetric and would pass 1, where
    no mean can lie); one value has no interval, nor has a mean made infinite by an infinite value
    (computed without numpy's invalid-value warnings)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    finite = np.isfinite(x)
    if not finite.all():  # an infinite value (a log10 p of an underflowed p-value): no interval
        signs = set(np.sign(x[~finite]).tolist())
        return Interval(math.nan if len(signs) > 1 else float(x[~finite][0]), math.nan, math.nan, n)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(special.stdtrit(n - 1, 0.5 + confidence / 2) * x.std(ddof=1) / math.sqrt(n))
    low, high = bounds
    return Interval(mean, max(low, mean - half), min(high, mean + half), n)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Share ``k/n`` with the Wilson score interval (Wilson 1927), well behaved at 0 and n."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = float(special.ndtri(0.5 + confidence / 2))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends, not 1e-17 or 0.9999999999999999
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(p, low, high, n)


def share_text(k: int, n: int, confidence: float = 0.95) -> str:
    """``k/n [low%, high%]`` with the Wilson interval rounded outwards (whole percents below 100
    draws, tenths from 100), so the printed interval always contains the computed one; ``n/a``
    when n is 0."""
    if n <= 0:
        return "n/a"
    interval = wilson_interval(k, n, confidence)
    digits = 0 if n < 100 else 1
    scale = 100 * 10**digits
    low = math.floor(interval.low * scale + 1e-9) / 10**digits
    high = math.ceil(interval.high * scale - 1e-9) / 10**digits
    return f"{k}/{n} [{low:.{digits}f}%, {high:.{digits}f}%]"
