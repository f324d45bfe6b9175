"""The lease state machine: the table of moves, and random event sequences through the real
broker (its FastAPI app in process, SQLite) that never produce an illegal move (a 5xx), break
an invariant of the stored leases, or leave a lease without an end once everything closes."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.broker.app import create_app
from federation.broker.settings import BrokerSettings
from federation.lease_states import (
    TRANSITIONS,
    EndReason,
    IllegalTransition,
    LeaseState,
    can_move,
    move,
    suspensions,
)
from federation.tls import ClusterAuthority
from tests.utils.in_process import in_process_broker

ADMIN = "test-admin-token-0123456789"


@dataclass
class FakeLease:
    id: str = "ls-x"
    state: LeaseState = LeaseState.pending
    release_reason: EndReason | None = None
    end_reason: EndReason | None = None
    message: str = ""
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    releasing_at: dt.datetime | None = None
    suspensions_json: str = "[]"


def test_the_table_of_moves():
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert TRANSITIONS[LeaseState.ended] == frozenset()
    assert not can_move(LeaseState.ended, LeaseState.running)
    assert not can_move(LeaseState.pending, LeaseState.running)  # placed first
    assert not can_move(LeaseState.releasing, LeaseState.running)
    lease = FakeLease()
    move(lease, LeaseState.starting, at=now)
    move(lease, LeaseState.running, at=now)
    assert lease.started_at == now
    move(lease, LeaseState.releasing, at=now, reason=EndReason.released, message="bye")
    # Status and target apart: releasing towards "released", not ended yet.
    assert (lease.release_reason, lease.end_reason) == (EndReason.released, None)
    # The reason chosen at release wins over the agent's later report.
    move(lease, LeaseState.ended, at=now, reason=EndReason.failed)
    assert (lease.state, lease.end_reason, lease.ended_at) == (LeaseState.ended,
                                                               EndReason.released, now)
    with pytest.raises(IllegalTransition, match="cannot go from ended to running"):
        move(lease, LeaseState.running, at=now)
    with pytest.raises(IllegalTransition, match="without a reason"):
        move(FakeLease(), LeaseState.ended, at=now)


def test_suspended_spans_open_and_close_and_resuming_keeps_the_start():
    t = [dt.datetime(2026, 1, 1, 0, 0, i, tzinfo=dt.UTC) for i in range(6)]
    lease = FakeLease()
    move(lease, LeaseState.starting, at=t[0])
    move(lease, LeaseState.running, at=t[1])
    move(lease, LeaseState.suspended, at=t[2])
    assert suspensions(lease) == [(t[2], None)]
    move(lease, LeaseState.running, at=t[3])
    assert lease.started_at == t[1] and suspensions(lease) == [(t[2], t[3])]
    move(lease, LeaseState.suspended, at=t[4])
    move(lease, LeaseState.releasing, at=t[5], reason=EndReason.preempted)
    assert suspensions(lease) == [(t[2], t[3]), (t[4], t[5])]
    move(lease, LeaseState.ended, at=t[5], reason=EndReason.failed)
    assert lease.end_reason == EndReason.preempted
    assert not can_move(LeaseState.starting, LeaseState.suspended)
    assert not can_move(LeaseState.releasing, LeaseState.suspended)


EVENTS = st.lists(st.one_of(
    st.tuples(st.just("scale"), st.integers(1, 3)),
    st.tuples(st.just("release"), st.integers(0, 5)),
    st.tuples(st.just("joined"), st.integers(0, 5)),
    st.tuples(st.just("ended"), st.integers(0, 5),
              st.sampled_from([None, "failed", "released", "preempted"])),
    st.tuples(st.just("offline"), st.integers(0, 1)),
    st.tuples(st.just("back"), st.integers(0, 1)),
    st.tuples(st.just("close"),),
    st.tuples(st.just("restart"),),
    st.tuples(st.just("provider-silent"), st.integers(0, 1)),
    st.tuples(st.just("cluster-silent"),),
    st.tuples(st.just("suspend"), st.integers(0, 5)),
    st.tuples(st.just("resume"), st.integers(0, 5)),
    st.tuples(st.just("preempt"), st.integers(0, 5)),
), min_size=1, max_size=25)


class Federation:
    """The broker app in process over one SQLite file, with a lab, a user, two fake agents
    (2 CPUs each) and the user's current cluster."""

    def __init__(self, folder: Path):
        self.db_path = folder / "broker.db"
        self.settings = BrokerSettings(rate_limit=1e6, rate_burst=1e6,
                                       min_heartbeat_interval=0, cloud_prices=None)
        self.stack = contextlib.ExitStack()
        self._start()
        admin = self.as_(ADMIN)
        assert admin.post("/labs", json={"name": "lab-a"}).status_code == 201
        self.user_token = admin.post("/tokens", json={"kind": "user", "lab": "lab-a",
                                                      "user": "alice"}).json()["token"]
        agent_token = admin.post("/tokens", json={"kind": "provider",
                                                  "lab": "lab-a"}).json()["token"]
        self.agent_token = agent_token
        self.providers = [self.as_(agent_token).post("/agent/register", json={
            "name": f"box-{i}", "cpus": 2, "memory": "8 GiB"}).json()["provider_id"]
            for i in range(2)]
        self.cluster = self._new_cluster()
        self.n = 0

    def _start(self) -> None:
        app = create_app(f"sqlite:///{self.db_path}", self.settings, admin_token=ADMIN)
        self.client = self.stack.enter_context(TestClient(app, raise_server_exceptions=False))

    def restart(self) -> None:
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self._start()

    def as_(self, token: str):
        client = self.client

        class As:
            def __getattr__(self, method):
                def call(path, **kw):
                    answer = getattr(client, method)(
                        "/api/v1" + path, headers={"Authorization": f"Bearer {token}"}, **kw)
                    assert answer.status_code < 500, (method, path, answer.text)
                    return answer
                return call

        return As()

    def _new_cluster(self) -> str:
        return self.as_(self.user_token).post("/clusters", json={
            "scheduler_address": "tls://127.0.0.1:1",
            "ca_cert": ClusterAuthority().ca_pem}).json()["id"]

    def leases(self) -> list[dict]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as c:
            c.row_factory = sqlite3.Row
            return [dict(r) for r in c.execute("SELECT * FROM lease ORDER BY id")]

    def table(self, sql: str) -> list[dict]:
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as c:
            c.row_factory = sqlite3.Row
            return [dict(r) for r in c.execute(sql)]

    def pick(self, i: int, states: tuple[str, ...]) -> dict | None:
        candidates = [le for le in self.leases() if le["state"] in states]
        return candidates[i % len(candidates)] if candidates else None

    def apply(self, event: tuple) -> None:
        user, agent = self.as_(self.user_token), self.as_(self.agent_token)
        kind = event[0]
        if kind == "scale":
            ids = [f"ls-{self.n + k:016x}" for k in range(event[1])]
            self.n += event[1]
            user.post(f"/clusters/{self.cluster}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": lid} for lid in ids]})
        elif kind == "release":
            lease = self.pick(event[1], ("pending", "starting", "running", "suspended"))
            if lease:
                user.post(f"/clusters/{lease['cluster_id']}/leases/release",
                          json={"lease_ids": [lease["id"]]})
        elif kind == "joined":
            lease = self.pick(event[1], ("starting",))
            if lease:
                agent.post(f"/agent/{lease['provider_id']}/leases/{lease['id']}/state",
                           json={"state": "running"})
                user.post(f"/clusters/{lease['cluster_id']}/heartbeat",
                          json={"connected": [lease["id"]]})
        elif kind == "ended":
            lease = self.pick(event[1], ("starting", "running", "suspended", "releasing"))
            if lease:
                agent.post(f"/agent/{lease['provider_id']}/leases/{lease['id']}/state",
                           json={"state": "ended", "reason": event[2]})
        elif kind in ("suspend", "resume", "preempt"):
            # The owner's policy, as agents report it; any state, to try illegal moves too.
            lease = self.pick(event[1], ("starting", "running", "suspended", "releasing"))
            if lease:
                body = {"suspend": {"state": "suspended"}, "resume": {"state": "running"},
                        "preempt": {"state": "releasing", "reason": "preempted"}}[kind]
                agent.post(f"/agent/{lease['provider_id']}/leases/{lease['id']}/state",
                           json={**body, "message": "owner activity on box"})
        elif kind == "offline":
            agent.post(f"/agent/{self.providers[event[1]]}/offline")
        elif kind == "back":
            provider = self.providers[event[1]]
            running = [le["id"] for le in self.leases()
                       if le["provider_id"] == provider and le["state"] in ("running",
                                                                             "suspended")]
            agent.post(f"/agent/{provider}/heartbeat", json={"running": running})
        elif kind == "close":
            user.delete(f"/clusters/{self.cluster}")
            self.cluster = self._new_cluster()
        elif kind == "restart":
            self.restart()
        elif kind == "provider-silent":
            # An hour without a heartbeat: the reaper finds the provider lost.
            self.age("provider", self.providers[event[1]])
            self.client.app.state.broker.reap()
        elif kind == "cluster-silent":
            self.age("cluster", self.cluster)
            self.client.app.state.broker.reap()
            self.cluster = self._new_cluster()

    def age(self, table: str, row_id: str) -> None:
        """Move a row's last heartbeat an hour back: the test's clock for timeouts."""
        with contextlib.closing(sqlite3.connect(self.db_path)) as c:
            c.execute(f"UPDATE {table} SET last_seen = datetime(last_seen, '-1 hour') "  # noqa: S608
                      "WHERE id = ?", (row_id,))
            c.commit()

    def check(self) -> None:
        offline = {p["id"] for p in self.table("SELECT id, online FROM provider")
                   if not p["online"]}
        active = {c["id"] for c in self.table("SELECT id FROM cluster WHERE active")}
        held: dict[str, float] = {}
        for le in self.leases():
            state = LeaseState(le["state"])
            if state == LeaseState.pending:
                assert le["provider_id"] is None, le
            elif state != LeaseState.ended:  # a lease ended while pending never had one
                assert le["provider_id"] is not None, le
            if state == LeaseState.ended:
                assert le["end_reason"] and le["ended_at"], le
            else:  # status and target apart: no end reason before the end
                assert le["end_reason"] is None, le
                # Nor an end time: the reads of live leases go by it (models.NOT_ENDED).
                assert le["ended_at"] is None, le
            if state == LeaseState.releasing:
                assert le["release_reason"] and le["releasing_at"], le
            if state in (LeaseState.running, LeaseState.suspended):
                assert le["started_at"], le
            spans = json.loads(le["suspensions_json"])
            # Only a suspended lease has an open span; every span ends after it starts.
            assert [b is None for _a, b in spans].count(True) == (
                1 if state == LeaseState.suspended else 0), le
            assert all(b is None or a <= b for a, b in spans), le
            if spans:
                assert le["started_at"], le
            if state in (LeaseState.starting, LeaseState.running, LeaseState.suspended):
                assert le["provider_id"] not in offline, le
                assert le["cluster_id"] in active, le
            if state in (LeaseState.starting, LeaseState.running, LeaseState.suspended,
                         LeaseState.releasing):
                held[le["provider_id"]] = held.get(le["provider_id"], 0) + le["cpus"]
        assert all(cpus <= 2 for cpus in held.values()), held

    def wind_down(self) -> None:
        """Close every cluster and let the agents report their workers gone."""
        user, agent = self.as_(self.user_token), self.as_(self.agent_token)
        for c in self.table("SELECT id FROM cluster WHERE active"):
            user.delete(f"/clusters/{c['id']}")
        for le in self.leases():
            if le["state"] != "ended" and le["provider_id"]:
                agent.post(f"/agent/{le['provider_id']}/leases/{le['id']}/state",
                           json={"state": "ended"})

    def close(self) -> None:
        self.stack.close()


