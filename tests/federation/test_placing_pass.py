"""What a placement pass reads: every online, offering provider with what its held leases
use, in one statement (``online_providers``), and providers' preemption rates, which a
replica remembers for a minute (``RecentPreemptionRates``). Through the real broker in this
process, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time

from sqlmodel import select

from federation.broker.models import HELD_STATES, Lease, LeaseState, Provider
from federation.broker.placing import capacity_left, online_providers
from federation.broker.preemption import RecentPreemptionRates, preemption_rates
from tests.utils.in_process import in_process_broker

GiB = 2**30


def held_by_provider(s) -> dict[str, tuple[float, int, set[int]]]:
    """The same sums, counted here lease by lease."""
    out: dict[str, tuple[float, int, set[int]]] = {}
    for lease in s.exec(select(Lease).where(Lease.state.in_(HELD_STATES))):
        cpus, memory, gpus = out.get(lease.provider_id, (0.0, 0, set()))
        out[lease.provider_id] = (cpus + lease.cpus, memory + lease.memory,
                                  gpus | set(json.loads(lease.gpu_indices_json or "[]")))
    return out


def test_a_pass_sees_what_held_leases_use_and_only_providers_that_offer(db_url):
    with in_process_broker(db_url, 2) as b:  # "box": 3 CPUs, two 1-CPU/1-GiB leases running
        broker = b.app.state.broker
        gpu = b.call(b.agent, "POST", "/agent/register", json={
            "name": "gpu-box", "cpus": 4, "memory": "16 GiB", "gpus": [
                {"index": 0, "model": "A100", "memory": 40 * GiB},
                {"index": 1, "model": "A100", "memory": 40 * GiB}]}).json()["provider_id"]
        kept = b.call(b.agent, "POST", "/agent/register", json={
            "name": "kept-box", "cpus": 8, "memory": "16 GiB"}).json()["provider_id"]
        assert b.call(b.agent, "POST", f"/agent/{kept}/heartbeat", json={
            "running": [], "offering": False, "offer_note": "owner typing"}).status_code == 200
        answer = b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 1, "memory": "2 GiB", "gpus": 1},
            "workers": [{"lease_id": "ls-gpu-lease-0"}]})
        assert answer.status_code == 201, answer.text
        assert answer.json()[0]["provider_id"] == gpu

        def seen() -> dict:
            with broker.session() as s:
                return {p.id: p for p in online_providers(s)}, held_by_provider(s)

        found, held = seen()
        assert set(found) == {b.box, gpu}  # the owner keeps kept-box: nothing new goes there
        box = found[b.box]
        assert (box.used.cpus, box.used.memory, box.used.gpu_indices) == (2.0, 2 * GiB, set())
        assert (found[gpu].used.cpus, found[gpu].used.memory) == (1.0, 2 * GiB)
        assert len(found[gpu].used.gpu_indices) == 1
        for pid, p in found.items():
            assert (p.used.cpus, p.used.memory, p.used.gpu_indices) == held[pid]
        free = capacity_left(found[gpu], {})
        assert (free.free_cpus, free.free_memory) == (3.0, 14 * GiB)
        assert [g.index for g in free.free_gpus] == sorted({0, 1} - found[gpu].used.gpu_indices)

        # Releasing still holds the machine until the agent says the worker ended.
        first, second = b.ids
        b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
               json={"lease_ids": [first]}).raise_for_status()
        assert seen()[0][b.box].used.cpus == 2.0
        b.call(b.agent, "POST", f"/agent/{b.box}/leases/{first}/state",
               json={"state": "ended"}).raise_for_status()
        found, held = seen()
        assert (found[b.box].used.cpus, found[b.box].used.memory) == (1.0, GiB)
        assert held[b.box][:2] == (1.0, GiB)


def test_preemption_rates_are_remembered_for_their_time_only(db_url):
    with in_process_broker(db_url, 2) as b:
        broker = b.app.state.broker
        first, second = b.ids
        remembered = RecentPreemptionRates(ttl=3600)
        asked_each_time = RecentPreemptionRates(ttl=0)
        with broker.session() as s:
            assert remembered.rates(s, [b.box]) == {b.box: 0.0}
        # One lease released, one preempted by the machine's owner: half of those that ended.
        b.call(b.user, "POST", f"/clusters/{b.cid}/leases/release",
               json={"lease_ids": [first]}).raise_for_status()
        for lease, report in ((first, {"state": "ended"}),
                              (second, {"state": "releasing", "reason": "preempted"}),
                              (second, {"state": "ended", "reason": "preempted"})):
            b.call(b.agent, "POST", f"/agent/{b.box}/leases/{lease}/state",
                   json=report).raise_for_status()
        with broker.session() as s:
            assert preemption_rates(s, [b.box]) == {b.box: 0.5}
            assert asked_each_time.rates(s, [b.box]) == {b.box: 0.5}
            assert RecentPreemptionRates(ttl=3600).rates(s, [b.box]) == {b.box: 0.5}
            # Remembered from before the leases ended, for up to its time (an hour here).
            assert remembered.rates(s, [b.box]) == {b.box: 0.0}


def test_a_provider_that_goes_silent_during_a_pass_gets_nothing_from_it(tmp_path):
    """The reaper ends a silent provider's leases in the placement section: a pass that read
    the provider online just before must not then place a lease on it (the lease would wait
    on a dead machine until its start timeout; found by the random event sequences of
    test_lease_states). On SQLite, where the pass runs in the broker's process, so the
    reaper can be made to strike between the pass's read and its write; on PostgreSQL the
    pass and the reaper take the same advisory lock."""
    import sqlite3
    import threading

    from sqlalchemy import event

    db_path = tmp_path / "broker.db"
    with in_process_broker(f"sqlite:///{db_path}", 2) as b:  # "box": 3 CPUs, 2 leases run
        broker = b.app.state.broker
        big = b.call(b.user, "POST", f"/clusters/{b.cid}/leases", json={
            "spec": {"cpus": 2, "memory": "1 GiB"}, "workers": [{"lease_id": "ls-bigone"}]})
        assert [le["state"] for le in big.json()] == ["pending"], big.text  # 1 CPU free
        struck = threading.Event()
        reaper: list[threading.Thread] = []
        read_providers = threading.Event()

        def strike(_conn, _cursor, statement, *_args) -> None:
            # The pass read the providers (fetched, as it goes on to its next statement): now
            # the new one goes silent.
            if threading.current_thread().name != "parallex-placer" or reaper:
                return
            if not read_providers.is_set():
                if (statement.lstrip().upper().startswith("SELECT")
                        and "provider.offering" in statement):
                    with sqlite3.connect(db_path) as c:  # a pass from after the registration
                        if c.execute("SELECT 1 FROM provider WHERE name = 'spare'").fetchone():
                            read_providers.set()
                return
            with sqlite3.connect(db_path) as c:
                c.execute("UPDATE provider SET last_seen = datetime(last_seen, '-1 hour') "
                          "WHERE name = 'spare'")
            reaper.append(threading.Thread(target=broker.reap))
            reaper[0].start()
            reaper[0].join(1.0)  # it waits for the pass (or, unfixed, ends the provider now)
            struck.set()

        event.listen(broker.engine, "before_cursor_execute", strike)
        try:
            spare = b.call(b.agent, "POST", "/agent/register", json={
                "name": "spare", "cpus": 4, "memory": "8 GiB"})
            assert spare.status_code == 201, spare.text
            assert struck.wait(30), "no placement pass read the providers"
            # Passes run one after another: once a pass asked now has run, the struck one
            # has finished.
            assert broker.placing_thread.ask_and_wait(30)
            reaper[0].join(30)
            assert not reaper[0].is_alive()
        finally:
            event.remove(broker.engine, "before_cursor_execute", strike)
        with broker.session() as s:
            lease = s.get(Lease, "ls-bigone")
            provider = s.get(Provider, spare.json()["provider_id"])
            assert not provider.online
            # Placed by the pass, then ended lost by the reaper after it; never left held
            # on the offline machine.
            assert lease.state in (LeaseState.pending, LeaseState.ended), lease


def test_on_postgresql_a_provider_goes_offline_only_under_the_placement_lock(postgres_url):
    """On PostgreSQL the pass runs in the placement process, which takes the placement
    advisory lock for its whole read and write: ending a provider that timed out (the
    reaper) or said it goes offline (its agent) waits for that lock, so no pass can place on
    it from a read made just before."""
    import threading
    import time

    from sqlalchemy import text

    from federation.broker.placing import PLACEMENT_LOCK

    with in_process_broker(postgres_url, 1) as b:  # "box": 3 CPUs, one lease running
        broker = b.app.state.broker
        spare = b.call(b.agent, "POST", "/agent/register", json={
            "name": "spare", "cpus": 4, "memory": "8 GiB"}).json()["provider_id"]

        def online(provider_id: str) -> bool:
            with broker.session() as s:
                return s.get(Provider, provider_id).online

        def while_a_pass_holds_the_lock(change) -> None:
            """``change`` waits while a pass holds the lock, and is done once it is free."""
            with broker.engine.connect() as holder:
                holder.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                               {"key": PLACEMENT_LOCK})
                worker = threading.Thread(target=change)
                worker.start()
                worker.join(0.5)
                assert worker.is_alive(), "it did not wait for the placement lock"
                holder.rollback()  # the pass ends
            worker.join(30)
            assert not worker.is_alive()

        # Its agent stops: the machine goes offline and its lease ends.
        while_a_pass_holds_the_lock(lambda: b.call(b.agent, "POST", f"/agent/{b.box}/offline"))
        assert not online(b.box)
        # The other goes silent past the provider timeout: the reaper finds it lost.
        with broker.session() as s:
            s.exec(text("UPDATE provider SET last_seen = last_seen - interval '1 hour' "
                        "WHERE id = :id").bindparams(id=spare))
            s.commit()
        assert online(spare)
        # Its first pass starts the periodic process and meters (seconds): done before.
        broker._last_metering = broker._last_capacity = time.monotonic()
        while_a_pass_holds_the_lock(broker.reap)
        assert not online(spare)


def test_passes_asked_back_to_back_are_spaced_and_the_asks_between_share_one(db_url):
    """Under churn each scale request and release asks for a pass, and each pass with
    something to place reads every online machine with its usage (issue 14's load: the
    heaviest statement on the database, a pass every 75 ms). The placer starts a pass at
    most every ``--placement-spacing`` seconds; the asks in between are served by one."""
    spacing = 1.0
    with in_process_broker(db_url, 1, placement_spacing=spacing) as b:
        placer = b.app.state.broker.placer
        assert placer.placer.wait(placer.ask().n, 10)  # served: the pass has ended
        served = time.monotonic()
        passes = placer.placer.passes
        tickets = [placer.ask().n for _ in range(5)]
        assert placer.placer.wait(tickets[-1], 10)
        second = time.monotonic()
        assert placer.placer.passes == passes + 1  # five asks, one pass
        assert placer.placer.wait(placer.ask().n, 10)
        third = time.monotonic()
        # Each pass started at least the spacing after the one before it (the first pass
        # took a moment of the first interval: hence the margin).
        assert second - served >= spacing - 0.2, second - served
        assert third - second >= spacing - 0.2, third - second
