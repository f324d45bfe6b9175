"""The broker's hot request path (issue 14's load): remembered tokens are forgotten when they
change, on every replica; heartbeats are recorded in batches whose answer still means
"recorded"; a provider remembered as one lab's stays refused to another lab."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client.parser import text_string_to_metric_families

from federation.tls import ClusterAuthority
from tests.utils.federation import make_federation
from tests.utils.in_process import in_process_broker, scraped
from tests.utils.procs import start_broker, wait_until

#: Seconds a replica may remember a token in these tests: far longer than any wait below, so
#: only the change notification can explain a replica forgetting it in time.
LONG_CACHE = ("--token-cache", "600")


def whoami(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"},
                     timeout=30)


def test_a_revoked_token_or_changed_role_is_seen_at_once_on_every_replica(tmp_path,
                                                                           postgres_url):
    fed = make_federation(tmp_path, db_url=postgres_url, broker_args=LONG_CACHE)
    replica_b, b = start_broker(tmp_path, fed.admin_token, db_url=postgres_url,
                                name="broker-b", extra=LONG_CACHE)
    try:
        fed.add_lab("lab-a")
        fed.add_user("lab-a", "alice", role="member")
        token = fed.user_tokens["alice"]
        # Both replicas now remember alice's token (a member).
        for url in (fed.url, b):
            assert whoami(url, token).json()["role"] == "member"

        admin = fed.admin()  # talks to the first replica
        try:
            admin.request("PUT", "/labs/lab-a/members/alice", json={"role": "pi"})
            assert whoami(fed.url, token).json()["role"] == "pi"  # the same replica: at once
            wait_until(lambda: whoami(b, token).json()["role"] == "pi", 10,
                       "the second replica to see alice's new role")

            token_id = whoami(fed.url, token).json()["token_id"]
            admin.request("DELETE", f"/tokens/{token_id}")
        finally:
            admin.close()
        answer = whoami(fed.url, token)
        assert answer.status_code == 401 and answer.json()["error"] == "revoked-token"
        wait_until(lambda: whoami(b, token).status_code == 401, 10,
                   "the second replica to refuse the revoked token")
        assert whoami(b, token).json()["error"] == "revoked-token"
    finally:
        replica_b.stop()
        fed.stop()


def test_heartbeats_in_batches_are_each_recorded_before_their_answer(any_database):
    federation = any_database
    federation.add_lab("lab-a")
    federation.add_lab("lab-b")
    url = federation.url
    machines = 30

    async def run() -> list[str]:
        headers = {"Authorization": f"Bearer {federation.provider_tokens['lab-a']}"}
        async with httpx.AsyncClient(base_url=f"{url}/api/v1", headers=headers,
                                     timeout=30) as client:
            ids = []
            for i in range(machines):
                answer = await client.post("/agent/register", json={
                    "name": f"m{i}", "cpus": 2, "memory": 2**32, "gpus": []})
                ids.append(answer.raise_for_status().json()["provider_id"])
            # All at once: they share batches, and each answer comes after its own was
            # written (the note is what the provider list shows right after). Even machines
            # also say which environments they have ready (a group of the batch's update of
            # its own); odd ones send none.
            answers = await asyncio.gather(*(client.post(
                f"/agent/{pid}/heartbeat", json={"running": [], "offering": False,
                                                 "offer_note": f"owner of m{i} is typing",
                                                 **environments_of(i)})
                for i, pid in enumerate(ids)))
            assert [a.status_code for a in answers] == [200] * machines
            return ids

    ids = asyncio.run(run())
    admin = federation.admin()
    try:
        listed = {p["id"]: p
                  for p in admin.request("GET", "/labs/lab-a/machines")["machines"]}
    finally:
        admin.close()
    for i, pid in enumerate(ids):
        assert listed[pid]["online"] and not listed[pid]["offering"], listed[pid]
        assert listed[pid]["offer_note"] == f"owner of m{i} is typing"
        assert listed[pid]["environments_ready"] == len(
            environments_of(i).get("environments", [])), listed[pid]
    recorded, batches = heartbeat_batches(url, federation.admin_token)
    assert recorded == machines
    assert 1 <= batches <= machines

    # lab-b's token with lab-a's machine, which this replica now knows from memory: refused
    # exactly like an unknown machine, on the heartbeat and on the long poll.
    other = {"Authorization": f"Bearer {federation.provider_tokens['lab-b']}"}
    for method, path, body in (("POST", f"/agent/{ids[0]}/heartbeat", {"running": []}),
                               ("GET", f"/agent/{ids[0]}/leases", None)):
        answer = httpx.request(method, f"{url}/api/v1{path}", json=body, headers=other,
                               timeout=30)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == "unknown-provider"
    # An unknown machine id: 404 too, and nothing was recorded for it.
    answer = httpx.post(f"{url}/api/v1/agent/prv_000000000000/heartbeat",
                        json={"running": []}, headers=other, timeout=30)
    assert answer.status_code == 404
    assert heartbeat_batches(url, federation.admin_token)[0] == machines


def environments_of(i: int) -> dict:
    """What machine ``i``'s heartbeat says of its ready environments: even machines list
    ``i % 3`` hashes, odd ones say nothing."""
    return {} if i % 2 else {"environments": [f"{k:032x}" for k in range(i % 3)]}


def heartbeat_batches(url: str, admin_token: str) -> tuple[int, int]:
    """(heartbeats recorded, batches that recorded them) from the broker's metrics."""
    text = httpx.get(f"{url}/api/v1/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {admin_token}"}).text
    values = {s.name: s.value for family in text_string_to_metric_families(text)
              for s in family.samples}
    return (int(values["parallex_heartbeat_batch_size_sum"]),
            int(values["parallex_heartbeat_batch_size_count"]))