def test_agents_owner_reports_that_make_no_sense_are_refused_and_change_nothing(tmp_path):
    fed = Federation(tmp_path)
    try:
        fed.apply(("scale", 1))
        (lease,) = fed.leases()
        assert lease["state"] == "starting"
        agent = fed.as_(fed.agent_token)
        url = f"/agent/{lease['provider_id']}/leases/{lease['id']}/state"
        refused = agent.post(url, json={"state": "suspended"})
        assert refused.status_code == 409
        assert "only a running lease can be suspended" in refused.json()["message"]
        wrong = agent.post(url, json={"state": "releasing", "reason": "released"})
        assert wrong.status_code == 422 and "only to preempt it" in wrong.json()["message"]
        odd = agent.post(url, json={"state": "pending"})
        assert odd.status_code == 422 and "not 'pending'" in odd.json()["message"]
        assert fed.leases() == [lease]  # nothing half-written
    finally:
        fed.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(events=EVENTS)
def test_random_event_sequences_keep_every_lease_legal_and_end_them_all(events):
    with tempfile.TemporaryDirectory() as folder:
        fed = Federation(Path(folder))
        try:
            for event in events:
                fed.apply(event)
                fed.check()
            fed.wind_down()
            fed.check()
            left = [le for le in fed.leases() if le["state"] != "ended"]
            assert left == [], left
        finally:
            fed.close()


