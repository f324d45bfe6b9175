"""Parsing and formatting of resource sizes (memory in bytes), shared by CLI, broker and client."""

from __future__ import annotations

import math

from dask.utils import format_bytes, parse_bytes

__all__ = ["GiB", "MiB", "TiB", "format_bytes", "parse_memory"]

MiB = 2**20
GiB = 2**30
TiB = 2**40


def parse_memory(value: int | float | str) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a number of bytes or a string with a unit ("4 GiB", "512MB"). Raises ``ValueError``
    with a message a user can act on when the value is not a size or is not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"memory {value!r} is not a finite size")
    if isinstance(value, int | float):
        size = int(value)
    elif isinstance(value, str):
        if len(value) > 64:
            raise ValueError("memory is not a size: give bytes or a unit such as '4 GiB'")
        try:
            parsed = parse_bytes(value.strip())
            if isinstance(parsed, float) and not math.isfinite(parsed):
                raise ValueError(value)
            size = int(parsed)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(
                f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'"
            ) from exc
    else:
        raise ValueError(f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'")
    if size <= 0:
        raise ValueError(f"memory must be more than 0 bytes; got {value!r}")
    return size