def test_a_scale_answer_holds_only_the_new_leases(federation):
    """The answer to a lease request reads the new leases, not the cluster's history."""
    from federation.tls import ClusterAuthority

    federation.add_lab("lab-a", user="alice")
    headers = {"Authorization": f"Bearer {federation.user_tokens['alice']}"}
    with httpx.Client(base_url=f"{federation.url}/api/v1", headers=headers,
                      timeout=30) as client:
        provider = httpx.post(f"{federation.url}/api/v1/agent/register", timeout=30, json={
            "name": "m", "cpus": 8, "memory": 2**34, "gpus": []}, headers={
            "Authorization": f"Bearer {federation.provider_tokens['lab-a']}"})
        provider.raise_for_status()
        cid = client.post("/clusters", json={
            "scheduler_address": "tls://127.0.0.1:40000",
            "ca_cert": ClusterAuthority().ca_pem}).raise_for_status().json()["id"]
        first = client.post(f"/clusters/{cid}/leases", json={
            "spec": {"cpus": 1, "memory": 2**30},
            "workers": [{"lease_id": f"ls-first{i}"} for i in range(3)]}).raise_for_status()
        assert sorted(le["id"] for le in first.json()) == [f"ls-first{i}" for i in range(3)]
        second = client.post(f"/clusters/{cid}/leases", json={
            "spec": {"cpus": 1, "memory": 2**30},
            "workers": [{"lease_id": "ls-second0"}]}).raise_for_status().json()
        assert [le["id"] for le in second] == ["ls-second0"]
        # Placed by the pass the request waited for (the machine has room).
        assert second[0]["state"] == "starting", second
        assert second[0]["lab"] == "lab-a"


def test_a_lease_request_with_wait_0_is_answered_before_its_placement_pass(postgres_url):
    """``wait=0`` (the lease keeper's): answered once admitted, its leases pending, while no
    pass can run (the test holds the placement lock); the pass after places them. Its
    refusals still come at once, and a wait over 5 s or under 0 is refused."""
    from sqlalchemy import text

    from federation.broker.placing import PLACEMENT_LOCK

    with in_process_broker(postgres_url, 1) as b:  # 3 CPUs, one running: room for two
        broker = b.app.state.broker
        path = f"/clusters/{b.cid}/leases"
        spec = {"cpus": 1, "memory": "1 GiB"}
        answers: list[httpx.Response] = []
        waited = "parallex_scale_placement_wait_seconds_count"
        waited_before = scraped(b.client, waited)
        with broker.engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK})
            asking = threading.Thread(target=lambda: answers.append(b.call(
                b.user, "POST", f"{path}?wait=0", json={
                    "spec": spec, "workers": [{"lease_id": "ls-nowait0"},
                                              {"lease_id": "ls-nowait1"}]})))
            asking.start()
            # Well under the 5 s a request that waits for its pass would take.
            asking.join(4)
            assert not asking.is_alive(), "the request waited for the placement pass"
            assert answers[0].status_code == 201, answers[0].text
            assert [(le["id"], le["state"]) for le in answers[0].json()] == [
                ("ls-nowait0", "pending"), ("ls-nowait1", "pending")]
            assert scraped(b.client, waited) == waited_before
            # The answer is built from the rows as inserted, not read back: it must say
            # exactly what the cluster's view says of them.
            shown = {le["id"]: le for le in b.call(
                b.user, "GET", f"/clusters/{b.cid}").json()["leases"] if "nowait" in le["id"]}
            assert answers[0].json() == [shown["ls-nowait0"], shown["ls-nowait1"]]
            holder.rollback()  # passes run again

        def states() -> set[str]:
            view = b.call(b.user, "POST", f"/clusters/{b.cid}/heartbeat", json={})
            return {le["state"] for le in view.json()["leases"] if "nowait" in le["id"]}

        wait_until(lambda: states() == {"starting"}, 30, "the pass after to place both")
        # A refusal is not deferred: a worker no machine could ever host, nothing stored.
        refused = b.call(b.user, "POST", f"{path}?wait=0", json={
            "spec": {"cpus": 64, "memory": "1 GiB"}, "workers": [{"lease_id": "ls-toobig0"}]})
        assert refused.status_code == 422 and refused.json()["error"] == "no-provider-fits"
        assert "ls-toobig0" not in {le["id"] for le in b.call(
            b.user, "GET", f"/clusters/{b.cid}").json()["leases"]}
        for wait in ("5.5", "-1", "soon"):
            bad = b.call(b.user, "POST", f"{path}?wait={wait}", json={
                "spec": spec, "workers": [{"lease_id": "ls-badwait0"}]})
            assert bad.status_code == 422, (wait, bad.text)
        assert "ls-badwait0" not in {le["id"] for le in b.call(
            b.user, "GET", f"/clusters/{b.cid}").json()["leases"]}