def test_a_suspended_lease_is_released_by_its_user_and_by_its_clusters_close(tmp_path):
    """The owner froze the worker, then the user lets go of it (or the cluster closes): the
    lease moves to releasing with its suspended span closed, so its agent stops the worker
    (release() left a suspended lease as it was: it kept its provider's capacity forever)."""
    fed = Federation(tmp_path)
    try:
        for event in (("scale", 2), ("joined", 0), ("joined", 1), ("suspend", 0),
                      ("suspend", 1)):
            fed.apply(event)
        first, second = fed.leases()
        assert (first["state"], second["state"]) == ("suspended", "suspended")
        user = fed.as_(fed.user_token)
        answer = user.post(f"/clusters/{fed.cluster}/leases/release",
                           json={"lease_ids": [first["id"]]})
        assert answer.status_code == 200, answer.text
        fed.apply(("close",))
        for lease, reason in zip(fed.leases(), ("released", "released"), strict=True):
            assert lease["state"] == "releasing" and lease["release_reason"] == reason, lease
            ((_start, end),) = json.loads(lease["suspensions_json"])
            releasing_at = dt.datetime.fromisoformat(lease["releasing_at"])
            assert end is not None and dt.datetime.fromisoformat(end) == releasing_at.replace(
                tzinfo=dt.UTC), lease
        assert "cluster closed" in fed.leases()[1]["message"]
        fed.check()
        # The agent's list tells it to stop both.
        agent = fed.as_(fed.agent_token)
        listed = {le["id"]: le["state"] for p in fed.providers
                  for le in agent.get(f"/agent/{p}/leases").json()["leases"]}
        assert listed == {first["id"]: "releasing", second["id"]: "releasing"}
    finally:
        fed.close()


