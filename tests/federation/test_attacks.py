"""The red-team findings of issue 9, each reproduced as an attack against a real broker and real
agents: lease ids as paths and URLs, sub-unit leases, lying providers, stuck leases, 500s and
what 403 vs 404 disclosed. Each test failed before the fix."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import pytest

from federation import FederatedCluster
from federation.agent import ProviderAgent
from federation.ids import UnsafeIdentifier, url_segment
from federation.inventory import Capacity
from federation.tls import ClusterAuthority
from federation.worker_process import lease_folder
from tests.utils.federation import api_client as api
from tests.utils.procs import wait_until

TABLES = ("lab", "user", "apitoken", "provider", "cluster", "lease")

#: Strings that must never pass as an identifier: traversal, URL specials, NUL, huge, non-ASCII.
HOSTILE = ["../../../x", "..", "%2e%2e/etc", "ls-abc/../../x", "../heartbeat?x=",
           "ls-00000000?x=1", "ls-00000000#frag", "ls-0000\x000000", "l" * 10_000,
           "ls-äöü-0000000", "ls-0000 0000"]


@pytest.fixture
def lab_with_fake_provider(federation):
    """lab-a with user alice and a provider registered by the test itself (a fake agent that
    starts nothing), so the test decides what the "agent" reports."""
    fed = federation
    fed.add_lab("lab-a", user="alice")
    provider = api(fed, fed.provider_tokens["lab-a"])
    answer = provider.post("/agent/register", json={"name": "liar", "cpus": 2,
                                                     "memory": "4 GiB"})
    assert answer.status_code == 201, answer.text
    try:
        yield fed, provider, answer.json()["provider_id"]
    finally:
        provider.close()


@pytest.mark.parametrize("lease_id", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_lease_ids_are_refused_and_nothing_written(lab_with_fake_provider, lease_id):
    fed, _provider, _pid = lab_with_fake_provider
    authority = ClusterAuthority()
    with api(fed, fed.user_tokens["alice"]) as user:
        cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": authority.ca_pem}).json()["id"]
        before = fed.db_rows(*TABLES)
        answer = user.post(f"/clusters/{cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"}, "workers": [{"lease_id": lease_id}]})
        assert answer.status_code == 422, answer.text
        assert "lease_id" in answer.json()["message"]
        release = user.post(f"/clusters/{cluster}/leases/release",
                            json={"lease_ids": [lease_id]})
        assert release.status_code == 422, release.text
        assert fed.db_rows(*TABLES) == before


def test_the_agent_never_uses_a_hostile_lease_id_as_a_path(tmp_path):
    """Even if a broker sent one, the agent refuses the id before touching a folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    workdir = tmp_path / "deep" / "agent"
    for bad in ["../../../victim", "../../victim", "..", "a/../../victim"]:
        with pytest.raises(UnsafeIdentifier):
            lease_folder(workdir, bad)
    with pytest.raises(UnsafeIdentifier):
        url_segment("..")
    assert url_segment("../heartbeat?x=") == "..%2Fheartbeat%3Fx%3D"

    async def reconcile() -> None:
        agent = ProviderAgent("http://127.0.0.1:9", "px_unused",
                              Capacity(cpus=1, memory=2**30), workdir=workdir)
        workdir.mkdir(parents=True)
        agent._reconcile([{"id": "../../victim", "state": "releasing"},
                          {"id": "../../victim", "state": "starting"}])
        await asyncio.sleep(0)
        assert agent.workers == {} and agent._stopping == set()
        await agent.client.close()

    asyncio.run(reconcile())
    assert (victim / "precious").read_text() == "keep me"


def test_a_heartbeat_must_list_the_running_leases(lab_with_fake_provider):
    """A body without `running` used to read as "nothing runs" and failed every lease."""
    fed, provider, pid = lab_with_fake_provider
    for body in ({}, {"running": None}, {"running": ["../x"]}):
        answer = provider.post(f"/agent/{pid}/heartbeat", json=body)
        assert answer.status_code == 422, answer.text
    assert provider.post(f"/agent/{pid}/heartbeat", json={"running": []}).status_code == 200


