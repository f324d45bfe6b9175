"""Rate limits: one token's flood is answered 429 and everyone else is still served;
heartbeats have a minimum interval. (How much a flood slows the others is measured in
benchmarks/flood.py, not timed here.)"""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from federation.broker.ratelimit import limit_key
from federation.broker.settings import BrokerSettings
from tests.utils.federation import make_federation
from tests.utils.flood import Flood
from tests.utils.procs import wait_until
from tests.utils.scrape import responses_by_status, samples

FLOODERS = 50


def test_a_flood_from_one_token_is_refused_and_others_are_still_served(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_lab("lab-b", user="bob")
    flood_headers = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    began = time.monotonic()  # before the broker makes the flooding token's bucket
    pid = httpx.post(f"{fed.url}/api/v1/agent/register", headers=flood_headers,
                     json={"name": "flooder", "cpus": 1, "memory": "1 GiB"}).json()["provider_id"]

    # 50 connections polling as fast as the broker answers them (an attacker of its own, on
    # a thread: bob's calls below are another client).
    with Flood(fed.url, fed.provider_tokens["lab-a"], pid, FLOODERS) as flood, \
            httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30, headers={
                "Authorization": f"Bearer {fed.user_tokens['bob']}"}) as bob:
        statuses = flood.statuses
        # Served once the flood is being refused.
        wait_until(lambda: statuses.get(429, 0) >= 100, 30, "the flood to be refused")
        for _ in range(40):
            answer = bob.get("/whoami")
            assert answer.status_code == 200, answer.text
    retry_after = flood.retry_after
    finished = time.monotonic()  # after the flood's last answer
    # The flood was served no more than its bucket gives: the burst, then the rate. (Not
    # "refused more than served": how many refusals a flood collects in a few seconds depends
    # on how fast this machine answers it.)
    limits = BrokerSettings()
    served_at_most = limits.rate_burst + limits.rate_limit * (finished - began)
    assert statuses.get(200, 0) <= served_at_most, (statuses, f"{finished - began:.1f} s")
    assert statuses.get(429, 0) >= 100, statuses
    assert retry_after and all(value.isdigit() for value in retry_after)
    assert statuses.keys() <= {200, 429}, statuses
    # The broker counted them, the refusals under no route (none was matched yet).
    expected = {("GET", "", "429"): statuses[429],
                ("GET", "/agent/{provider_id}/leases", "200"): statuses.get(200, 0)}

    def counted() -> dict:
        answers = responses_by_status(f"{fed.url}/api/v1",
                                      {"Authorization": f"Bearer {fed.admin_token}"})
        return {key: answers.get(key, 0) for key in expected}
    wait_until(lambda: counted() == expected, 10,
               "the broker's count of its answers to match what the client got")


def test_a_flood_of_reports_from_one_token_is_refused_and_others_still_read_theirs(federation):
    """A notebook's script reading usage totals from 50 threads gets the reports' limits (a
    few at once: each holds a request thread and a database connection); another user's
    reports and the flooder's other reads are still answered."""
    fed = federation
    fed.add_lab("lab-a", user="alice")
    fed.add_lab("lab-b", user="bob")
    # One after another, faster than the agents' rate and past its burst: never refused.
    limits = BrokerSettings()
    with httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30, headers={
            "Authorization": f"Bearer {fed.user_tokens['alice']}"}) as alice:
        answers = [alice.get("/usage", params={"by": "user"}).status_code
                   for _ in range(int(limits.rate_burst) + 50)]
    assert set(answers) == {200}, answers
    with Flood(fed.url, fed.user_tokens["alice"], None, FLOODERS, path="/usage",
               params={"by": "user"}) as flood, \
            httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30, headers={
                "Authorization": f"Bearer {fed.user_tokens['bob']}"}) as bob:
        statuses = flood.statuses
        wait_until(lambda: statuses.get(429, 0) >= 100, 30, "the flood to be refused")
        for _ in range(20):
            answer = bob.get("/usage", params={"by": "user"})
            assert answer.status_code == 200, answer.text
    assert statuses.keys() <= {200, 429}, statuses
    assert statuses.get(200, 0) >= 1, statuses  # limited to a few at once, not refused
    assert flood.retry_after and all(value.isdigit() for value in flood.retry_after)
    said = flood.messages
    assert said and all(
        "too many reports at once with this token (at most "
        f"{limits.max_concurrent_reports} in flight); retry after" in message
        for message in said), said
    # Alice's reports have a bucket of their own: her other reads are answered meanwhile.
    with Flood(fed.url, fed.user_tokens["alice"], None, 4, path="/usage") as again, \
            httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30, headers={
                "Authorization": f"Bearer {fed.user_tokens['alice']}"}) as alice:
        wait_until(lambda: again.statuses.get(429, 0) >= 1, 30, "her reports to be refused")
        assert alice.get("/whoami").status_code == 200