def test_a_lease_request_is_one_unit_of_work(tmp_path):
    """Admission and the insert of POST /leases commit together and the placement pass that
    follows in a unit of its own (the placer's): two commits, the leases it answers are
    already placed, and a refused request writes nothing."""
    from sqlalchemy import event

    fed = Federation(tmp_path)
    try:
        engine = fed.client.app.state.broker.engine
        commits: list[int] = []
        event.listen(engine, "commit", lambda _conn: commits.append(1))
        user = fed.as_(fed.user_token)
        answer = user.post(f"/clusters/{fed.cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": f"ls-{i:016x}"} for i in range(3)]})
        assert answer.status_code == 201, answer.text
        assert len(commits) == 2
        assert [le["state"] for le in answer.json()] == ["starting"] * 3
        before = fed.leases()
        commits.clear()
        # Two of the three ids exist already: refused (409) by the insert, which rolls back.
        refused = user.post(f"/clusters/{fed.cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": f"ls-{i:016x}"} for i in range(2, 5)]})
        assert refused.status_code == 409 and refused.json()["error"] == "lease-id-taken"
        assert f"['ls-{2:016x}']" in refused.json()["message"], refused.json()
        assert commits == [] and fed.leases() == before
        # One id twice in a request: refused before anything is read.
        twice = user.post(f"/clusters/{fed.cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": "ls-twice"}, {"lease_id": "ls-twice"}]})
        assert twice.status_code == 422 and twice.json()["error"] == "duplicate-lease-id"
        assert commits == [] and fed.leases() == before
    finally:
        fed.close()


def test_lease_ids_another_replica_takes_at_the_same_moment_refuse_the_whole_request(
        postgres_url):
    """Two labs' scale requests do not wait on each other's admission, so another replica
    may insert one of a request's ids while it admits them: its insert (COPY on PostgreSQL)
    is refused 409 naming that id, with nothing of it stored, the other's lease kept."""
    from sqlalchemy import event
    from sqlmodel import Session, select

    from federation.broker.models import Lease

    with in_process_broker(postgres_url, 1) as b:
        engine = b.app.state.broker.engine
        ids = ["ls-race-0", "ls-race-1", "ls-race-2"]
        inserted: list[str] = []

        def another_replica_inserts(_conn, _cursor, statement: str, *_args) -> None:
            # Right after the request's admission read its lab, before its insert.
            if not inserted and "FROM lab LEFT OUTER JOIN membership" in statement:
                inserted.append(ids[1])
                with Session(engine) as other:
                    other.add(Lease(id=ids[1], cluster_id=b.cid, cpus=1, memory=2**30))
                    other.commit()

        event.listen(engine, "after_cursor_execute", another_replica_inserts)
        try:
            answer = b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
                "spec": {"cpus": 1, "memory": "1 GiB"},
                "workers": [{"lease_id": i} for i in ids]})
        finally:
            event.remove(engine, "after_cursor_execute", another_replica_inserts)
        assert inserted == [ids[1]]
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == "lease-id-taken"
        assert "['ls-race-1']" in answer.json()["message"], answer.json()
        with Session(engine) as s:
            stored = s.exec(select(Lease.id).where(Lease.id.in_(ids))).all()
        assert stored == [ids[1]]