def test_sub_unit_and_oversized_providers_are_refused(lab_with_fake_provider):
    fed, provider, _pid = lab_with_fake_provider
    before = fed.db_rows(*TABLES)
    for body, fragment in [
        ({"name": "big", "cpus": 100_000, "memory": "4 GiB"}, "cpus: Input should be less"),
        ({"name": "big", "cpus": 0.5, "memory": "4 GiB"}, "cpus: Input should be a valid"),
        ({"name": "big", "cpus": 2, "memory": "Infinity"}, "is not a size"),
        ({"name": "big", "cpus": 2, "memory": 2**70}, "memory: Input should be less"),
        ({"name": "big", "cpus": 2, "memory": "4 GiB",
          "gpus": [{"index": i, "model": "NVIDIA H100", "memory": 80e9}
                   for i in range(100_000)]}, "gpus: List should have at most 64 items"),
        ({"name": "../x", "cpus": 2, "memory": "4 GiB"}, "name: String should match"),
        ({"name": "ok", "site": "x'; DROP TABLE lab;--", "cpus": 2, "memory": "4 GiB"},
         "site: String should match"),
    ]:
        answer = provider.post("/agent/register", json=body)
        assert answer.status_code == 422, answer.text
        assert fragment in answer.json()["message"]
    # Within the global bounds but above what the administrator allows for the lab.
    over = provider.post("/agent/register", json={"name": "big", "cpus": 300, "memory": "4 GiB"})
    assert over.status_code == 403, over.text
    assert "lab lab-a may offer at most 256 per machine" in over.json()["message"]
    assert fed.db_rows(*TABLES) == before
    with api(fed, fed.admin_token) as admin:
        raised = admin.patch("/labs/lab-a", json={"provider_max_cpus": 512})
        assert raised.status_code == 200, raised.text
    assert provider.post("/agent/register", json={"name": "big", "cpus": 300,
                                                  "memory": "4 GiB"}).status_code == 201
    with api(fed, fed.user_tokens["alice"]) as user:
        machines = user.get("/labs/lab-a/machines")
    assert machines.status_code == 403  # PIs only


def test_a_provider_that_never_starts_the_worker_is_not_paid(tmp_path):
    """The fake agent reports "running" and lists the lease in every heartbeat without
    starting anything: the lease never runs, fails after the start timeout, the provider earns
    nothing and the cluster asks for a replacement."""
    from tests.utils.federation import make_federation

    fed = make_federation(tmp_path, broker_args=("--start-timeout", "3",
                                                 "--metering-interval", "1"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b")
        provider = api(fed, fed.provider_tokens["lab-b"])
        pid = provider.post("/agent/register", json={"name": "liar", "cpus": 2,
                                                     "memory": "4 GiB"}).json()["provider_id"]
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              heartbeat_interval=0.5) as cluster:
            cluster.scale(1)
            first = next(iter(cluster.live))

            def lie() -> bool:
                leases = provider.get(f"/agent/{pid}/leases").json()["leases"]
                for lease in leases:
                    provider.post(f"/agent/{pid}/leases/{lease['id']}/state",
                                  json={"state": "running"})
                provider.post(f"/agent/{pid}/heartbeat",
                              json={"running": [le["id"] for le in leases]})
                state = fed.db_value(f"SELECT state FROM lease WHERE id = '{first}'")
                assert state in ("starting", "ended"), state
                return state == "ended"

            wait_until(lie, 30, "the never-started lease to fail", interval=0.3)
            row = fed.db_dicts(f"SELECT * FROM lease WHERE id = '{first}'")[0]
            assert row["end_reason"] == "failed"
            assert "did not connect to its scheduler within 3 s" in row["message"]
            assert row["started_at"] is None
            wait_until(lambda: len(cluster.leases) >= 2, 15, "the cluster to ask for another")
        assert fed.db_value("SELECT COUNT(*) FROM usagerecord") == 0
        assert fed.balance("lab-b") == fed.balance("lab-a")  # the liar's lab earned nothing
        provider.close()
    finally:
        fed.stop()


def test_a_lease_whose_end_is_never_reported_ends_lost(tmp_path):
    from tests.utils.federation import make_federation

    fed = make_federation(tmp_path, broker_args=("--release-timeout", "2"))
    try:
        fed.add_lab("lab-a", user="alice")
        provider = api(fed, fed.provider_tokens["lab-a"])
        pid = provider.post("/agent/register", json={"name": "mute", "cpus": 1,
                                                     "memory": "4 GiB"}).json()["provider_id"]
        authority = ClusterAuthority()
        with api(fed, fed.user_tokens["alice"]) as user:
            cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                                   "ca_cert": authority.ca_pem}).json()["id"]
            user.post(f"/clusters/{cluster}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": "ls-stuckrelease1"}]}).raise_for_status()
            user.post(f"/clusters/{cluster}/leases/release",
                      json={"lease_ids": ["ls-stuckrelease1"]}).raise_for_status()
        released = time.monotonic()

        def ended() -> bool:
            provider.post(f"/agent/{pid}/heartbeat", json={"running": ["ls-stuckrelease1"]})
            return fed.db_value("SELECT state FROM lease WHERE id = 'ls-stuckrelease1'") == \
                "ended"

        wait_until(ended, 20, "the stuck releasing lease to end", interval=0.3)
        assert time.monotonic() - released >= 2
        row = fed.db_dicts("SELECT * FROM lease WHERE id = 'ls-stuckrelease1'")[0]
        assert row["end_reason"] == "lost"
        assert "within 2 s of its release" in row["message"]
        provider.close()
    finally:
        fed.stop()


