"""One answer to "is this GPU that model?", for placement and for pricing.

GPU classes (the price table's ``[class, pattern, PCU/hour]``) classify an NVML model name by
the first pattern that matches it. A request names a model either by class ("a100", "h200")
— then a GPU matches when its own class is that class — or by words of the model name
("rtx 4090", "A100-SXM4-80GB") — then every word must be a word of the GPU's name. Substrings
never match: "a10" is the A10 class and does not take an A100.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

GpuClasses = Sequence[Sequence]  # [(class name, pattern, PCU per hour), ...]


def words(model: str) -> set[str]:
    """The lower-case words of a model name (runs of letters and digits)."""
    return set(re.findall(r"[a-z0-9]+", model.lower()))


def class_of(model: str | None, classes: GpuClasses) -> str | None:
    """The first class whose pattern matches ``model`` (case-insensitive), or None."""
    name = (model or "").lower()
    for cls, pattern, _weight in classes:
        if re.search(pattern, name):
            return str(cls)
    return None


def matches(asked: str | None, model: str, classes: GpuClasses) -> bool:
    """True when a GPU named ``model`` serves a request for ``asked`` (None: any GPU)."""
    if not asked or not asked.strip():
        return True
    wanted = asked.strip().lower()
    if wanted in {str(c).lower() for c, _p, _w in classes}:
        return class_of(model, classes) == wanted
    want = words(wanted)
    return bool(want) and want <= words(model)