def test_a_scale_request_reads_its_lab_membership_and_balance_in_one_statement(db_url):
    """A scale request's admission reads the cluster, then the lab with its owner's
    membership and its balance in one statement, then the machines' shapes, and inserts:
    no read of its lease ids first (the primary key refuses a taken one; issue 14: under
    load every round trip waits for a core). The next one, while the shapes are
    remembered, does not read them. Its credit check still sees the balance."""
    import threading

    from sqlalchemy import event
    from sqlmodel import select

    from accounting.ledger import (
        AccountKind,
        TransferKind,
        lab_account,
        lab_balance,
        post_transfer,
        system_account,
    )
    from accounting.models import Lab
    from federation.broker.admission import ShapesSeen

    with in_process_broker(db_url, 1) as b:
        broker = b.app.state.broker
        statements: list[str] = []

        def requests_own(_conn, _cursor, statement: str, *_args) -> None:
            # The request's thread (AnyIO's pool), not the broker's own threads.
            if threading.current_thread().name.startswith("AnyIO"):
                statements.append(" ".join(statement.split()))

        def reads_of_a_scale_request(name: str) -> list[str]:
            statements.clear()
            event.listen(broker.engine, "before_cursor_execute", requests_own)
            try:
                answer = b.call(b.user, "POST", f"/clusters/{b.cid}/leases?wait=0", json={
                    "spec": {"cpus": 1, "memory": "1 GiB"},
                    "workers": [{"lease_id": f"ls-{name}{i}"} for i in range(3)]})
            finally:
                event.remove(broker.engine, "before_cursor_execute", requests_own)
            assert answer.status_code == 201, answer.text
            return [q for q in statements if q.startswith("SELECT")]

        # Forgets what the fixture's own request read; not to expire between the two.
        broker.shapes_seen = ShapesSeen(ttl=600)
        reads = reads_of_a_scale_request("first")
        assert len(reads) == 3, reads
        assert " FROM cluster " in reads[0]
        assert " FROM lab LEFT OUTER JOIN membership " in reads[1] and "balance" in reads[1]
        assert "SELECT DISTINCT lab.name" in reads[2]
        assert not any(" FROM lease" in q for q in reads), reads
        assert reads_of_a_scale_request("again") == reads[:2]
        # The balance read with the lab is the one the credit check uses: over the limit,
        # refused, nothing stored.
        with broker.session() as s:
            lab = s.exec(select(Lab).where(Lab.name == "lab-a")).one()
            lab.credit_limit = 1.0
            s.add(lab)
            moved = lab_balance(s, lab) + 2 * 10**9  # to owe 2 PCU
            post_transfer(s, kind=TransferKind.adjustment, memo="test: 2 PCU owed", entries=[
                (lab_account(s, lab).id, -moved),
                (system_account(s, AccountKind.federation).id, moved)])
            s.commit()
        refused = b.call(b.user, "POST", f"/clusters/{b.cid}/leases?wait=0", json={
            "spec": {"cpus": 1, "memory": "1 GiB"}, "workers": [{"lease_id": "ls-owing"}]})
        assert refused.status_code == 402 and refused.json()["error"] == "credit-limit", (
            refused.text)
        assert "balance is -2.00 PCU" in refused.json()["message"], refused.json()


def test_remembered_machine_shapes_never_refuse_a_worker_a_new_machine_hosts(db_url):
    """Admission answers "some machine fits" from the shapes it read lately, but never
    refuses from them: right after a refusal (8 CPUs, the only machine has 3), a machine of
    16 CPUs registers and the same request is admitted at once; then it is admitted from
    memory, without reading the shapes."""
    import threading

    from sqlalchemy import event

    from federation.broker.admission import ShapesSeen

    with in_process_broker(db_url, 1) as b:
        broker = b.app.state.broker
        broker.shapes_seen = ShapesSeen(ttl=600)
        shape_reads: list[str] = []

        def counts_shape_reads(_conn, _cursor, statement: str, *_args) -> None:
            if (threading.current_thread().name.startswith("AnyIO")
                    and "SELECT DISTINCT lab.name" in statement):
                shape_reads.append(statement)

        def ask(lease_id: str, cpus: int):
            return b.call(b.user, "POST", f"/clusters/{b.cid}/leases?wait=0", json={
                "spec": {"cpus": cpus, "memory": "1 GiB"}, "workers": [{"lease_id": lease_id}]})

        event.listen(broker.engine, "before_cursor_execute", counts_shape_reads)
        try:
            assert ask("ls-small", 1).status_code == 201  # the 3-CPU box's shape remembered
            refused = ask("ls-bigger0", 8)
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"] == "no-provider-fits", refused.json()
            assert b.call(b.agent, "POST", "/agent/register", json={
                "name": "big", "cpus": 16, "memory": "64 GiB"}).status_code == 201
            reads_before = len(shape_reads)
            admitted = ask("ls-bigger1", 8)
            assert admitted.status_code == 201, admitted.text
            assert len(shape_reads) == reads_before + 1  # read again, not refused from memory
            assert ask("ls-bigger2", 8).status_code == 201
            assert len(shape_reads) == reads_before + 1  # now from memory
        finally:
            event.remove(broker.engine, "before_cursor_execute", counts_shape_reads)