def test_other_peoples_objects_answer_like_unknown_ones(two_labs):
    fed = two_labs
    authority = ClusterAuthority()
    with api(fed, fed.user_tokens["alice"]) as alice, api(fed, fed.user_tokens["bob"]) as bob:
        mine = alice.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                             "ca_cert": authority.ca_pem}).json()["id"]
        for method, path in [("GET", "/clusters/{}"), ("POST", "/clusters/{}/heartbeat"),
                             ("GET", "/clusters/{}/cost"), ("DELETE", "/clusters/{}")]:
            theirs = bob.request(method, path.format(mine))
            unknown = bob.request(method, path.format("cl_000000000000"))
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json()["error"] == unknown.json()["error"]
            assert theirs.json()["message"].replace(mine, "X") == \
                unknown.json()["message"].replace("cl_000000000000", "X")
    with api(fed, fed.provider_tokens["lab-b"]) as provider_b:
        a_pid = fed.db_value("SELECT id FROM provider WHERE name = 'agent-a'")
        answer = provider_b.post(f"/agent/{a_pid}/heartbeat", json={"running": []})
        assert answer.status_code == 404


def test_names_follow_their_pattern_and_numbers_their_bounds(federation):
    fed = federation
    before = fed.db_rows(*TABLES)
    with api(fed, fed.admin_token) as admin:
        for body in ('{"name": ".."}', '{"name": "x\'; DROP TABLE lab;--"}', '{"name": "a/b"}',
                     '{"name": "\u00e9cole"}', '{"name": "' + "x" * 65 + '"}',
                     '{"name": "ok", "share": 1e400}', '{"name": "ok", "share": Infinity}',
                     '{"name": "ok", "share": NaN}', '{"name": "ok", "max_cpus": 1e300}',
                     '{"name": "ok", "max_gpus": ' + str(2**70) + '}'):
            answer = admin.post("/labs", content=body.encode(),
                                headers={"content-type": "application/json"})
            assert answer.status_code == 422, (body, answer.text)
        assert admin.post("/labs", json={"name": "lab-ok"}).status_code == 201
        for user in ("%2e%2e", "a b", "x'; DROP", "alice\x00"):
            answer = admin.put(f"/labs/lab-ok/members/{quote(user, safe='')}", json={})
            assert answer.status_code == 422, (user, answer.text)
        big = admin.get(f"/transfers/{2**70}")
        assert big.status_code == 422, big.text
    after = fed.db_rows(*TABLES)
    assert len(after["lab"]) == len(before["lab"]) + 1
    assert after["user"] == before["user"]