def _two_machines(federation) -> tuple[str, dict, list[str]]:
    """lab-a with alice, and two registered 2-CPU machines: the API's URL, the lab's agent
    headers and the machines' ids."""
    federation.add_lab("lab-a", user="alice")
    agent = {"Authorization": f"Bearer {federation.provider_tokens['lab-a']}"}
    api = f"{federation.url}/api/v1"
    machines = [httpx.post(f"{api}/agent/register", headers=agent, timeout=30, json={
        "name": f"m{i}", "cpus": 2, "memory": 2**33, "gpus": []}).raise_for_status()
        .json()["provider_id"] for i in range(2)]
    return api, agent, machines


def _user(federation) -> httpx.Client:
    """alice's client of the API."""
    return httpx.Client(base_url=f"{federation.url}/api/v1", timeout=30, headers={
        "Authorization": f"Bearer {federation.user_tokens['alice']}"})


def _running_cluster(user: httpx.Client, machines: list[str],
                     prefix: str) -> tuple[str, dict[str, str]]:
    """A cluster whose four 1-CPU leases fill both machines and run (their workers joined):
    its id and each lease's machine."""
    from federation.tls import ClusterAuthority

    cid = user.post("/clusters", json={
        "scheduler_address": "tls://127.0.0.1:40000",
        "ca_cert": ClusterAuthority().ca_pem}).raise_for_status().json()["id"]
    leases = user.post(f"/clusters/{cid}/leases", json={
        "spec": {"cpus": 1, "memory": 2**30},
        "workers": [{"lease_id": f"{prefix}{i}"} for i in range(4)]}).raise_for_status().json()
    on = {le["id"]: le["provider_id"] for le in leases}
    assert sorted(on.values()) == sorted(machines * 2), on  # 2 CPUs each: full
    # Their workers joined: running (and metered) from now.
    user.post(f"/clusters/{cid}/heartbeat", json={"connected": list(on)}).raise_for_status()
    return cid, on


def test_a_heartbeat_without_a_running_lease_ends_it_and_only_its_own(any_database):
    """Heartbeat batches find overdue leases from columns: the machine's agent no longer
    lists a running lease, so it ends failed (before the heartbeat is answered); the same
    batch leaves the machine's other running lease (listed) and another machine's running
    lease alone."""
    federation = any_database
    api, agent, machines = _two_machines(federation)
    with _user(federation) as user:
        cid, on = _running_cluster(user, machines, "ls-beat")
        first = machines[0]
        mine = sorted(lid for lid, pid in on.items() if pid == first)
        # The first machine lists one of its two leases, and the other machine's leases too
        # (as if to keep them alive); the other machine sends nothing.
        listed = [mine[0]] + [lid for lid, pid in on.items() if pid != first]
        httpx.post(f"{api}/agent/{first}/heartbeat", headers=agent, timeout=30,
                   json={"running": listed}).raise_for_status()
        states = {le["id"]: le for le in user.get(f"/clusters/{cid}").json()["leases"]}
    assert states[mine[1]]["state"] == "ended"
    assert states[mine[1]]["end_reason"] == "failed"
    assert "reports no worker process" in states[mine[1]]["message"]
    assert all(states[lid]["state"] == "running" for lid in on if lid != mine[1]), states


