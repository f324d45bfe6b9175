"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, run `postgres` on a
free loopback port, hand out a database URL, stop it at the end."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from federation.ports import free_port


def pg_bin() -> Path:
    """The folder of Debian's PostgreSQL server binaries (newest version)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (./dev test "
                       "does this on Debian)")


def server_log(url: str) -> Path:
    """The log of a server ``postgres_server`` started (it writes it beside the data
    folder)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return Path(conn.execute("SHOW data_directory").fetchone()[0]).parent / "postgres.log"


@contextlib.contextmanager
def postgres_server(timeout: float = 60.0, settings: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield ``postgresql://...`` of a fresh server; initdb refuses root, so run as postgres.
    ``settings``: more ``name=value`` server settings (each passed as ``-c``)."""
    import psycopg

    bindir = pg_bin()
    run_as: dict = {}
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="parallex-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if run_as:
        for path in (root, sock):
            os.chown(path, run_as["user"], run_as["group"])
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "parallex",
                    "--no-sync"], check=True, capture_output=True, **run_as)
    port = free_port()
    log = open(root / "postgres.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(sock), "-c", "fsync=off",
         # Each broker replica keeps up to 40 connections; the load benchmark runs up to 6.
         "-c", "max_connections=300", *(arg for kv in settings for arg in ("-c", kv))],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **run_as)
    admin_url = f"postgresql://parallex@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + timeout
        while True:  # ready once it accepts a connection
            try:
                with psycopg.connect(admin_url, autocommit=True) as conn:
                    conn.execute("CREATE DATABASE broker")
                break
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("PostgreSQL did not start: "
                                       + (root / "postgres.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        yield f"postgresql://parallex@127.0.0.1:{port}/broker"
    finally:
        # SIGINT is PostgreSQL's fast shutdown: it does not wait for pooled client connections.
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url``; return its URL."""
    import psycopg

    base, _, _ = server_url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


def rows_read(s, table: str = "lease") -> int:
    """Rows of ``table`` this backend has read in its transactions since its counts last
    reached the statistics (PostgreSQL's own count: a read's is a difference)."""
    from sqlalchemy import text

    seq, fetched = s.connection().execute(text(
        "SELECT seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables "
        "WHERE relname = :table"), {"table": table}).one()
    return (seq or 0) + (fetched or 0)
