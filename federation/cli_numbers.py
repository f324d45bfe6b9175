"""Argparse types for numbers with a range: a value outside it is refused as argparse
refuses a bad type (the flag named, exit status 2), with the unit in the message, instead of
being taken as it comes or failing later with a traceback (a port of 70,000 at bind)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def out_of_range(value: float, least: float, above: bool, unit: str,
                 most: float = math.inf) -> str | None:
    """Why ``value`` is refused (it must be at least ``least``, or more than it with
    ``above``, and at most ``most``; ``unit`` words the message), or None."""
    unit = f" {unit}" if unit else ""
    if above and not value > least:
        return f"must be more than {least:g}{unit}, not {value:g}"
    if not above and not value >= least:
        return f"must be at least {least:g}{unit}, not {value:g}"
    if value > most:
        return f"must be at most {most:g}{unit}, not {value:g}"
    return None


def number(kind: type = float, *, least: float = 0.0, above: bool = False,
           most: float = math.inf, unit: str = "seconds") -> Callable[[str], float | int]:
    """An argparse type reading a finite number of ``kind`` in [least, most] (``above``:
    more than ``least``)."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, "
                f"not {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
        wrong = out_of_range(value, least, above, unit, most)
        if wrong:
            raise argparse.ArgumentTypeError(wrong)
        return value
    return parse


def port(text: str) -> int:
    """An argparse type for a TCP port; 0 asks the system for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number, not {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a TCP port, 0 to 65535 (0 picks a free one), not {value}")
    return value


def host_port_problem(text: str) -> str | None:
    """Why ``text`` is not HOST:PORT (a host, then a TCP port 0-65535), or None."""
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
        return None
    return f"must be HOST:PORT (e.g. 0.0.0.0:8786); got {text!r}"


def host_port(text: str) -> str:
    """An argparse type for a HOST:PORT address."""
    if problem := host_port_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text