def test_reports_in_batches_count_on_their_own_and_refusals_write_nothing(federation):
    """Agents' reports arrive together and share batches: each answer comes after its own
    change was committed, and a report refused in the batch (another machine's lease, a
    move its lease cannot make) is refused alone, writing nothing, while the rest count."""
    api, agent, machines = _two_machines(federation)
    with _user(federation) as user:
        cid, on = _running_cluster(user, machines, "ls-report")
        (a, b), (c, d) = (sorted(lid for lid in on if on[lid] == m) for m in machines)
        user.post(f"/clusters/{cid}/leases/release",
                  json={"lease_ids": [d]}).raise_for_status()
        before = {le["id"]: le for le in user.get(f"/clusters/{cid}").json()["leases"]}

        sent = [(machines[0], a, {"state": "ended"}),                    # the worker left
                (machines[0], b, {"state": "suspended", "message": "owner back"}),
                (machines[1], a, {"state": "ended"}),                    # not its lease
                (machines[1], c, {"state": "releasing", "reason": "preempted"}),
                (machines[1], d, {"state": "suspended"})]                # releasing already

        async def report_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=api, headers=agent, timeout=30) as client:
                return await asyncio.gather(*(client.post(
                    f"/agent/{pid}/leases/{lid}/state", json=body) for pid, lid, body in sent))

        answers = asyncio.run(report_all())
        assert [r.status_code for r in answers] == [200, 200, 404, 200, 409], [
            r.text for r in answers]
        assert answers[2].json()["error"] == "unknown-lease"
        assert "only a running lease can be suspended" in answers[4].json()["message"]
        assert answers[0].json() == {"id": a, "state": "ended", "end_reason": "failed"}
        assert answers[1].json()["state"] == "suspended"
        states = {le["id"]: le for le in user.get(f"/clusters/{cid}").json()["leases"]}
    assert states[a]["state"] == "ended" and states[a]["end_reason"] == "failed"
    assert states[b]["state"] == "suspended" and states[b]["message"] == "owner back"
    assert states[c]["state"] == "releasing" and states[c]["release_reason"] == "preempted"
    assert states[d] == before[d]  # the refused report wrote nothing
    text = httpx.get(f"{api}/metrics", timeout=30,
                     headers={"Authorization": f"Bearer {federation.admin_token}"}).text
    values = {s.name: s.value for family in text_string_to_metric_families(text)
              for s in family.samples}
    # Every report that reached a batch was counted in one (the 404 was refused there).
    assert values["parallex_report_batch_size_sum"] == len(sent)
    assert 1 <= values["parallex_report_batch_size_count"] <= len(sent)


def test_an_agents_own_report_does_not_wake_its_poll_but_a_release_does(federation):
    """A lease-list version changes with what the agent did not do itself: its own report
    (here, a suspension) leaves the version as it was, so the poll waits on, and answers
    the list as it is; the cluster's release of another lease wakes a poll at once."""
    api, agent, machines = _two_machines(federation)
    with _user(federation) as user, httpx.Client(base_url=api, headers=agent,
                                                 timeout=60) as client:
        cid, on = _running_cluster(user, machines, "ls-wake")
        a, b = sorted(lid for lid in on if on[lid] == machines[0])
        polls = f"/agent/{machines[0]}/leases"
        version = client.get(polls).raise_for_status().json()["version"]
        client.post(f"/agent/{machines[0]}/leases/{b}/state",
                    json={"state": "suspended"}).raise_for_status()
        waited = client.get(polls, params={"since": version, "wait": 0.5}).json()
        assert waited["version"] == version  # it waited out its time: nothing woke it
        assert {le["id"]: le["state"] for le in waited["leases"]} == {
            a: "running", b: "suspended"}

        def poll() -> dict:
            return client.get(polls, params={"since": version, "wait": 30}).json()

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(poll)
            user.post(f"/clusters/{cid}/leases/release",
                      json={"lease_ids": [a]}).raise_for_status()
            woken = waiting.result(timeout=30)  # well before the poll's 30 s
    assert woken["version"] != version
    assert {le["id"]: le["state"] for le in woken["leases"]}[a] == "releasing"


def test_a_clusters_confirmation_does_not_wake_the_agents_poll(federation):
    """A lease the cluster confirms (its worker joined: starting to running) changes nothing
    for its agent, so its poll is not woken (under churn that wake was a third of the polls);
    the list it answers after its wait shows the lease running."""
    api, agent, machines = _two_machines(federation)
    with _user(federation) as user, httpx.Client(base_url=api, headers=agent,
                                                 timeout=60) as client:
        cid = user.post("/clusters", json={
            "scheduler_address": "tls://127.0.0.1:40000",
            "ca_cert": ClusterAuthority().ca_pem}).raise_for_status().json()["id"]
        leases = user.post(f"/clusters/{cid}/leases", json={
            "spec": {"cpus": 2, "memory": 2**30},
            "workers": [{"lease_id": "ls-confirm"}]}).raise_for_status().json()
        polls = f"/agent/{leases[0]['provider_id']}/leases"
        before = client.get(polls).raise_for_status().json()
        assert [(le["id"], le["state"]) for le in before["leases"]] == [
            ("ls-confirm", "starting")]
        user.post(f"/clusters/{cid}/heartbeat",
                  json={"connected": ["ls-confirm"]}).raise_for_status()
        waited = client.get(polls, params={"since": before["version"], "wait": 0.5}).json()
    assert waited["version"] == before["version"]  # it waited out its time: nothing woke it
    assert [(le["id"], le["state"]) for le in waited["leases"]] == [("ls-confirm", "running")]