def test_a_replica_runs_at_most_its_report_threads_and_the_rest_wait_their_turn(tmp_path):
    """Three users reading reports from 2 connections each (within their own limit) on a
    replica with --report-threads 1: every report is answered, one runs at a time, and the
    others are seen waiting (the metrics a site watches)."""
    fed = make_federation(tmp_path, broker_args=("--report-threads", "1"))
    try:
        for lab, user in (("lab-a", "alice"), ("lab-b", "bob"), ("lab-c", "carol")):
            fed.add_lab(lab, user=user)
        admin = {"Authorization": f"Bearer {fed.admin_token}"}
        seen: list[tuple[float, float]] = []

        def scrape() -> bool:
            found = samples(f"{fed.url}/api/v1/metrics", admin)
            seen.append((found["parallex_reports_running"], found["parallex_reports_waiting"]))
            return seen[-1][1] >= 1

        with contextlib.ExitStack() as floods:
            readers = [floods.enter_context(Flood(fed.url, fed.user_tokens[user], None, 2,
                                                  path="/usage", params={"by": "lab"}))
                       for user in ("alice", "bob", "carol")]
            wait_until(scrape, 30, "a report waiting for the replica's one report thread",
                       interval=0.02)
        assert all(running <= 1 for running, _ in seen), seen
        for reader in readers:
            assert set(reader.statuses) == {200}, reader.statuses  # waited, never refused
        idle = samples(f"{fed.url}/api/v1/metrics", admin)
        assert (idle["parallex_reports_running"], idle["parallex_reports_waiting"]) == (0, 0)
    finally:
        fed.stop()


@pytest.mark.parametrize("method, path, kind", [
    ("GET", "/usage", "reports"),
    ("GET", "/usage/records", "reports"),
    ("GET", "/labs/lab-a/members", "reports"),
    ("GET", "/labs/lab-a/machines/", "reports"),
    ("GET", "/labs/lab-a/ledger", "reports"),
    ("GET", "/transfers/12", "reports"),
    ("GET", "/labs/lab-a/balance", "reads"),
    ("GET", "/whoami", "reads"),
    ("HEAD", "/prices", "reads"),
    ("GET", "/clusters/c1", "token"),
    ("POST", "/clusters", "token"),
    ("DELETE", "/clusters/c1", "token"),
    ("POST", "/agent/p1/heartbeat", "machine"),
    ("POST", "/labs", None),
    ("PUT", "/labs/lab-a/members/ada", None),
    ("POST", "/tokens", None),
])
def test_which_requests_count_against_which_limit(method, path, kind):
    key = limit_key(path, "Bearer t0ken", method, max_concurrent_reports=2)
    if kind is None:
        assert key is None  # an administrator's or a login's write: not limited here
        return
    digest = limit_key("/clusters", "Bearer t0ken").key
    assert key.key == {"reports": f"{digest}:reports", "reads": f"{digest}:reads",
                       "token": digest, "machine": f"{digest}:p1"}[kind]
    assert key.max_concurrent == (2 if kind == "reports" else None)
    # Reads count while in flight only: a client reading one after another is never refused.
    assert key.rate == (kind in ("token", "machine"))
    assert limit_key(path, None, method) is None  # no token: authentication answers it


def test_heartbeats_closer_than_the_minimum_interval_are_refused(federation):
    fed = federation
    fed.add_lab("lab-a")
    with httpx.Client(base_url=f"{fed.url}/api/v1", timeout=30, headers={
            "Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}) as agent:
        registered = agent.post("/agent/register", json={"name": "eager", "cpus": 1,
                                                          "memory": "1 GiB"}).json()
        pid = registered["provider_id"]
        accepted = time.monotonic()  # before the broker can have noted the first one
        first = agent.post(f"/agent/{pid}/heartbeat", json={"running": []})
        second = agent.post(f"/agent/{pid}/heartbeat", json={"running": []})
        assert first.status_code == 200, first.text
        assert second.status_code == 429, second.text
        assert second.headers["retry-after"] == "1"
        assert "heartbeats from one provider must be at least 1 s apart" in \
            second.json()["message"]
        # The interval the broker tells agents is at least twice the minimum.
        assert registered["heartbeat_interval"] >= 2
        deadline = accepted + 10
        while agent.post(f"/agent/{pid}/heartbeat", json={"running": []}).status_code == 429:
            assert time.monotonic() < deadline, "heartbeats stayed refused"
        assert time.monotonic() - accepted >= 1.0
