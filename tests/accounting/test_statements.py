"""What a PI, a member and an administrator read from the books, with real agents: roles,
explained charges, savings, cluster cost and estimates, and reliability after a lost machine."""

from __future__ import annotations

import os
import subprocess
from decimal import Decimal

import pytest

from accounting.reliability import factor
from federation import FederatedCluster, NotFound, PermissionDenied
from federation.client import BrokerClient
from tests.utils.federation import make_federation
from tests.utils.procs import parallex, start_broker, wait_until

GiB = 2**30


@pytest.fixture
def labs_with_pis(tmp_path):
    """lab-a: alice (member), carol (PI), no machines. lab-b: bob (member), dave (PI), one
    2-CPU agent. Metering every second."""
    fed = make_federation(tmp_path, provider_timeout=4, cluster_timeout=10,
                          broker_args=("--metering-interval", "1", "--initial-grant", "500"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b", user="bob")
        fed.add_user("lab-a", "carol", role="pi")
        fed.add_user("lab-b", "dave", role="pi")
        fed.add_agent("lab-b", "agent-b", cpus=2, memory="4 GiB")
        yield fed
    finally:
        fed.stop()


def as_user(fed, user: str) -> BrokerClient:
    return BrokerClient(fed.url, fed.user_tokens[user])


def test_cost_estimate_roles_and_explained_charges(labs_with_pis):
    fed = labs_with_pis
    alice, bob, carol, dave = (as_user(fed, u) for u in ("alice", "bob", "carol", "dave"))
    admin = fed.admin()
    try:
        with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                              worker_memory="1 GiB", heartbeat_interval=0.5) as cluster:
            cluster.scale(1)
            cluster.wait_for_workers(1, timeout=60)
            # 1 CPU at 1 PCU/h + 1 GiB at 0.1 PCU/h on another lab's machine: charged in full.
            est = cluster.estimate(4, cpus=2, memory="2 GiB")
            assert est.current_pcu_per_hour == pytest.approx(1.1)
            assert est.current_list_pcu_per_hour == pytest.approx(1.1)
            assert est.planned_pcu_per_hour_per_worker == pytest.approx(2.2)
            assert est.planned_pcu_per_hour == pytest.approx(8.8)
            assert est.planned_cloud_cost_per_hour > 0
            assert "4 workers: 8.8 PCU/h" in str(est)
            first = wait_until(lambda: cluster.cost if cluster.cost > 0 else None, 30,
                               "a cost above zero")
            wait_until(lambda: cluster.cost_details()["metered_pcu"] != "0", 30,
                       "a metered period")
            assert wait_until(lambda: cluster.cost if cluster.cost > first else None, 30,
                              "the cost to grow while the worker runs") > first
            with pytest.raises(ValueError, match="whole number of workers"):
                cluster.estimate(-1)

            with FederatedCluster(fed.url, fed.user_tokens["bob"], dashboard=False,
                                  worker_memory="1 GiB", heartbeat_interval=0.5) as own:
                own.scale(1)
                own.wait_for_workers(1, timeout=60)
                own_est = own.estimate()
                # bob's worker runs on his own lab's machine: free, though it has a list price.
                assert own_est.current_pcu_per_hour == 0
                assert own_est.current_list_pcu_per_hour == pytest.approx(1.1)
                assert own.cost == 0
            wait_until(lambda: Decimal(alice.request("GET", "/usage")["rows"][0]["pcu"]) > 0
                       if alice.request("GET", "/usage")["rows"] else None, 30,
                       "alice's usage")

        # ---- a member sees their own usage, a PI their lab's, an admin everyone's ----------
        mine = alice.request("GET", "/usage", params={"by": "user"})
        assert [r["user"] for r in mine["rows"]] == ["alice"]
        assert mine["scope"] == "lab-a, alice only"
        assert [r["user"] for r in bob.request("GET", "/usage", params={"by": "user"})["rows"]] \
            == ["bob"]
        lab_a = carol.request("GET", "/usage", params={"by": "user"})
        assert [r["user"] for r in lab_a["rows"]] == ["alice"] and lab_a["scope"] == "lab-a"
        everyone = admin.request("GET", "/usage", params={"by": "user"})
        assert {r["user"] for r in everyone["rows"]} == {"alice", "bob"}

        # ---- savings: each record carries its cloud equivalent -----------------------------
        row = mine["rows"][0]
        cloud = admin.request("GET", "/prices")["cloud_reference"]
        per_hour = cloud["cpu_hour"] + cloud["memory_gib_hour"]  # 1 CPU, 1 GiB
        assert row["cloud_cost"] == pytest.approx(per_hour * row["lease_hours"], rel=1e-3)

        # ---- a PI sees the members of their lab only ---------------------------------------
        members = carol.request("GET", "/labs/lab-a/members")["members"]
        assert {(m["user"], m["role"]) for m in members} == {("alice", "member"),
                                                             ("carol", "pi")}
        assert Decimal(next(m for m in members if m["user"] == "alice")["pcu"]) > 0
        with pytest.raises(PermissionDenied, match="for its PIs and administrators"):
            alice.request("GET", "/labs/lab-a/members")
        with pytest.raises(PermissionDenied, match="lab lab-b's books are for its members"):
            carol.request("GET", "/labs/lab-b/members")
        with pytest.raises(PermissionDenied, match="for its PIs and administrators"):
            bob.request("GET", "/usage", params={"side": "provided"})

        # ---- earnings: what lab-b's machine earned, at reliability 1.0 ----------------------
        (machine,) = dave.request("GET", "/labs/lab-b/machines")["machines"]
        assert machine["name"] == "agent-b" and machine["reliability"] == 1.0
        provided = dave.request("GET", "/usage", params={"side": "provided",
                                                         "by": "provider"})["rows"]
        assert provided[0]["reliability"] == 1.0
        assert Decimal(provided[0]["earned_pcu"]) == Decimal(provided[0]["pcu"]) \
            == Decimal(machine["earned_pcu"]) > 0

        # ---- why was I charged this? ------------------------------------------------------
        entries = alice.request("GET", "/labs/lab-a/ledger")["entries"]
        charge = next(e for e in entries if e["kind"] == "usage")
        assert charge["usage"]["user"] == "alice" and charge["usage"]["side"] == "charged"
        told = alice.request("GET", f"/transfers/{charge['transfer_id']}")
        text = "\n".join(told["explanation"])
        assert "1 CPU × 1 PCU/h + 1 GiB × 0.1 PCU/h = 1.1 PCU/h" in text
        assert "lab-a was charged" in text and "× 1.000 reliability of agent-b" in text
        assert sum(Decimal(e["amount"]) for e in told["entries"]) == 0
        assert -Decimal(told["usage"]["charge"]) == Decimal(charge["amount"])
        # lab-b earned from this transfer and may read it, but not who in lab-a used it.
        seen_by_bob = bob.request("GET", f"/transfers/{charge['transfer_id']}")
        assert "a member of lab-a" in seen_by_bob["explanation"][0]
        assert "alice" not in "\n".join(seen_by_bob["explanation"])
        grant_to_a = next(e for e in entries if e["kind"] == "grant")
        with pytest.raises(NotFound, match="no transfer"):
            bob.request("GET", f"/transfers/{grant_to_a['transfer_id']}")
    finally:
        for c in (alice, bob, carol, dave, admin):
            c.close()

    # ---- the same from the command line ---------------------------------------------------
    def cli(user: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PARALLEX_BROKER_URL": fed.url,
               "PARALLEX_TOKEN": fed.user_tokens[user]}
        return subprocess.run(parallex("--log-level", "WARNING", *args), env=env,
                              capture_output=True, text=True, timeout=60)

    explained = cli("alice", "ledger", "--explain", str(charge["transfer_id"]))
    assert explained.returncode == 0, explained.stderr
    assert "= 1.1 PCU/h" in explained.stdout and "lab-b earned" in explained.stdout
    listed = cli("carol", "lab", "members")
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout and "carol" in listed.stdout
    refused = cli("alice", "lab", "members")
    assert refused.returncode == 1 and "for its PIs and administrators" in refused.stderr
    machines = cli("dave", "lab", "machines")
    assert "agent-b" in machines.stdout and "1.000" in machines.stdout
    by_provider = cli("dave", "usage", "--side", "provided", "--by", "provider")
    assert "reliability" in by_provider.stdout and "agent-b" in by_provider.stdout


def test_lost_machine_lowers_reliability_and_what_its_lab_earns(labs_with_pis):
    fed = labs_with_pis
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB", heartbeat_interval=0.5) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        (lease_id,) = [le["id"] for le in cluster.leases if le["state"] == "running"]
        fed.agents["agent-b"].kill9()

        def lost():
            lease = next(le for le in fed.admin().request(
                "GET", f"/clusters/{cluster.cluster_id}")["leases"] if le["id"] == lease_id)
            return lease if lease["state"] == "ended" else None

        assert wait_until(lost, fed.provider_timeout + 15, "the lease to end")["end_reason"] \
            == "lost"
    fed.wait_until_charged()  # the lost lease's last part is charged after it ends
    admin = fed.admin()
    try:
        (provider,) = admin.request("GET", "/providers")
        # One lost lease: 0.5 + 0.5 * 2^(-1/2).
        assert provider["reliability"] == pytest.approx(factor(1.0), abs=1e-4)
        (machine,) = admin.request("GET", "/labs/lab-b/machines")["machines"]
        assert (machine["lost_leases"], machine["failed_leases"]) == (1, 0)
        # The lost lease's last period was metered after the loss: paid at the lower factor.
        records = fed.db_dicts("SELECT * FROM usagerecord ORDER BY period_end")
        final = records[-1]
        assert final["reliability"] == pytest.approx(factor(1.0), abs=1e-4)
        assert final["earned"] == int(final["charge"] * final["reliability"])
        # Periods metered before the loss kept the full factor; none after it did.
        factors = [r["reliability"] for r in records]
        assert factors[0] == 1.0 and factors == sorted(factors, reverse=True)
        earned = sum(r["earned"] for r in records)
        charged = sum(r["charge"] for r in records)
        assert earned < charged
        # The books still balance: lab-b got what was earned, the federation the rest.
        assert fed.balance("lab-b") == Decimal(500) + Decimal(earned) / 10**9
        assert fed.balance("lab-a") == Decimal(500) - Decimal(charged) / 10**9
        assert fed.db_value("SELECT SUM(amount) FROM ledgerentry") == 0
    finally:
        admin.close()


def test_broker_cloud_price_table_is_configurable_and_checked(tmp_path):
    table = tmp_path / "cloud.yaml"
    table.write_text("currency: EUR\ncpu_hour: 0.05\nmemory_gib_hour: 0.01\n"
                     "gpu_hour: {h100: 5}\ndefault_gpu_hour: 2\n")
    broker, url = start_broker(tmp_path, "t" * 32, extra=("--cloud-prices", str(table)))
    try:
        admin = BrokerClient(url, "t" * 32)
        ref = admin.request("GET", "/prices")["cloud_reference"]
        admin.close()
        assert ref == {"currency": "EUR", "cpu_hour": 0.05, "memory_gib_hour": 0.01,
                       "gpu_hour": {"h100": 5.0}, "default_gpu_hour": 2.0}
    finally:
        broker.stop()

    table.write_text("cpu_hour: -1\n")
    bad = subprocess.run(parallex("broker", "--db-url", f"sqlite:///{tmp_path / 'b.db'}",
                                  "--port", "0", "--cloud-prices", str(table)),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "negative prices for ['cpu_hour']" in bad.stderr and "Traceback" not in bad.stderr