def test_a_value_the_database_refuses_fails_only_its_own_report_or_heartbeat(postgres_url):
    """A NUL character in a report's message (an agent relaying a worker's output) is refused
    by PostgreSQL. In a batch it must fail only its own report, answered 422, while the
    reports beside it count: otherwise the agent retrying it failed every batch it joined."""
    from federation.broker.agent_batches import Report
    from federation.broker.models import LeaseStateReport

    with in_process_broker(postgres_url, 3) as b:
        ids, box = b.ids, b.box
        reports = [Report(box, ids[0], LeaseStateReport(state="ended", message="done")),
                   Report(box, ids[1], LeaseStateReport(state="ended", message="bad\x00out")),
                   Report(box, ids[2], LeaseStateReport(state="suspended"))]
        b.app.state.broker.record_reports(set(reports))  # one batch, as its coalescer runs it
        good, bad, suspended = reports
        assert good.recorded and suspended.recorded and not bad.recorded
        assert bad.failure is not None and "NUL" in str(bad.failure)
        states = {le["id"]: le["state"] for le in b.call(b.user, "GET",
                                                         f"/clusters/{b.cid}").json()["leases"]}
        assert states == {ids[0]: "ended", ids[1]: "running", ids[2]: "suspended"}

        # Through the API: the report and a heartbeat carrying one are answered 422.
        answer = b.call(b.agent, "POST", f"/agent/{box}/leases/{ids[1]}/state",
                        json={"state": "ended", "message": "bad\x00out"})
        assert answer.status_code == 422 and answer.json()["error"] == "unstorable-value"
        beat = b.call(b.agent, "POST", f"/agent/{box}/heartbeat",
                      json={"running": ids[1:], "offer_note": "owner\x00typing"})
        assert beat.status_code == 422 and beat.json()["error"] == "unstorable-value"
        assert b.call(b.agent, "POST", f"/agent/{box}/heartbeat",
                      json={"running": ids[1:]}).status_code == 200


def test_batches_that_cannot_finish_in_time_answer_503_and_the_retry_counts(postgres_url):
    """The database holds the batches up (another session locks the tables) past the 10 s a
    heartbeat or report waits. A heartbeat that repeats the last one is answered once queued
    (its batch cannot even start writing while the lock is held); once that batch has
    stalled, the next waits for its own and, like the report, is answered 503 with what to
    do, never a silent success. Once the lock goes the batches finish, the agent's retry of
    the report is answered with the lease's state (idempotent), its next heartbeat
    recorded."""
    import psycopg

    with in_process_broker(postgres_url, 1) as b:
        broker = b.app.state.broker
        (lease_id,) = b.ids
        beat_path, report_path = (f"/agent/{b.box}/heartbeat",
                                  f"/agent/{b.box}/leases/{lease_id}/state")
        # Remembered before the lock: the token's principal and the machine's lab, and
        # what the machine's heartbeat says.
        assert b.call(b.agent, "POST", beat_path, json={"running": b.ids}).status_code == 200
        with psycopg.connect(postgres_url) as locker:
            locker.execute("LOCK TABLE provider, lease IN ACCESS EXCLUSIVE MODE")
            repeat = b.call(b.agent, "POST", beat_path, json={"running": b.ids})
            assert repeat.status_code == 200, repeat.text  # answered while nothing can write
            wait_until(lambda: broker.heartbeat_batch_stalled, 30, "the batch to stall")
            with ThreadPoolExecutor(2) as pool:
                beat = pool.submit(b.call, b.agent, "POST", beat_path, json={"running": b.ids})
                report = pool.submit(b.call, b.agent, "POST", report_path,
                                     json={"state": "ended"})
                beat, report = beat.result(timeout=60), report.result(timeout=60)
            locker.rollback()
        assert beat.status_code == 503 and beat.json()["error"] == "heartbeat-not-recorded"
        assert report.status_code == 503 and report.json()["error"] == "report-not-recorded"
        assert "report it again" in report.json()["message"]
        again = b.call(b.agent, "POST", report_path, json={"state": "ended"})
        assert again.status_code == 200 and again.json()["state"] == "ended", again.text
        assert b.call(b.agent, "POST", beat_path, json={"running": []}).status_code == 200


