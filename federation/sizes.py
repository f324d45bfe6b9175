"""Parsing and formatting of resource sizes (memory in bytes), shared by CLI, broker and client."""

from __future__ import annotations

from dask.utils import format_bytes, parse_bytes

__all__ = ["format_bytes", "parse_memory"]


def parse_memory(value: int | float | str) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a number of bytes or a string with a unit ("4 GiB", "512MB"). Raises ``ValueError``
    with a message a user can act on when the value is not a size or is not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'")
    if isinstance(value, int | float):
        size = int(value)
    elif isinstance(value, str):
        try:
            size = int(parse_bytes(value.strip()))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'"
            ) from exc
    else:
        raise ValueError(f"memory {value!r} is not a size; give bytes or a unit such as '4 GiB'")
    if size <= 0:
        raise ValueError(f"memory must be more than 0 bytes; got {value!r}")
    return size
