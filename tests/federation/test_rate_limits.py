"""Rate limits: one token's flood is answered 429 and everyone else is still served;
heartbeats have a minimum interval. (How much a flood slows the others is measured in
benchmarks/flood.py, not timed here.)"""

from __future__ import annotations

import time

import httpx

from federation.broker.settings import BrokerSettings
from tests.utils.flood import Flood
from tests.utils.procs import wait_until
from tests.utils.scrape import responses_by_status

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