def test_a_token_that_many_requests_bring_at_once_is_read_once(tmp_path):
    """A lab's machines share a provider token: when this replica no longer remembers it,
    the requests that arrive together read it once and all get its answer, the lab's
    Principal or the same refusal (issue 14's load: every heartbeat that arrived before the
    first read answered read it again)."""
    from sqlalchemy import event

    requests = 16
    with in_process_broker(f"sqlite:///{tmp_path / 'broker.db'}", 1) as b:
        broker = b.app.state.broker
        token_reads: list[str] = []
        second_read = threading.Event()

        def note_token_reads(_conn, _cursor, statement: str, *_args) -> None:
            if "FROM apitoken" in statement:
                token_reads.append(statement)
                if len(token_reads) == 1:
                    # Hold the first read until a second starts (then the test fails) or the
                    # other requests have long arrived.
                    second_read.wait(2)
                else:
                    second_read.set()

        def whoami_all(token: str) -> list[httpx.Response]:
            broker.principals.clear()
            token_reads.clear()
            second_read.clear()
            with ThreadPoolExecutor(requests) as pool:
                return list(pool.map(lambda _: b.call(token, "GET", "/whoami"),
                                     range(requests)))

        event.listen(broker.engine, "before_cursor_execute", note_token_reads)
        try:
            answers = whoami_all(b.agent)
            assert [a.status_code for a in answers] == [200] * requests
            assert {(a.json()["kind"], a.json()["lab"]) for a in answers} == {
                ("provider", "lab-a")}
            assert len(token_reads) == 1, token_reads
            # Remembered now: the next request reads nothing.
            assert b.call(b.agent, "GET", "/whoami").status_code == 200
            assert len(token_reads) == 1

            answers = whoami_all("px_not-a-token-of-this-federation")
            assert [a.status_code for a in answers] == [401] * requests
            assert {a.json()["error"] for a in answers} == {"bad-token"}
            assert len(token_reads) == 1, token_reads
        finally:
            event.remove(broker.engine, "before_cursor_execute", note_token_reads)


def test_a_token_in_use_is_read_again_before_it_expires_without_a_request_waiting(tmp_path):
    """Past half its age limit, a remembered token is answered from memory while the next
    request starts a read of it in the background; the read renews it. Before, every
    request that arrived while an expired token was read again waited for that read."""
    from sqlalchemy import event

    from federation.broker.auth import hash_token

    ttl = 600.0  # far longer than the test: only the renewal can read the token again
    with in_process_broker(f"sqlite:///{tmp_path / 'broker.db'}", 1, token_cache=ttl) as b:
        broker = b.app.state.broker
        digest = hash_token(b.agent)
        reading, release, finished = (threading.Event() for _ in range(3))

        def hold_token_reads(_conn, _cursor, statement: str, *_args) -> None:
            if "FROM apitoken" in statement:
                reading.set()
                release.wait(30)

        def read_done(*_args) -> None:
            if reading.is_set():
                finished.set()

        assert b.call(b.agent, "GET", "/whoami").status_code == 200  # read and remembered
        event.listen(broker.engine, "before_cursor_execute", hold_token_reads)
        event.listen(broker.engine, "after_cursor_execute", read_done)
        try:
            # Fresh: answered from memory, nothing read.
            assert b.call(b.agent, "GET", "/whoami").status_code == 200
            assert not reading.is_set()
            # Past half its age (as if 0.6 of the limit had gone by).
            with broker.principals._lock:
                put_at, principal = broker.principals._items[digest]
                broker.principals._items[digest] = (put_at - 0.6 * ttl, principal)
            answer = b.call(b.agent, "GET", "/whoami")
            # Answered while its token's read is held: nobody waited for it.
            assert answer.status_code == 200 and answer.json()["lab"] == "lab-a"
            assert reading.wait(30), "no read of the token started"
            assert not finished.is_set()
            release.set()
            wait_until(lambda: broker.principals.get_aged(digest)[1] < 0.5 * ttl, 30,
                       "the background read to renew the token")
        finally:
            release.set()
            event.remove(broker.engine, "before_cursor_execute", hold_token_reads)
            event.remove(broker.engine, "after_cursor_execute", read_done)


def test_the_server_keeps_its_idle_pool_threads():
    """The broker server tells AnyIO to keep idle request threads (pool_threads.py): starting
    one stalls the event loop under load. A newer AnyIO without that setting fails here, not
    silently in production."""
    from anyio._backends._asyncio import WorkerThread

    from federation.broker.pool_threads import KEEP_IDLE_THREADS, keep_idle_threads

    before = WorkerThread.MAX_IDLE_TIME
    try:
        assert keep_idle_threads()
        assert WorkerThread.MAX_IDLE_TIME == KEEP_IDLE_THREADS > before
    finally:
        WorkerThread.MAX_IDLE_TIME = before