def test_a_cluster_heartbeat_is_few_statements_whatever_its_leases(tmp_path):
    """The heaviest of the frequent requests (every 5 s per cluster), with as many
    statements for three leases as for one (issue 14: under load every round trip waits
    for a core). One that confirms nothing new (most: the keeper lists every connected
    worker each time) reads and writes the cluster's last_seen in three statements and no
    transaction around them; one that confirms starting leases moves them in one, five
    statements in all, and clears what they said while starting."""
    from sqlalchemy import event

    fed = Federation(tmp_path)
    try:
        engine = fed.client.app.state.broker.engine
        statements: list[str] = []
        commits: list[int] = []
        event.listen(engine, "before_cursor_execute",
                     lambda _c, _cur, sql, *_a: statements.append(sql))
        event.listen(engine, "commit", lambda _conn: commits.append(1))
        user = fed.as_(fed.user_token)
        confirming, steady = [], []
        for workers in (1, 3):
            fed.apply(("scale", workers))
            starting = [le for le in fed.leases() if le["state"] == "starting"]
            ids = [le["id"] for le in starting]
            for le in starting:  # the agent's last word while it built the environment
                assert fed.as_(fed.agent_token).post(
                    f"/agent/{le['provider_id']}/leases/{le['id']}/state",
                    json={"state": "starting", "message": "installing 3 of 9 packages"}
                ).status_code == 200
            for counts in (confirming, steady):  # the same list twice
                statements.clear()
                commits.clear()
                answer = user.post(f"/clusters/{fed.cluster}/heartbeat",
                                   json={"connected": ids})
                assert answer.status_code == 200, answer.text
                shown = {le["id"]: le["state"] for le in answer.json()["leases"]}
                assert all(shown[i] == "running" for i in ids) and len(shown) == workers + (
                    0 if workers == 1 else 1), shown
                assert answer.json()["leases"][0]["lab"] == "lab-a"
                # Running: what it waited for is over, and its view says nothing of it.
                assert {le["message"] for le in answer.json()["leases"]
                        if le["id"] in ids} == {""}, answer.json()["leases"]
                writes = [q for q in statements
                          if not q.lstrip().upper().startswith("SELECT")]
                counts.append((len(statements), len(writes)))
                if counts is confirming:  # the cluster and the leases, in one transaction
                    assert len(writes) == 2 and len(commits) == 1, statements
        # Nothing new: the cluster with its owner's and lab's names, the leases with their
        # labs, the cluster's last_seen.
        assert steady == [(3, 1), (3, 1)], (steady, statements)
        # Confirming: those reads, then in one transaction the leases moved (locked first,
        # in the same statement), the cluster's last_seen and the leases read again (the
        # token is remembered).
        assert confirming == [(5, 2), (5, 2)], (confirming, statements)
    finally:
        fed.close()


