"""Commands given a database they cannot open, or a number out of range, say so in one line
and exit non-zero: no traceback, and never a database URL's password."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from federation.broker.settings import BrokerSettings

PASSWORD = "hunter2-not-shown"


def parallex(*args: str) -> subprocess.CompletedProcess:
    """`parallex ARGS` as an administrator runs it, in a process of its own (each of these
    exits within seconds; one still running after a minute has started serving, a failure)."""
    return subprocess.run([sys.executable, "-m", "federation.cli", *args], capture_output=True,
                          text=True, timeout=60)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_urls(tmp_path: Path, postgres_server_url: str) -> dict[str, tuple[str, str]]:
    """Each kind of unusable database URL, with what its error must say."""
    server = postgres_server_url.rsplit("/", 1)[0]
    return {
        "not a URL": ("no-scheme-here", "is not a database URL"),
        "unsupported": (f"mysql://root:{PASSWORD}@127.0.0.1/books", "not 'mysql'"),
        "nothing listening": (f"postgresql://parallex:{PASSWORD}@127.0.0.1:{closed_port()}/x",
                              "Connection refused"),
        "no such database": (f"{server}/no_such_database", "does not exist"),
        "missing folder": (f"sqlite:///{tmp_path}/missing/broker.db",
                           "unable to open database file"),
    }


@pytest.mark.parametrize("command", [["db", "upgrade"], ["broker", "--port", "0"],
                                     ["dashboard", "--port", "0", "--dev-user", "alice",
                                      "--schema-wait", "1"],
                                     ["gateway", "--listen", "127.0.0.1:0", "--schema-wait", "1"]],
                         ids=["db", "broker", "dashboard", "gateway"])
def test_a_database_that_cannot_be_opened_is_one_line_naming_it(command, tmp_path,
                                                               postgres_server_url):
    for kind, (url, says) in bad_urls(tmp_path, postgres_server_url).items():
        done = parallex(*command, "--db-url", url)
        assert done.returncode == 1, (kind, done.stdout, done.stderr)
        error = done.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and says in error, (kind, done.stderr)
        assert "Traceback" not in done.stderr, (kind, done.stderr)
        assert PASSWORD not in done.stderr + done.stdout, kind
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("flag, value, says", [
    ("--provider-timeout", "-5", "must be more than 0 seconds, not -5"),
    ("--metering-interval", "0", "must be more than 0 seconds, not 0"),
    ("--token-cache", "-1", "must be at least 0 seconds, not -1"),
    ("--fair-share-half-life", "0", "must be more than 0 hours, not 0"),
    ("--rate-burst", "0.5", "must be at least 1 requests, not 0.5"),
    ("--periodic-niceness", "20", "must be at most 19 nice levels, not 20"),
    ("--periodic-niceness", "-5", "must be at least 0 nice levels, not -5"),
    ("--max-concurrent-requests", "2.5", "expected a whole number, not '2.5'"),
    ("--rate-limit", "fast", "expected a number, not 'fast'"),
])
def test_a_broker_setting_out_of_range_is_refused_before_it_starts(flag, value, says):
    done = parallex("broker", "--port", "0", "--db-url", "sqlite:///:memory:", flag, value)
    assert done.returncode == 2, done.stderr
    assert f"argument {flag}: {says}" in done.stderr


@pytest.mark.parametrize("command, flag, value, says", [
    ("broker", "--port", "70000", "must be a TCP port, 0 to 65535 (0 picks a free one), not 70000"),
    ("up", "--hub-port", "-1", "must be a TCP port, 0 to 65535 (0 picks a free one), not -1"),
    ("dashboard", "--port", "http", "expected a TCP port number, not 'http'"),
    ("dashboard", "--schema-wait", "-1", "must be at least 0 seconds, not -1"),
    ("provide", "--metrics-port", "65536", "must be a TCP port, 0 to 65535"),
    ("provide", "--release-grace", "-1", "must be at least 0 seconds, not -1"),
    ("provide", "--release-grace", "inf", "expected a finite number, not 'inf'"),
])
def test_other_commands_refuse_numbers_out_of_range(command, flag, value, says):
    # Before, a port over 65535 was a traceback from bind() and a negative grace was taken.
    done = parallex(command, flag, value)
    assert done.returncode == 2, done.stderr
    assert f"parallex {command}: error: argument {flag}: {says}" in done.stderr


def test_settings_made_in_code_are_checked_too():
    with pytest.raises(ValueError, match="provider_timeout must be more than 0 s, not -1"):
        BrokerSettings(cloud_prices=None, provider_timeout=-1)
    with pytest.raises(ValueError,
                       match="max_concurrent_requests must be at least 1 requests, not 0"):
        BrokerSettings(cloud_prices=None, max_concurrent_requests=0)
    assert BrokerSettings(cloud_prices=None, token_cache=0).token_cache == 0
    with pytest.raises(ValueError,
                       match="periodic_niceness must be at most 19 nice levels, not 40"):
        BrokerSettings(cloud_prices=None, periodic_niceness=40)
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match=f"metering_interval must be a finite number, "
                                             f"not {value}"):
            BrokerSettings(cloud_prices=None, metering_interval=value)


def test_a_gateway_given_a_bad_address_or_a_busy_port_says_so(tmp_path):
    db = f"sqlite:///{tmp_path / 'broker.db'}"
    assert parallex("db", "upgrade", "--db-url", db).returncode == 0
    done = parallex("gateway", "--listen", "8786", "--db-url", db)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: --listen must be HOST:PORT (e.g. 0.0.0.0:8786); got '8786'" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = parallex("gateway", "--listen", f"127.0.0.1:{port}", "--db-url", db)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr


def test_a_broker_told_where_schedulers_dial_a_gateway_but_not_the_gateway_says_so():
    done = parallex("broker", "--port", "0", "--gateway-internal", "10.0.0.5:8786")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "error: --gateway-internal names where schedulers dial a gateway" in done.stderr


@pytest.mark.parametrize("dates, says", [
    (("--since", "yesterday"), "--since must be a date like 2026-11-01 with --period, not "
                               "'yesterday'"),
    (("--since", "2026-11-01", "--until", "12/01"), "--until must be a date like 2026-11-01 "
                                                    "with --period, not '12/01'"),
])
def test_usage_by_period_refuses_a_date_it_cannot_read(monkeypatch, dates, says):
    # Before, a ValueError's traceback; refused before any request (nothing listens here).
    monkeypatch.setenv("PARALLEX_BROKER_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("PARALLEX_TOKEN", "not-used")
    done = parallex("usage", "--period", "day", *dates)
    assert done.returncode == 1, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