def test_a_cluster_heartbeat_answers_the_view_it_leaves_and_only_to_its_owner(db_url):
    """The heartbeat's answer is the cluster's view as the heartbeat left it (the one that
    confirms a worker shows its lease running), the same view the cluster's own page gives,
    and a valid ClusterPublic; it notes the cluster alive; another user's cluster answers as
    an unknown one, an ended cluster is refused."""
    from federation.broker.models import ClusterPublic, ClusterRecord
    from tests.utils.in_process import ADMIN_TOKEN

    with in_process_broker(db_url, 2) as b:  # "box": 3 CPUs, two leases running
        broker = b.app.state.broker
        base = f"/clusters/{b.cid}"
        new = b.call(b.user, "POST", f"{base}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"}, "workers": [{"lease_id": "ls-third"}]})
        assert [le["state"] for le in new.json()] == ["starting"], new.text

        def last_seen():
            with broker.session() as s:
                return s.get(ClusterRecord, b.cid).last_seen

        seen = last_seen()
        beat = b.call(b.user, "POST", f"{base}/heartbeat", json={"connected": []})
        assert beat.status_code == 200, beat.text
        view = ClusterPublic.model_validate(beat.json())
        assert {le.id: le.state.value for le in view.leases} == {
            **{i: "running" for i in b.ids}, "ls-third": "starting"}
        assert beat.json()["leases"] == b.call(b.user, "GET", base).json()["leases"]
        assert (view.user, view.lab, view.active) == ("alice", "lab-a", True)
        assert last_seen() > seen

        beat = b.call(b.user, "POST", f"{base}/heartbeat", json={"connected": ["ls-third"]})
        assert {le["id"]: le["state"] for le in beat.json()["leases"]} == {
            **{i: "running" for i in b.ids}, "ls-third": "running"}
        assert beat.json()["leases"] == b.call(b.user, "GET", base).json()["leases"]

        bob = b.call(ADMIN_TOKEN, "POST", "/tokens", json={
            "kind": "user", "lab": "lab-a", "user": "bob"}).json()["token"]
        others = b.call(bob, "POST", f"{base}/heartbeat", json={"connected": []})
        unknown = b.call(bob, "POST", "/clusters/cl_000000000000/heartbeat", json={})
        assert others.status_code == unknown.status_code == 404
        assert others.json()["error"] == unknown.json()["error"] == "unknown-cluster"
        assert b.call(ADMIN_TOKEN, "POST", f"{base}/heartbeat", json={}).status_code == 200

        assert b.call(b.user, "DELETE", base).status_code == 200
        ended = b.call(b.user, "POST", f"{base}/heartbeat", json={"connected": []})
        assert ended.status_code == 409 and ended.json()["error"] == "cluster-ended"


def test_on_postgresql_reads_run_outside_a_transaction_and_writes_inside(postgres_url):
    """A request that only reads (a token, a cluster, its view) sends its statements outside
    a transaction, each a round trip of its own with no BEGIN before and no ROLLBACK after;
    a unit of work that writes (a release) still locks and writes inside one."""
    from psycopg.pq import TransactionStatus
    from sqlalchemy import event

    # Every request reads its token (none remembered), so each request shows that read too.
    with in_process_broker(postgres_url, 2, token_cache=0) as b:
        seen: list[tuple[str, TransactionStatus]] = []

        def note(conn, _cursor, statement, *_args) -> None:
            # The requests' own statements: their threads are AnyIO's (the broker's
            # placer, relay and reaper run statements of their own meanwhile).
            if threading.current_thread().name.startswith("AnyIO worker"):
                status = conn.connection.dbapi_connection.info.transaction_status
                seen.append((" ".join(statement.split()), status))

        engine = b.app.state.broker.engine
        event.listen(engine, "after_cursor_execute", note)
        try:
            read = b.call(b.user, "GET", f"/clusters/{b.cid}")
            assert read.status_code == 200, read.text
            reads, seen[:] = list(seen), []
            released = b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
                              json={"lease_ids": b.ids[:1]})
            assert released.status_code == 200, released.text
            release = list(seen)
        finally:
            event.remove(engine, "after_cursor_execute", note)
    assert len(reads) >= 3, reads  # the token, the cluster, its view
    assert [s for s, status in reads if status != TransactionStatus.IDLE] == [], reads
    assert any("FROM apitoken" in s for s, _status in reads), reads
    # The release: its token and its cluster read outside, its leases locked and written in.
    outside = [s for s, status in release if status == TransactionStatus.IDLE]
    inside = [s for s, status in release if status == TransactionStatus.INTRANS]
    assert any("FROM apitoken" in s for s in outside), release
    assert any(s.startswith("SELECT cluster.") for s in outside), release
    assert any("FOR UPDATE" in s for s in inside), release
    assert any(s.startswith("UPDATE lease") for s in inside), release


