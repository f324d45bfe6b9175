"""The broker under concurrent requests: many users' scale requests and providers' heartbeats at
once never place more on a provider than it offers (issue 11: routes run in FastAPI's thread
pool, so placement passes overlap unless something serialises them)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from federation.tls import ClusterAuthority
from tests.utils.federation import api_client

USERS = 4
REQUESTS_PER_USER = 12  # under the broker's 16 requests in flight per token
PROVIDERS = 2
CPUS_PER_PROVIDER = 8


def api(fed, token: str) -> httpx.Client:
    return api_client(fed, token, timeout=60, limits=httpx.Limits(max_connections=32))


def test_concurrent_scale_requests_never_double_book_a_provider(any_database):
    fed = any_database
    fed.add_lab("lab-a")
    for i in range(USERS):
        fed.add_user("lab-a", f"user{i}")
    agents = [api(fed, fed.provider_tokens["lab-a"]) for _ in range(PROVIDERS)]
    users = [api(fed, fed.user_tokens[f"user{i}"]) for i in range(USERS)]
    try:
        # Fake agents (nothing starts): their leases stay "starting" and hold their capacity.
        providers = []
        for i, agent in enumerate(agents):
            answer = agent.post("/agent/register", json={
                "name": f"box-{i}", "cpus": CPUS_PER_PROVIDER, "memory": "64 GiB"})
            assert answer.status_code == 201, answer.text
            providers.append(answer.json()["provider_id"])
        authority = ClusterAuthority()
        clusters = {}
        for i, user in enumerate(users):
            made = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                                "ca_cert": authority.ca_pem})
            assert made.status_code == 201, made.text
            clusters[i] = made.json()["id"]
        start = threading.Barrier(USERS * REQUESTS_PER_USER + PROVIDERS)

        def scale(i: int, n: int) -> int:
            start.wait()
            return users[i].post(f"/clusters/{clusters[i]}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": f"ls-{i:02d}{n:02d}{'0' * 12}"}]}).status_code

        def heartbeat(p: int) -> int:
            start.wait()
            return agents[p].post(f"/agent/{providers[p]}/heartbeat",
                                  json={"running": []}).status_code

        with ThreadPoolExecutor(USERS * REQUESTS_PER_USER + PROVIDERS) as pool:
            asked = [pool.submit(scale, i, n) for i in range(USERS)
                     for n in range(REQUESTS_PER_USER)]
            beats = [pool.submit(heartbeat, p) for p in range(PROVIDERS)]
            codes = [f.result(timeout=120) for f in asked]
            beat_codes = [f.result(timeout=120) for f in beats]
        assert codes == [201] * len(codes), sorted(set(codes))
        assert all(code in (200, 429) for code in beat_codes), beat_codes
        admin = fed.admin()
        try:
            leases = [lease for c in admin.request("GET", "/clusters", params={"all": True})
                      for lease in c["leases"]]
        finally:
            admin.close()
        held = Counter()
        for lease in leases:
            if lease["provider_id"]:
                held[lease["provider_id"]] += lease["cpus"]
        # Every CPU offered is used once, and never more than once.
        assert sorted(held.values()) == [CPUS_PER_PROVIDER] * PROVIDERS, held
        pending = [lease for lease in leases if lease["state"] == "pending"]
        assert len(pending) == USERS * REQUESTS_PER_USER - PROVIDERS * CPUS_PER_PROVIDER
    finally:
        for client in agents + users:
            client.close()


def test_concurrent_requests_never_exceed_a_users_cpu_quota(any_database):
    """The quota check and the insert are one step: twelve racing 1-CPU requests against a
    4-CPU quota admit exactly four (on PostgreSQL, under the lab's admission lock, which
    placement passes do not take)."""
    fed = any_database
    fed.add_lab("lab-a", user="alice")
    admin = fed.admin()
    try:
        admin.request("PUT", "/labs/lab-a/members/alice", json={"max_cpus": 4})
    finally:
        admin.close()
    with api(fed, fed.user_tokens["alice"]) as user, \
            api(fed, fed.provider_tokens["lab-a"]) as agent:
        assert agent.post("/agent/register", json={"name": "box", "cpus": 64,
                                                   "memory": "64 GiB"}).status_code == 201
        made = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                            "ca_cert": ClusterAuthority().ca_pem})
        cluster = made.json()["id"]
        start = threading.Barrier(REQUESTS_PER_USER)

        def scale(n: int) -> int:
            start.wait()
            return user.post(f"/clusters/{cluster}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": f"ls-{n:04d}{'0' * 12}"}]}).status_code

        with ThreadPoolExecutor(REQUESTS_PER_USER) as pool:
            codes = sorted(pool.map(scale, range(REQUESTS_PER_USER), timeout=120))
        assert codes == [201] * 4 + [403] * (REQUESTS_PER_USER - 4), codes
        leases = user.get(f"/clusters/{cluster}").json()["leases"]
        assert len([le for le in leases if le["state"] != "ended"]) == 4


def test_releases_racing_placement_passes_are_never_overwritten(any_database):
    """A release and a placement pass at the same moment: the pass either leaves the lease
    alone or places it before the release, which then asks its agent to stop it. No
    released lease ends up placed and running, and each one an agent must stop carries
    its provider (releases take row locks on PostgreSQL, not the placement lock)."""
    fed = any_database
    fed.add_lab("lab-a", user="alice")
    placed_first = CPUS_PER_PROVIDER
    waiting = REQUESTS_PER_USER  # under the 16 requests in flight per token
    with api(fed, fed.user_tokens["alice"]) as user, \
            api(fed, fed.provider_tokens["lab-a"]) as agent:
        answer = agent.post("/agent/register", json={"name": "box", "cpus": CPUS_PER_PROVIDER,
                                                     "memory": "64 GiB"})
        assert answer.status_code == 201, answer.text
        provider = answer.json()["provider_id"]
        made = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                            "ca_cert": ClusterAuthority().ca_pem})
        cluster = made.json()["id"]
        ids = [f"ls-{n:04d}{'0' * 12}" for n in range(placed_first + waiting)]
        asked = user.post(f"/clusters/{cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"}, "workers": [{"lease_id": i} for i in ids]})
        assert asked.status_code == 201, asked.text
        states = {le["id"]: le for le in user.get(f"/clusters/{cluster}").json()["leases"]}
        first = [i for i in ids if states[i]["state"] == "starting"]
        pending = [i for i in ids if states[i]["state"] == "pending"]
        assert len(first) == placed_first and len(pending) == waiting
        # The placed ones are released and end (freeing capacity: each end asks for a
        # pass), while the waiting ones are released one request each.
        assert user.post(f"/clusters/{cluster}/leases/release",
                         json={"lease_ids": first}).status_code == 200
        start = threading.Barrier(placed_first + waiting)

        def end(lease_id: str) -> int:
            start.wait()
            return agent.post(f"/agent/{provider}/leases/{lease_id}/state",
                              json={"state": "ended", "reason": "released"}).status_code

        def release(lease_id: str) -> int:
            start.wait()
            return user.post(f"/clusters/{cluster}/leases/release",
                             json={"lease_ids": [lease_id]}).status_code

        with ThreadPoolExecutor(placed_first + waiting) as pool:
            ended = [pool.submit(end, i) for i in first]
            released = [pool.submit(release, i) for i in pending]
            assert [f.result(timeout=120) for f in ended] == [200] * placed_first
            assert [f.result(timeout=120) for f in released] == [200] * waiting
        after = {le["id"]: le for le in user.get(f"/clusters/{cluster}").json()["leases"]}
        states = Counter(after[i]["state"] for i in pending)
        assert set(states) <= {"ended", "releasing"}, states
        for i in pending:
            if after[i]["state"] == "releasing":  # placed just before its release
                assert after[i]["provider_id"] == provider
        stop = {le["id"] for le in agent.get(f"/agent/{provider}/leases").json()["leases"]
                if le["state"] == "releasing"}
        assert stop == {i for i in pending if after[i]["state"] == "releasing"}


def test_a_machine_registering_twice_at_once_is_one_provider(any_database):
    """Registration locks the machine (its lab and name), not the lab: eight registrations of
    one name at once make one provider, which every answer names, while eight machines of the
    same lab registering at once make eight."""
    fed = any_database
    fed.add_lab("lab-a")
    racers = 8
    start = threading.Barrier(racers)

    with api(fed, fed.provider_tokens["lab-a"]) as agent:
        def register(name: str) -> str:
            start.wait()
            answer = agent.post("/agent/register", json={"name": name, "cpus": 4,
                                                         "memory": "8 GiB"})
            assert answer.status_code == 201, answer.text
            return answer.json()["provider_id"]

        with ThreadPoolExecutor(racers) as pool:
            same = set(pool.map(register, ["box"] * racers, timeout=120))
        with ThreadPoolExecutor(racers) as pool:
            different = set(pool.map(register, [f"node-{i}" for i in range(racers)],
                                     timeout=120))
        listed = Counter(p["name"] for p in agent.get("/providers").json())
    assert len(same) == 1
    assert len(different) == racers and same.isdisjoint(different)
    assert listed == Counter({"box": 1, **{f"node-{i}": 1 for i in range(racers)}})


def admissions_of_one_lab(db_url: str, quota: bool) -> tuple[bool, bool]:
    """Two scale requests of one lab on PostgreSQL, the first held in its admission (a hook
    pauses it after its read of the machines' shapes) while the second runs: (whether the
    second finished while the first was held, whether both were admitted in the end)."""
    from sqlalchemy import event

    from federation.broker.admission import ShapesSeen
    from federation.broker.models import ClusterRecord, LeaseCreate
    from tests.utils.in_process import ADMIN_TOKEN, in_process_broker
    from tests.utils.procs import in_thread, wait_until

    with in_process_broker(db_url, 1) as b:
        broker = b.app.state.broker
        # Shapes read every time, not remembered: the hook holds the first request there,
        # after it took the lab's admission lock.
        broker.shapes_seen = ShapesSeen(ttl=0)
        if quota:
            assert b.call(ADMIN_TOKEN, "PUT", "/labs/lab-a/members/alice",
                          json={"max_cpus": 100}).status_code == 200
        with broker.reading() as s:
            cluster = s.get(ClusterRecord, b.cid)
        first_checked, let_first_go = threading.Event(), threading.Event()

        def hold_the_first(_conn, _cursor, statement: str, *_args) -> None:
            if (threading.current_thread().name == "first"
                    and "SELECT DISTINCT lab.name" in statement and not first_checked.is_set()):
                first_checked.set()
                let_first_go.wait(60)

        def ask(name: str) -> list[str]:
            return broker.request_leases(cluster, LeaseCreate(
                spec={"cpus": 1, "memory": "1 GiB"},
                workers=[{"lease_id": f"ls-{name}-{i}"} for i in range(3)]))

        event.listen(broker.engine, "after_cursor_execute", hold_the_first)
        try:
            first, first_out = in_thread(lambda: ask("first"), name="first")
            assert first_checked.wait(60), "the first request reached its shapes check"
            second, second_out = in_thread(lambda: ask("second"), name="second")
            if quota:
                # It waits on the lab's admission lock (PostgreSQL shows the waiter).
                wait_until(lambda: admission_waiters(db_url) == 1, 60,
                           "the second request waiting on the lab's admission lock")
            else:
                second.join(60)
            second_while_held = not second.is_alive()
        finally:
            let_first_go.set()
            # Removed once no thread runs it (removing mutates what a running event iterates).
            first.join(60)
            second.join(60)
            event.remove(broker.engine, "after_cursor_execute", hold_the_first)
        assert "failed" not in first_out and "failed" not in second_out, (first_out,
                                                                          second_out)
        return second_while_held, len(first_out["recorded"]) == len(second_out["recorded"]) == 3


def admission_waiters(url: str) -> int:
    """Sessions waiting for a lab's admission lock on the database at ``url`` (a two-key
    advisory lock: its first key is PostgreSQL's ``classid``)."""
    import psycopg

    from federation.broker.placing import ADMISSION_LOCK

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND classid = %s AND objsubid = 2 AND NOT granted",
                            (ADMISSION_LOCK,)).fetchone()[0]


def test_a_labs_scale_requests_wait_for_each_other_only_under_a_quota(postgres_server_url):
    """The lab's admission lock serialises its scale requests where a quota counts what each
    holds; without one (credit is not changed by an insert) they are admitted side by side,
    each of them no longer waiting for the lab's others (issue 14's lockstep churn)."""
    from tests.utils.postgres import fresh_database

    without, under = (fresh_database(postgres_server_url, f"admissions_{kind}")
                      for kind in ("without_quota", "under_quota"))
    assert admissions_of_one_lab(without, quota=False) == (True, True)
    assert admissions_of_one_lab(under, quota=True) == (False, True)
