"""The detection statistics a method's ``detect`` can report (``Method.statistic``): their display
name and their expected value for an unwatermarked model. Kept free of torch, so that rendering a
leaderboard does not import it."""

from __future__ import annotations

import math

STATISTICS: dict[str, tuple[str, float]] = {
    "pearson_r": ("Pearson r", 0.0),
    "bit_accuracy": ("bit accuracy", 0.5),
    "z_score": ("z score", 0.0),
}

STATISTIC_RANGES: dict[str, tuple[float, float]] = {
    "pearson_r": (-1.0, 1.0),
    "bit_accuracy": (0.0, 1.0),
    "z_score": (-math.inf, math.inf),
}
"""The values each statistic can take: its mean's interval over seeds is cut to them."""
