"""Argument tests shared by the model layer's checks (a bool is an int to Python, not to us)."""
from __future__ import annotations

import math


def is_int(v) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v) -> bool:
    """An int or a float, not a bool, not NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
