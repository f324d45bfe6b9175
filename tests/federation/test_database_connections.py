"""The broker's PostgreSQL connections: a pooled connection is checked before use only after
it sat idle (a check before every use was a round trip in front of every unit of work under
load), and a database that goes away is answered 503 with what to do, never 500, until it
comes back, when the broker carries on by itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from federation.broker import db
from tests.utils.federation import make_federation
from tests.utils.procs import wait_until
from tests.utils.scrape import responses_by_status


def end_backend(url: str, pid: int) -> None:
    """End one server process of PostgreSQL, as a restart or a dropped link would."""
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        wait_until(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                         (pid,)).fetchone()[0] == 0,
                   10, "the ended backend to go")


@contextlib.contextmanager
def database_down(url: str) -> Iterator[None]:
    """The database of ``url`` refuses connections and has dropped those it had, as while
    PostgreSQL restarts; it is back after the block, whatever happened in it."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as pg:
        pg.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            yield
        finally:
            pg.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def backend_pid(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_a_pooled_connection_is_checked_only_after_it_sat_idle(postgres_url):
    # Checked every time (0): a connection that broke while pooled is replaced unnoticed.
    checked = db.plain_engine(postgres_url, ping_after_idle=0)
    try:
        first = backend_pid(checked)
        end_backend(postgres_url, first)
        assert backend_pid(checked) != first
    finally:
        checked.dispose()

    # Used moments ago (the busy broker's case): not checked, so the unit of work that finds
    # it broken fails, and the pool's next connection is a new one.
    busy = db.plain_engine(postgres_url, ping_after_idle=600)
    try:
        first = backend_pid(busy)
        end_backend(postgres_url, first)
        with pytest.raises(OperationalError):
            backend_pid(busy)
        assert backend_pid(busy) != first
    finally:
        busy.dispose()


def test_a_database_that_goes_away_is_answered_503_and_the_broker_recovers(tmp_path,
                                                                           postgres_url):
    # Heartbeats as often as the test sends them (the default asks for 1 s between them).
    fed = make_federation(tmp_path, db_url=postgres_url,
                          broker_args=("--min-heartbeat-interval", "0"))
    db_port = postgres_url.rsplit(":", 1)[1].split("/")[0]
    try:
        fed.add_lab("lab-a", user="alice")
        api = f"{fed.url}/api/v1"
        user = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
        agent = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
        admin = {"Authorization": f"Bearer {fed.admin_token}"}
        pid = httpx.post(f"{api}/agent/register", headers=agent, timeout=30, json={
            "name": "box", "cpus": 2, "memory": "4 GiB"}).raise_for_status().json()[
                "provider_id"]
        # A second token of the lab, never used: its first request must read it.
        unseen = {"Authorization": "Bearer " + httpx.post(
            f"{api}/tokens", headers=admin, timeout=30,
            json={"kind": "provider", "lab": "lab-a"}).raise_for_status().json()["token"]}
        # The other tokens used since the new one was written (which cleared what the broker
        # remembered of tokens): remembered now, so their requests reach the database work.
        beat = (f"{api}/agent/{pid}/heartbeat", {"running": []})
        assert httpx.post(beat[0], json=beat[1], headers=agent, timeout=30).status_code == 200
        assert httpx.get(f"{api}/clusters", headers=user, timeout=30).status_code == 200

        with database_down(postgres_url):
            # A heartbeat that repeats the last one is answered once queued; its batch
            # fails, and from then on heartbeats wait for theirs, answered 503 below.
            queued = httpx.post(beat[0], json=beat[1], headers=agent, timeout=30)
            assert queued.status_code == 200, queued.text
            answers = {
                "user's list": httpx.get(f"{api}/clusters", headers=user, timeout=30),
                "admin's new lab": httpx.post(f"{api}/labs", headers=admin, timeout=30,
                                              json={"name": "lab-new"}),
                "agent's poll": httpx.get(f"{api}/agent/{pid}/leases?wait=0",
                                          headers=agent, timeout=30),
                "agent's new token": httpx.get(f"{api}/agent/{pid}/leases?wait=0",
                                               headers=unseen, timeout=30),
            }
            # Once its batch has failed (the first try, unless it still tries to connect).
            answers["agent's heartbeat"] = wait_until(
                lambda: (answer := httpx.post(beat[0], json=beat[1], headers=agent,
                                              timeout=30)).status_code == 503 and answer,
                30, "a heartbeat to wait for its batch and be answered 503")
        for what, answer in answers.items():
            assert answer.status_code == 503, (what, answer.status_code, answer.text)
        # A heartbeat's batch failed: it says so (the agent sends the next as usual); the
        # others say the database could not answer, and when to try again.
        assert answers.pop("agent's heartbeat").json()["error"] == "heartbeat-not-recorded"
        for what, answer in answers.items():
            body = answer.json()
            assert body["error"] == "database-unavailable", (what, body)
            assert answer.headers.get("Retry-After") == "2", what
            assert "nothing was changed" in body["message"] and "Retry" in body["message"]
            # What the database said (its host and port) stays in the broker's log.
            assert db_port not in body["message"] and "accepting" not in body["message"]

        # Back: the broker opens new connections by itself, and the refused lab never came.
        wait_until(lambda: httpx.get(f"{api}/clusters", headers=user,
                                     timeout=30).status_code == 200,
                   30, "the broker to answer again once the database is back")
        assert httpx.post(beat[0], json=beat[1], headers=agent, timeout=30).status_code == 200
        poll = httpx.get(f"{api}/agent/{pid}/leases?wait=0", headers=agent, timeout=30)
        assert poll.status_code == 200 and poll.json()["leases"] == []
        with psycopg.connect(postgres_url) as pg:
            assert pg.execute("SELECT count(*) FROM lab WHERE name = 'lab-new'").fetchone() == (0,)
        # What a site's monitoring sees: the answers by route and status.
        answered = responses_by_status(api, admin)
        assert answered[("GET", "/clusters", "503")] == 1
        assert answered[("POST", "/labs", "503")] == 1
        assert answered[("GET", "/agent/{provider_id}/leases", "503")] == 2
        assert answered[("POST", "/agent/{provider_id}/heartbeat", "503")] == 1
        assert answered[("POST", "/agent/{provider_id}/heartbeat", "200")] >= 2
        assert not [key for key in answered if key[2] == "500"], answered
        assert httpx.post(f"{api}/labs", headers=admin, timeout=30,
                          json={"name": "lab-new"}).status_code == 201
    finally:
        fed.stop()


def test_the_client_waits_out_a_database_restart(tmp_path, postgres_url, caplog):
    """A notebook's or the CLI's request that meets the database down is retried after the
    Retry-After the broker sends (and says so in the log), and returns once the database is
    back, instead of failing the user's call."""
    from federation.client import BrokerClient

    fed = make_federation(tmp_path, db_url=postgres_url)
    try:
        fed.add_lab("lab-a", user="alice")
        client = BrokerClient(fed.url, fed.user_tokens["alice"])
        assert client.request("GET", "/clusters") == []
        with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING,
                                                            "parallex.client"):
            with database_down(postgres_url):
                listed = pool.submit(client.request, "GET", "/clusters")
                wait_until(lambda: any("HTTP 503" in r.getMessage() for r in caplog.records),
                           30, "the client to meet the database down and wait")
            assert listed.result(timeout=60) == []
        said = next(r.getMessage() for r in caplog.records if "HTTP 503" in r.getMessage())
        assert "GET /api/v1/clusters" in said and "trying again in 2.0 s" in said, said
        assert "database could not answer" in said, said
        client.close()
    finally:
        fed.stop()