def test_agents_batches_are_served_while_requests_hold_every_other_connection(postgres_url):
    """Under load at start-up every connection of the requests' pool was checked out for
    seconds, and agents' heartbeats waited behind them. The batchers have a pool of their
    own: with every request connection held, a heartbeat, a report and a lease list are
    still recorded and answered (they waited for the pool's 30 s timeout, past the 10 s a
    heartbeat waits, and were answered 503 before)."""
    from federation.broker import db

    with in_process_broker(postgres_url, 2) as b:
        broker = b.app.state.broker
        beat = f"/agent/{b.box}/heartbeat"
        # Remembered first (the token's principal and the machine's lab are reads of the
        # requests' pool, as they would be for any request).
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
        kept, bursts = db.REQUEST_POOL
        held = [broker.engine.connect() for _ in range(kept + bursts)]
        try:
            assert broker.engine.pool.checkedout() == kept + bursts
            answer = b.call(b.agent, "POST", beat, json={"running": b.ids})
            assert answer.status_code == 200, answer.text
            report = b.call(b.agent, "POST", f"/agent/{b.box}/leases/{b.ids[0]}/state",
                            json={"state": "suspended"})
            assert report.status_code == 200 and report.json()["state"] == "suspended"
            listed = b.call(b.agent, "GET", f"/agent/{b.box}/leases")
            assert listed.status_code == 200, listed.text
            assert {le["id"] for le in listed.json()["leases"]} >= set(b.ids)
            # Nothing above took a request connection: they are all still held here.
            assert broker.engine.pool.checkedout() == kept + bursts
        finally:
            for connection in held:
                connection.close()
        with held[0].engine.connect() as check:
            states = dict(check.exec_driver_sql(
                "SELECT id, state FROM lease WHERE id = ANY(%(ids)s)",
                {"ids": b.ids}).all())
        assert states == {b.ids[0]: "suspended", b.ids[1]: "running"}


def test_a_heartbeat_does_not_wait_for_a_lease_another_unit_holds(postgres_url):
    """The heartbeat shows a running lease gone, but another unit of work holds that lease
    locked (a metering unit holds the leases it charges, for seconds under load): the
    heartbeat is answered at once and the lease ends with a later one, instead of the batch
    waiting and every agent's heartbeat in it answered 503."""
    import psycopg

    with in_process_broker(postgres_url, 2) as b:
        beat = f"/agent/{b.box}/heartbeat"
        gone, kept = b.ids
        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT id FROM lease WHERE id = %s FOR UPDATE", (gone,))
            answer = b.call(b.agent, "POST", beat, json={"running": [kept]})
            assert answer.status_code == 200, answer.text
            state = holder.execute("SELECT state FROM lease WHERE id = %s",
                                   (gone,)).fetchone()[0]
            assert state == "running"  # left to a later heartbeat
            holder.rollback()

        def states() -> dict:
            assert b.call(b.agent, "POST", beat, json={"running": [kept]}).status_code == 200
            return {le["id"]: le["state"] for le in b.call(
                b.user, "GET", f"/clusters/{b.cid}").json()["leases"]}

        # A repeated heartbeat is answered once queued and recorded just after; it counts
        # a lease gone once the lease started QUEUED_ORDER_MARGIN before it (agent_batches).
        wait_until(lambda: states() == {gone: "ended", kept: "running"}, 30,
                   "a later heartbeat to end the lease")


def test_a_heartbeat_batch_past_its_wait_says_which_part_stalled(postgres_url, monkeypatch,
                                                                  caplog):
    """A batch that outlasts the wait its heartbeats were answered 503 after is logged with
    the part that took the time (one load run answered 2,008 heartbeats so, and nothing
    said why). Here the provider's row is held, so recording the heartbeat waits."""
    import psycopg

    from federation.broker import service

    monkeypatch.setattr(service, "HEARTBEAT_WAIT", 1.0)
    caplog.set_level(logging.WARNING, logger="parallex.broker")
    with in_process_broker(postgres_url, 1) as b:
        beat = f"/agent/{b.box}/heartbeat"
        with psycopg.connect(postgres_url) as holder:
            holder.execute("SELECT id FROM provider WHERE id = %s FOR UPDATE", (b.box,))
            answer = b.call(b.agent, "POST", beat, json={"running": b.ids})
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "heartbeat-not-recorded"
            holder.rollback()
        slow = wait_until(lambda: [r.getMessage() for r in caplog.records
                                   if r.getMessage().startswith(service.SLOW_HEARTBEAT_BATCH)],
                          30, "the slow batch's warning")
        assert len(slow) == 1
        parts = re.search(r"its 1 heartbeats wait .*: recording them took (\d+\.\d) s, "
                          r"ending 0 overdue leases (\d+\.\d) s", slow[0])
        assert parts, slow[0]
        # Recording is the part that took the time. Not "at least the 1 s wait": on a loaded
        # machine the batch can start a while after the heartbeat arrived, and the held row
        # is let go as soon as the 503 comes back, so the batch's own time can be under it.
        recording, ending = map(float, parts.groups())
        assert recording >= 0.5 and recording > ending, slow[0]
        # The next heartbeat finds the row free and is recorded.
        assert b.call(b.agent, "POST", beat, json={"running": b.ids}).status_code == 200