def test_a_release_moves_its_running_leases_in_one_statement_and_the_rest_as_before(
        tmp_path):
    """The lease keeper releases ten workers at a time (issue 14's load: the second
    costliest statement was a release's, one update per lease). Running and starting leases
    move to releasing in one statement after the locked read; in the same request a pending
    lease ends, a suspended one's span closes, and one its owner already preempted keeps
    its reason."""
    from sqlalchemy import event

    fed = Federation(tmp_path)
    try:
        engine = fed.client.app.state.broker.engine
        user, agent = fed.as_(fed.user_token), fed.as_(fed.agent_token)
        fed.apply(("scale", 5))  # two boxes of 2 CPUs: four placed, one pending
        placed = [le for le in fed.leases() if le["state"] == "starting"]
        pending = [le["id"] for le in fed.leases() if le["state"] == "pending"]
        assert len(placed) == 4 and len(pending) == 1
        running, suspended, preempted, starting = (le["id"] for le in placed)
        assert user.post(f"/clusters/{fed.cluster}/heartbeat", json={
            "connected": [running, suspended, preempted]}).status_code == 200
        by_id = {le["id"]: le for le in placed}
        for lease, body in ((suspended, {"state": "suspended"}),
                            (preempted, {"state": "releasing", "reason": "preempted"})):
            assert agent.post(f"/agent/{by_id[lease]['provider_id']}/leases/{lease}/state",
                              json={**body, "message": "owner back"}).status_code == 200

        # (statement, executemany): the placer's thread may run a pass meanwhile.
        statements: list[tuple[str, bool]] = []
        event.listen(engine, "before_cursor_execute",
                     lambda _c, _cur, sql, _p, _ctx, many: statements.append((sql, many)))
        answer = user.post(f"/clusters/{fed.cluster}/leases/release",
                           json={"lease_ids": [running, starting]})
        assert answer.status_code == 200, answer.text
        moves = [(q, many) for q, many in statements
                 if q.startswith("UPDATE lease") and "release_reason" in q]
        assert len(moves) == 1 and not moves[0][1], statements
        # The leases read for it are their ids, clusters, machines and states, not whole
        # rows with their certificates.
        reads = [q for q, _many in statements
                 if q.startswith("SELECT lease.") and "WHERE lease.id IN" in q]
        assert reads and not any("worker_cert" in q for q in reads), reads
        answer = user.post(f"/clusters/{fed.cluster}/leases/release",
                           json={"lease_ids": [suspended, preempted, pending[0]]})
        assert answer.status_code == 200, answer.text

        rows = {le["id"]: le for le in fed.leases()}
        for lease in (running, starting, suspended):
            assert rows[lease]["state"] == "releasing", rows[lease]
            assert rows[lease]["release_reason"] == "released", rows[lease]
            assert rows[lease]["releasing_at"] is not None, rows[lease]
        assert rows[running]["started_at"] is not None and rows[starting]["started_at"] is None
        # The suspended one's span is closed by its release; the preempted one is untouched.
        spans = json.loads(rows[suspended]["suspensions_json"])
        assert len(spans) == 1 and spans[0][1] is not None, spans
        assert (rows[preempted]["state"], rows[preempted]["release_reason"]) == (
            "releasing", "preempted"), rows[preempted]
        assert (rows[pending[0]]["state"], rows[pending[0]]["end_reason"]) == (
            "ended", "released"), rows[pending[0]]
        # Another cluster's lease, or an unknown one, is refused with nothing written.
        before = fed.leases()
        answer = user.post(f"/clusters/{fed.cluster}/leases/release",
                           json={"lease_ids": [running, "ls-unknown"]})
        assert answer.status_code == 404 and "ls-unknown" in answer.text, answer.text
        assert fed.leases() == before
    finally:
        fed.close()


def test_a_cluster_heartbeat_and_its_view_show_leases_that_ended_lately(tmp_path):
    """A keeper heartbeats within the cluster timeout, so its answer holds live leases and
    those ended in the last 10 minutes (at least three cluster timeouts), not every lease
    the cluster ever had; reading the cluster shows the same (every ended lease has a job
    record instead)."""
    fed = Federation(tmp_path)
    try:
        fed.apply(("scale", 3))
        old, recent, live = (le["id"] for le in fed.leases())
        user, agent = fed.as_(fed.user_token), fed.as_(fed.agent_token)
        for lease_id in (old, recent):
            provider = next(le["provider_id"] for le in fed.leases() if le["id"] == lease_id)
            assert agent.post(f"/agent/{provider}/leases/{lease_id}/state",
                              json={"state": "ended"}).status_code == 200
        # The test's clock: one ended 11 minutes ago, the other 9.
        with contextlib.closing(sqlite3.connect(fed.db_path)) as c:
            for lease_id, minutes in ((old, 11), (recent, 9)):
                c.execute("UPDATE lease SET ended_at = datetime(ended_at, ?) WHERE id = ?",
                          (f"-{minutes} minutes", lease_id))
            c.commit()
        beat = user.post(f"/clusters/{fed.cluster}/heartbeat", json={"connected": []})
        assert {le["id"] for le in beat.json()["leases"]} == {recent, live}
        view = user.get(f"/clusters/{fed.cluster}").json()["leases"]
        assert {le["id"]: le["state"] for le in view} == {recent: "ended", live: "starting"}
        listed = user.get("/clusters").json()
        assert [{le["id"] for le in c["leases"]} for c in listed] == [{recent, live}]
    finally:
        fed.close()