def test_a_worker_memory_limit_is_the_lease_memory_in_bytes(two_labs):
    with FederatedCluster(two_labs.url, two_labs.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5) as cluster:
        cluster.scale(1, memory="768 MiB")
        cluster.wait_for_workers(1)
        (worker,) = cluster.connected_workers()
        assert worker["memory_limit"] == 768 * 2**20
        lease_id = next(iter(cluster.live))
        wait_until(lambda: any(le["id"] == lease_id and le["state"] == "running"
                               for le in cluster.leases), 15,
                   "the broker to mark the confirmed lease running")


def test_worker_keys_are_made_on_the_provider_and_never_pass_through_the_broker(
        lab_with_fake_provider):
    from federation.tls import worker_key_and_request

    fed, provider, pid = lab_with_fake_provider
    fed.add_lab("lab-b", user="bob")
    authority = ClusterAuthority()
    lease = "ls-signme00000001"
    with api(fed, fed.user_tokens["alice"]) as alice, api(fed, fed.user_tokens["bob"]) as bob, \
            api(fed, fed.provider_tokens["lab-b"]) as other_provider:
        cluster = alice.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                                "ca_cert": authority.ca_pem}).json()["id"]
        alice.post(f"/clusters/{cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": lease}]}).raise_for_status()
        (listed,) = provider.get(f"/agent/{pid}/leases").json()["leases"]
        assert listed["state"] == "starting" and listed["cert"] == "" and "key" not in listed

        key, csr = worker_key_and_request(lease)
        _other_key, csr_for_other = worker_key_and_request("ls-someoneelse01")
        before = fed.db_rows(*TABLES)
        for body, fragment in [({"csr": "garbage"}, "not a PEM certificate request"),
                               ({"csr": csr_for_other}, "names 'ls-someoneelse01'")]:
            answer = provider.post(f"/agent/{pid}/leases/{lease}/csr", json=body)
            assert answer.status_code == 422, answer.text
            assert fragment in answer.json()["message"]
        other_pid = other_provider.post("/agent/register", json={
            "name": "other", "cpus": 1, "memory": "1 GiB"}).json()["provider_id"]
        stolen = other_provider.post(f"/agent/{other_pid}/leases/{lease}/csr", json={"csr": csr})
        assert stolen.status_code == 404, stolen.text
        assert fed.db_rows("lease", "cluster") == {k: before[k] for k in ("lease", "cluster")}

        assert provider.post(f"/agent/{pid}/leases/{lease}/csr",
                             json={"csr": csr}).status_code == 202
        (waiting,) = alice.get(f"/clusters/{cluster}/signing-requests").json()["requests"]
        assert waiting == {"lease_id": lease, "csr": csr}
        assert bob.get(f"/clusters/{cluster}/signing-requests").status_code == 404

        before = fed.db_rows("lease")
        wrong = [
            (ClusterAuthority().sign_worker_request(lease, csr), "not signed by this cluster"),
            (authority.issue(lease, "parallex-client").cert, "must be a worker certificate"),
            (authority.worker_credentials(lease).cert, "not for the key of its signing"),
        ]
        for cert, fragment in wrong:
            answer = alice.post(f"/clusters/{cluster}/certificates", json={
                "certificates": [{"lease_id": lease, "cert": cert}]})
            assert answer.status_code == 422, answer.text
            assert fragment in answer.json()["message"]
        assert bob.post(f"/clusters/{cluster}/certificates", json={"certificates": [
            {"lease_id": lease, "cert": wrong[0][0]}]}).status_code == 404
        assert fed.db_rows("lease") == before

        cert = authority.sign_worker_request(lease, csr)
        assert alice.post(f"/clusters/{cluster}/certificates", json={
            "certificates": [{"lease_id": lease, "cert": cert}]}).status_code == 200
        (listed,) = provider.get(f"/agent/{pid}/leases").json()["leases"]
        assert listed["cert"] == cert
        from federation.tls import key_matches
        assert key_matches(listed["cert"], key)
    every_text = repr(fed.db_rows(*TABLES, "usagerecord", "transfer"))
    assert "PRIVATE KEY" not in every_text
