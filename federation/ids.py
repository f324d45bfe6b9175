"""Identifiers of leases, clusters and providers, and the checks made before one becomes part
of a filesystem path or a URL.

Lease ids are chosen by clients, so nobody downstream may trust them: the broker refuses
malformed ids (422) and the agent checks them again before it touches a folder or builds a URL.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

#: A lease id: a letter or digit, then letters, digits, '_' or '-'; 8 to 64 characters.
LEASE_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$"
#: Ids the broker makes (cl_…, prv_…, tok_…): letters, digits, '_' or '-'; 1 to 64 characters.
OBJECT_ID = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"

#: An environment's hash and a wheel's SHA-256 (federation.environment), in paths.
ENVIRONMENT_HASH = r"^[0-9a-f]{32}$"
SHA256 = r"^[0-9a-f]{64}$"
#: Largest row id: PostgreSQL's `integer` (the ids' column type there); a larger one in a path
#: made the database refuse the query, a 500 (found by fuzzing on PostgreSQL).
MAX_ROW_ID = 2**31 - 1


class UnsafeIdentifier(ValueError):
    """An identifier that must not be used as a path segment or URL segment."""


def check_lease_id(value: object) -> str:
    """``value`` when it is a well-formed lease id; raises UnsafeIdentifier otherwise."""
    if not isinstance(value, str) or re.fullmatch(LEASE_ID, value) is None:
        raise UnsafeIdentifier(f"refusing malformed lease id {str(value)[:80]!r}")
    return value


def path_inside(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any name whose resolved path leaves ``folder``."""
    root = folder.resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise UnsafeIdentifier(f"refusing {name!r}: it leads outside {root}")
    return path


def url_segment(value: str) -> str:
    """``value`` percent-encoded as one URL path segment ('/', '?', '#', '.' runs included)."""
    encoded = quote(value, safe="")
    if encoded in (".", ".."):
        raise UnsafeIdentifier(f"refusing {value!r} as a URL segment")
    return encoded
