"""Argument checks shared by the host-side modules: one wording for every refused integer."""

from __future__ import annotations

import numpy as np

__all__ = ["check_int"]


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Returns `value` as an int when it is one (bools excluded) within `[minimum, maximum]`.

    Raises:
        ValueError: naming `name`, the value and the limit.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}={value!r} must be an int")
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name}={value} must be in [{minimum}, {maximum}]")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)
