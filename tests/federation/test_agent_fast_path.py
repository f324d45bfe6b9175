"""Agents' frequent requests on the broker's fast path (federation/broker/agent_fast_path.py):
what it takes it answers as the API would; what it cannot take whole reaches the full API with
its body intact and gets the API's own answer, having changed nothing."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.utils.federation import make_federation

HEARTBEAT = "POST /agent/{provider_id}/heartbeat"


@pytest.fixture
def fed(tmp_path):
    """A broker (no minimum between heartbeats, so a test may send them back to back) with
    lab-a (a provider registered through the API, no agent process) and lab-b."""
    fed = make_federation(tmp_path, broker_args=("--min-heartbeat-interval", "0"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b")
        yield fed
    finally:
        fed.stop()


def counts(fed) -> dict[str, float]:
    """The fast path's counter and the HTTP timings' request counts, by label."""
    text = httpx.get(f"{fed.url}/api/v1/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {fed.admin_token}"}).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "parallex_agent_fast_path_total":
                out[s.labels["outcome"]] = s.value
            elif s.name == "parallex_http_request_seconds_count":
                out[f"{s.labels['method']} {s.labels['route']}"] = s.value
    return out


def took(fed, before: dict[str, float]) -> dict[str, float]:
    """What changed in ``counts`` since ``before`` (only what changed)."""
    now = counts(fed)
    return {k: v - before.get(k, 0) for k, v in now.items()
            if v != before.get(k, 0) and k != "GET /metrics"}


def register(fed, lab: str, name: str) -> str:
    answer = httpx.post(f"{fed.url}/api/v1/agent/register", json={
        "name": name, "cpus": 2, "memory": "4 GiB"},
        headers={"Authorization": f"Bearer {fed.provider_tokens[lab]}"})
    assert answer.status_code == 201, answer.text
    return answer.json()["provider_id"]


def offering(fed, provider_id: str) -> int:
    return fed.db_value(f"SELECT offering FROM provider WHERE id = '{provider_id}'")


def test_well_formed_requests_are_answered_on_the_fast_path(fed):
    box = register(fed, "lab-a", "box")
    api = f"{fed.url}/api/v1/agent/{box}"
    agent = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    before = counts(fed)

    beat = httpx.post(f"{api}/heartbeat", headers=agent,
                      json={"running": [], "offering": False, "offer_note": "owner at work"})
    assert (beat.status_code, beat.json()) == (200, {"ok": True})
    assert offering(fed, box) == 0  # recorded before the answer
    polled = httpx.get(f"{api}/leases", params={"wait": "0"}, headers=agent)
    assert polled.status_code == 200, polled.text
    assert polled.json()["leases"] == [] and polled.json()["version"]
    # A long poll that nothing wakes ends after its wait (up to a quarter early, at random).
    waited = httpx.get(f"{api}/leases", params={"since": polled.json()["version"],
                                                "wait": "0.4"}, headers=agent)
    assert waited.status_code == 200 and waited.json() == polled.json()
    unknown = httpx.post(f"{api}/leases/ls-notalease01/state", headers=agent,
                         json={"state": "running"})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown-lease"
    # Chunked, in many pieces: the body is put together before it is read.
    pieces = [b'{"running": [], ', b'"offering": ', b"true}"]
    chunked = httpx.post(f"{api}/heartbeat", content=iter(pieces),
                         headers={**agent, "Content-Type": "application/json"})
    assert chunked.status_code == 200, chunked.text
    assert offering(fed, box) == 1

    # All five on the fast path, and timed under their routes as before.
    assert took(fed, before) == {"answered": 5, HEARTBEAT: 2,
                                 "POST /agent/{provider_id}/leases/{lease_id}/state": 1}


def test_refusals_on_the_fast_path_are_the_apis_own(fed):
    box = register(fed, "lab-a", "box")
    other = register(fed, "lab-b", "other-box")
    agent = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    user = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
    body = {"running": []}
    before = counts(fed)
    cases = [
        (httpx.post(f"{fed.url}/api/v1/agent/{box}/heartbeat", json=body), 401,
         "missing-token"),
        # Wrong twice (no token, a body that does not validate): the token is checked first.
        (httpx.post(f"{fed.url}/api/v1/agent/{box}/heartbeat", json={"running": "x"}), 401,
         "missing-token"),
        (httpx.post(f"{fed.url}/api/v1/agent/{box}/heartbeat", json=body,
                    headers={"Authorization": "Bearer px_not-a-token"}), 401, "bad-token"),
        (httpx.post(f"{fed.url}/api/v1/agent/{box}/heartbeat", json=body, headers=user),
         403, "wrong-token-kind"),
        # Another lab's machine answers exactly as an unknown one.
        (httpx.post(f"{fed.url}/api/v1/agent/{other}/heartbeat", json=body, headers=agent),
         404, "unknown-provider"),
        (httpx.get(f"{fed.url}/api/v1/agent/{other}/leases", headers=agent), 404,
         "unknown-provider"),
        (httpx.post(f"{fed.url}/api/v1/agent/prv_nosuchbox/heartbeat", json=body,
                    headers=agent), 404, "unknown-provider"),
    ]
    for answer, status, code in cases:
        assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
        assert answer.json()["message"]
    assert took(fed, before) == {"answered": len(cases), HEARTBEAT: 6}
    assert offering(fed, other) == 1


def test_what_the_fast_path_cannot_take_reaches_the_api_intact(fed):
    box = register(fed, "lab-a", "box")
    api = f"{fed.url}/api/v1/agent/{box}"
    agent = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    before = counts(fed)

    refused = [
        (httpx.post(f"{api}/heartbeat", headers=agent, json={"running": "ls-notalist01"}),
         422, "invalid-request", "running: Input should be a valid list"),
        (httpx.post(f"{api}/heartbeat", headers=agent,
                    json={"running": ["bad id"], "offering": False}),
         422, "invalid-request", "running.0: String should match pattern"),
        (httpx.post(f"{api}/heartbeat", headers={**agent, "Content-Type": "application/json"},
                    content=b'{"running": [], "offering": fal'),
         400, "malformed-json", "the request body is not valid JSON"),
        # Wrong twice (no token, not JSON): FastAPI reads the body before the token.
        (httpx.post(f"{api}/heartbeat", headers={"Content-Type": "application/json"},
                    content=b'{"running": [], "offering": fal'),
         400, "malformed-json", "the request body is not valid JSON"),
        (httpx.post(f"{api}/leases/ls-notalease01/state", headers=agent,
                    json={"state": "exploded"}), 422, "invalid-request", "state: Input should be"),
        (httpx.get(f"{api}/leases", params={"wait": "soon"}, headers=agent),
         422, "invalid-request", "wait: Input should be a valid number"),
        (httpx.get(f"{api}/leases", params={"wait": "61"}, headers=agent),
         422, "invalid-request", "wait: Input should be less than or equal to 60"),
        (httpx.get(f"{api}/leases", params={"since": "v" * 65}, headers=agent),
         422, "invalid-request", "since: String should have at most 64 characters"),
    ]
    for answer, status, code, message in refused:
        assert answer.status_code == status, answer.text
        assert answer.json()["error"] == code
        assert message in answer.json()["message"], answer.text
    assert offering(fed, box) == 1  # the refused heartbeat that said otherwise wrote nothing
    # A malformed id in the path is not the fast path's route at all.
    bad_path = httpx.post(f"{api}/leases/bad%20id/state", headers=agent,
                          json={"state": "running"})
    assert bad_path.status_code == 422
    assert "lease_id: String should match pattern" in bad_path.json()["message"]

    # Taken whole by the API: a body over 64 KiB (replayed as it came, in pieces) and a
    # query the fast path does not read.
    many = [f"ls-running{i:07d}" for i in range(4000)]
    big = json.dumps({"running": many, "offering": False}).encode()
    assert len(big) > 64 * 1024
    served = [
        httpx.post(f"{api}/heartbeat", headers={**agent, "Content-Type": "application/json"},
                   content=iter([big[i:i + 10_000] for i in range(0, len(big), 10_000)])),
        httpx.get(f"{api}/leases", params={"wait": "0", "extra": "1"}, headers=agent),
    ]
    for answer in served:
        assert answer.status_code == 200, answer.text
    assert offering(fed, box) == 0  # the large heartbeat was recorded
    assert took(fed, before) == {"handed on": len(refused) + len(served), HEARTBEAT: 5,
                                 "POST /agent/{provider_id}/leases/{lease_id}/state": 2}


def test_a_lease_list_on_the_fast_path_is_byte_for_byte_the_apis(fed):
    """The fast path serialises its answers itself (orjson): a lease list with a lease in it
    reads exactly as FastAPI's route answers it, key order and separators included."""
    from federation.tls import ClusterAuthority

    box = register(fed, "lab-a", "box")
    user = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
    cid = httpx.post(f"{fed.url}/api/v1/clusters", headers=user, timeout=30, json={
        "scheduler_address": "tls://127.0.0.1:40000",
        "ca_cert": ClusterAuthority().ca_pem}).raise_for_status().json()["id"]
    httpx.post(f"{fed.url}/api/v1/clusters/{cid}/leases", headers=user, timeout=30, json={
        "spec": {"cpus": 1, "memory": 2**30},
        "workers": [{"lease_id": "ls-bytes00001"}]}).raise_for_status()
    api = f"{fed.url}/api/v1/agent/{box}"
    agent = {"Authorization": f"Bearer {fed.provider_tokens['lab-a']}"}
    before = counts(fed)
    fast = httpx.get(f"{api}/leases", params={"wait": "0"}, headers=agent)
    full = httpx.get(f"{api}/leases", params={"wait": "0", "extra": "1"}, headers=agent)
    assert (fast.status_code, full.status_code) == (200, 200), (fast.text, full.text)
    assert [le["id"] for le in fast.json()["leases"]] == ["ls-bytes00001"]
    assert fast.content == full.content
    assert fast.headers["content-type"] == full.headers["content-type"]
    assert took(fed, before)["answered"] == 1 and took(fed, before)["handed on"] == 1
