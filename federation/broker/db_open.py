"""What an administrator reads when a server command cannot open its database.

``parallex broker``, ``parallex dashboard`` and ``parallex db`` open the database named by
``--db-url`` (or PARALLEX_DB_URL) as they start. A URL that is not one, a driver Parallex does
not ship, a server that is down or a login it refuses were tracebacks from SQLAlchemy's
connection pool; they are now one line saying which database, what went wrong and what to
check, with the URL's password hidden.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from ..errors import DatabaseUnavailable

#: URL schemes Parallex supports (with or without a driver, e.g. postgresql+psycopg).
SUPPORTED = ("sqlite", "postgresql", "postgres")

EXPECTED = ("expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE")


def shown(url: str) -> str:
    """The URL as it may be printed: its password hidden, or a placeholder if unparsable."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def check_url(url: str) -> None:
    """Refuse a URL that is not a database URL Parallex can open, before any driver loads."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        raise DatabaseUnavailable(f"the database URL {url!r} is not a database URL; {EXPECTED} "
                                  "(--db-url or PARALLEX_DB_URL)") from None
    if backend not in SUPPORTED:
        raise DatabaseUnavailable(f"Parallex keeps its books in SQLite or PostgreSQL, not "
                                  f"{backend!r} ({shown(url)}); {EXPECTED}")


@contextmanager
def opening(url: str) -> Iterator[None]:
    """Check ``url``, then turn SQLAlchemy's errors raised inside into DatabaseUnavailable."""
    check_url(url)
    try:
        yield
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise DatabaseUnavailable(f"cannot load the driver for {shown(url)} ({exc}); "
                                  f"{EXPECTED}") from exc
    except DBAPIError as exc:
        # The driver's own first line says what failed (refused connection, bad password,
        # missing file or database); SQLAlchemy's wrapping adds only a link.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(
            f"cannot open the database {shown(url)}: {reason}. Check --db-url (or "
            "PARALLEX_DB_URL), that the database server is running and reachable, and that "
            "its user may log in") from exc
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(f"the database {shown(url)} failed: {exc}") from exc