def test_upgrade_moves_a_releasing_leases_target_out_of_its_end_reason(tmp_path):
    """Migration 0007: a lease releasing during the upgrade keeps its target as
    release_reason and has no end reason until it ends; a downgrade puts it back."""
    from sqlalchemy import text

    from federation.broker import db
    from tests.utils.schema import insert_lab_user_cluster

    engine = db.plain_engine(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(engine, "0006")
    t = "2026-01-01 00:00:00"
    with engine.begin() as c:
        insert_lab_user_cluster(c, t)
        for lease_id, state, reason in (("ls-going", "releasing", "lost"),
                                        ("ls-gone", "ended", "released")):
            c.execute(text(
                "INSERT INTO lease (id, cluster_id, \"group\", cpus, memory, gpus, "
                "gpu_indices_json, state, end_reason, message, worker_csr, worker_cert, "
                "created_at) VALUES (:i, 'c1', 'default', 1, 1, 0, '[]', :s, :r, '', '', '', "
                ":t)"), {"i": lease_id, "s": state, "r": reason, "t": t})
    db.migrate(engine)
    query = text("SELECT id, release_reason, end_reason FROM lease ORDER BY id")
    with engine.connect() as c:
        assert c.execute(query).all() == [("ls-going", "lost", None),
                                          ("ls-gone", None, "released")]
    db.migrate(engine, "0006", downgrade=True)
    with engine.connect() as c:
        assert dict(c.execute(text("SELECT id, end_reason FROM lease")).all()) == {
            "ls-going": "lost", "ls-gone": "released"}


@pytest.mark.parametrize("interrupted", ["certificate", "request"])
def test_a_certificate_and_a_new_signing_request_racing_leave_the_new_request(tmp_path,
                                                                            interrupted):
    """The cluster's certificate is checked against the lease's signing request, then
    written; an agent may replace its request (a new key) at any moment. Whichever write
    lands between the other's read and write, the new request must be left waiting, without
    the old request's certificate: stored over the new request, that certificate (not for
    the agent's key) left the lease starting until its start timeout, the cluster seeing no
    request left to sign (a fresh-clone run's GPU test)."""
    import threading

    from sqlalchemy import event
    from sqlmodel import Session

    from federation.broker.models import ClusterRecord, Provider, WorkerCertificate
    from federation.tls import key_matches, worker_key_and_request

    fed = Federation(tmp_path)
    try:
        broker = fed.client.app.state.broker
        authority = ClusterAuthority()
        user, agent = fed.as_(fed.user_token), fed.as_(fed.agent_token)
        cluster = user.post("/clusters", json={"scheduler_address": "tls://127.0.0.1:1",
                                               "ca_cert": authority.ca_pem}).json()["id"]
        (lease,) = user.post(f"/clusters/{cluster}/leases", json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": "ls-00000000000000c5"}]}).json()
        lid, pid = lease["id"], lease["provider_id"]
        assert lease["state"] == "starting" and pid
        _first_key, first = worker_key_and_request(lid)
        assert agent.post(f"/agent/{pid}/leases/{lid}/csr", json={"csr": first}).status_code \
            == 202
        (asked,) = user.get(f"/clusters/{cluster}/signing-requests").json()["requests"]
        certificate = authority.sign_worker_request(lid, asked["csr"])
        second_key, second = worker_key_and_request(lid)
        with Session(broker.engine) as s:
            provider, record = s.get(Provider, pid), s.get(ClusterRecord, cluster)

        def store_certificate() -> None:
            broker.submit_certificates(record, [WorkerCertificate(lease_id=lid,
                                                                  cert=certificate)])

        def replace_request() -> None:
            broker.submit_signing_request(provider, lid, second)

        first_write, second_write = ((store_certificate, replace_request)
                                     if interrupted == "certificate"
                                     else (replace_request, store_certificate))
        # The other write lands right after the first one read the lease, before it writes.
        landed = threading.Event()

        def after_the_read(_conn, _cursor, statement, *_args) -> None:
            if landed.is_set() or not statement.lstrip().upper().startswith("SELECT") \
                    or "FROM lease" not in statement:
                return
            landed.set()
            other = threading.Thread(target=second_write)
            other.start()
            other.join(30)

        event.listen(broker.engine, "after_cursor_execute", after_the_read)
        try:
            first_write()
        finally:
            event.remove(broker.engine, "after_cursor_execute", after_the_read)
        assert landed.is_set()
        # Stored then replaced, or skipped as no longer for the waiting request: either way
        # the new request waits, with no certificate.
        (row,) = fed.table(f"SELECT worker_csr, worker_cert FROM lease WHERE id = '{lid}'")
        assert row == {"worker_csr": second, "worker_cert": ""}
        # The cluster is asked for the new request; its certificate is stored and is for
        # the agent's new key.
        (asked,) = user.get(f"/clusters/{cluster}/signing-requests").json()["requests"]
        assert asked["csr"] == second
        renewed = authority.sign_worker_request(lid, second)
        assert user.post(f"/clusters/{cluster}/certificates", json={
            "certificates": [{"lease_id": lid, "cert": renewed}]}).json() == {"accepted": 1}
        (listed,) = [le for le in agent.get(f"/agent/{pid}/leases").json()["leases"]
                     if le["id"] == lid]
        assert key_matches(listed["cert"], second_key)
    finally:
        fed.close()
