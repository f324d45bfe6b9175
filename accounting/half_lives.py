"""Default half-lives of the decaying sums, in seconds.

A module of their own, without database imports: the command line's parser and the broker's
settings read them for their help texts, and a provider agent should not import SQLModel to
print its own options.
"""

from __future__ import annotations

#: Fair share: past usage counts half after this long (7 days).
DEFAULT_HALF_LIFE = 7 * 24 * 3600.0
#: Reliability: a past incident counts half after this long (1 day).
DEFAULT_RELIABILITY_HALF_LIFE = 24 * 3600.0
