"""Noticing that the user installed packages (``%pip install`` in a cell), so the pool's
workers get them too (FederatedCluster.refresh_environment)."""

from __future__ import annotations

import os
import sys


def site_fingerprint() -> tuple[tuple[str, int], ...]:
    """The modification times of the interpreter's package folders: an install or removal
    adds or deletes entries there, which changes them. Cheap enough to take before every
    cell (a few stat calls, not a scan of the installed distributions)."""
    marks = []
    for path in sys.path:
        if path.endswith(("site-packages", "dist-packages")):
            try:
                marks.append((path, os.stat(path).st_mtime_ns))
            except OSError:
                continue
    return tuple(marks)
