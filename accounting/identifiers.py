"""The shapes of names people choose (labs, users, sites, labels), checked where they enter.

Pydantic 2 ignores ``regex=``; these are ``StringConstraints(pattern=...)`` types, so a name that
does not match is refused with a 422 before anything reaches the database.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

#: Lab names: a letter or digit, then letters, digits, '_', '.', '-'; at most 64 characters.
LAB_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: User names: as lab names plus '@' and '+' (hub names are claim@institution); at most 128.
USER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$"
#: Site labels and provider names: as lab names, at most 64 (provider names up to 128).
SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PROVIDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
#: Free labels shown to people (cluster names, GPU models, memos): printable ASCII, no
#: control characters, no path or URL specials, at most 128 characters.
LABEL = r"^[A-Za-z0-9][A-Za-z0-9 _.,:()+=-]{0,127}$"
OPTIONAL_LABEL = r"^([A-Za-z0-9][A-Za-z0-9 _.,:()+=-]{0,127})?$"

LabName = Annotated[str, StringConstraints(pattern=LAB_NAME)]
UserName = Annotated[str, StringConstraints(pattern=USER_NAME)]
SiteName = Annotated[str, StringConstraints(pattern=SITE_NAME)]
OptionalSiteName = Annotated[str, StringConstraints(pattern=r"^(" + SITE_NAME[1:-1] + r")?$")]
ProviderName = Annotated[str, StringConstraints(pattern=PROVIDER_NAME)]
Label = Annotated[str, StringConstraints(pattern=LABEL)]
OptionalLabel = Annotated[str, StringConstraints(pattern=OPTIONAL_LABEL)]

NAME_RULES = {
    "lab": "a letter or digit, then letters, digits, '_', '.' or '-', at most 64 characters",
    "user": "a letter or digit, then letters, digits, '_', '.', '@', '+' or '-', at most 128 "
            "characters",
}


def is_lab_name(value: object) -> bool:
    """True when ``value`` is a well-formed lab name."""
    return isinstance(value, str) and re.fullmatch(LAB_NAME, value) is not None


def is_user_name(value: object) -> bool:
    """True when ``value`` is a well-formed user name."""
    return isinstance(value, str) and re.fullmatch(USER_NAME, value) is not None
