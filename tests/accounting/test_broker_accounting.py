"""The broker's books with real agents: a lab pays for another lab's machines, its own
machines are free, members read only their own lab, and bad requests write nothing."""

from __future__ import annotations

from decimal import Decimal

import pytest

from federation import FederatedCluster, NotFound, PermissionDenied, RequestRejected
from federation.client import BrokerClient
from tests.utils.federation import make_federation
from tests.utils.procs import wait_until

BOOK_TABLES = ("account", "transfer", "ledgerentry", "balance", "priceversion", "usagerecord")


@pytest.fixture
def metered(tmp_path):
    """lab-a (alice, no machines) and lab-b (bob, one 2-CPU agent); 1-second metering."""
    fed = make_federation(tmp_path, provider_timeout=5, cluster_timeout=10,
                          broker_args=("--metering-interval", "1", "--initial-grant", "500"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b", user="bob")
        fed.add_agent("lab-b", "agent-b", cpus=2, memory="4 GiB")
        yield fed
    finally:
        fed.stop()


def client_for(fed, user: str) -> BrokerClient:
    return BrokerClient(fed.url, fed.user_tokens[user])


def usage_by_user(fed) -> dict[str, dict]:
    admin = fed.admin()
    try:
        return {r["user"]: r for r in admin.request("GET", "/usage",
                                                    params={"by": "user"})["rows"]}
    finally:
        admin.close()


def run_cluster(fed, user: str, periods: int) -> None:
    with FederatedCluster(fed.url, fed.user_tokens[user], dashboard=False,
                          worker_memory="1 GiB", heartbeat_interval=0.5) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        wait_until(lambda: usage_by_user(fed).get(user, {}).get("lease_hours", 0)
                   >= periods / 3600, 60, f"{periods} metered periods of {user}'s lease")
    # Closing releases the lease; its last part is charged once its agent reports the worker
    # stopped (right after closing, it is not yet).
    fed.wait_until_charged()


def test_consumer_pays_provider_earns_and_own_machines_are_free(metered):
    fed = metered
    assert fed.balance("lab-a") == fed.balance("lab-b") == Decimal(500)

    run_cluster(fed, "bob", periods=2)  # lab-b on its own machine
    bob = usage_by_user(fed)["bob"]
    assert Decimal(bob["pcu"]) == 0 and Decimal(bob["self_use_pcu"]) > 0
    assert fed.balance("lab-b") == Decimal(500)

    run_cluster(fed, "alice", periods=3)  # lab-a on lab-b's machine
    alice = usage_by_user(fed)["alice"]
    charged = Decimal(alice["pcu"])
    # 1 CPU at 1 PCU/h + 1 GiB at 0.1 PCU/h, for the metered time (ended leases included).
    assert charged == pytest.approx(Decimal("1.1") * Decimal(str(alice["lease_hours"])),
                                    rel=Decimal("1e-3"))  # hours are rounded to 1e-6
    assert alice["core_hours"] == pytest.approx(alice["lease_hours"])
    assert fed.balance("lab-a") == Decimal(500) - charged
    # Reliability 1.0 and no fee by default: the provider earns what the consumer pays.
    assert fed.balance("lab-b") == Decimal(500) + charged

    assert fed.db_value("SELECT SUM(amount) FROM ledgerentry") == 0
    assert fed.db_value("SELECT SUM(amount) FROM balance") == 0
    dupes = fed.db_value("SELECT COUNT(*) FROM (SELECT lease_id, period_start FROM "
                         "usagerecord GROUP BY 1, 2 HAVING COUNT(*) > 1)")
    assert dupes == 0

    ledger = client_for(fed, "alice").request("GET", "/labs/lab-a/ledger")["entries"]
    assert {e["kind"] for e in ledger} == {"usage", "grant"}
    assert sum(Decimal(e["amount"]) for e in ledger) == fed.balance("lab-a")


def test_members_read_only_their_own_lab(metered):
    fed = metered
    alice, bob = client_for(fed, "alice"), client_for(fed, "bob")
    try:
        assert alice.request("GET", "/labs/lab-a/balance")["lab"] == "lab-a"
        with pytest.raises(PermissionDenied, match="lab lab-b's books are for its members"):
            alice.request("GET", "/labs/lab-b/ledger")
        with pytest.raises(PermissionDenied, match="lab lab-a's books are for its members"):
            bob.request("GET", "/labs/lab-a/balance")
        with pytest.raises(PermissionDenied, match="books are for its members"):
            bob.request("GET", "/usage", params={"lab": "lab-a"})
        with pytest.raises(PermissionDenied, match="a user token cannot do this"):
            bob.request("POST", "/grants", json={"lab": "lab-b", "amount": 1e6})
        with pytest.raises(PermissionDenied, match="a user token cannot do this"):
            bob.request("POST", "/prices", json={"w_cpu": 0, "w_mem_gib": 0})
    finally:
        alice.close()
        bob.close()


def test_bad_accounting_requests_write_nothing(metered):
    fed = metered
    admin = fed.admin()
    try:
        admin.request("GET", "/prices")  # installs the default price version
        before = fed.db_rows(*BOOK_TABLES)
        with pytest.raises(RequestRejected, match="w_cpu: Input should be greater than or equal"):
            admin.request("POST", "/prices", json={"w_cpu": -1, "w_mem_gib": 0.1})
        with pytest.raises(RequestRejected, match="GPU weights must be 0 or more"):
            admin.request("POST", "/prices", json={"w_cpu": 1, "w_mem_gib": 0.1,
                                                   "gpu_weights": {"h100": -3}})
        with pytest.raises(RequestRejected, match="must take effect now or later"):
            admin.request("POST", "/prices", json={"w_cpu": 2, "w_mem_gib": 0.1,
                                                   "effective_from": "2020-01-01T00:00:00Z"})
        with pytest.raises(RequestRejected, match="unknown GPU classes"):
            admin.request("POST", "/prices", json={"w_cpu": 1, "w_mem_gib": 0.1,
                                                   "gpu_weights": {"quantum": 3}})
        with pytest.raises(NotFound, match="no lab named 'nolab'"):
            admin.request("POST", "/grants", json={"lab": "nolab", "amount": 10})
        with pytest.raises(RequestRejected,
                           match="amount: Input should be greater than or equal to 0.000000001"):
            admin.request("POST", "/grants", json={"lab": "lab-a", "amount": 0})
        with pytest.raises(RequestRejected, match="amount: Input should be less than or equal"):
            admin.request("POST", "/grants", json={"lab": "lab-a", "amount": 1e12})
        assert fed.db_rows(*BOOK_TABLES) == before
        admin.request("POST", "/labs", json={"name": "lab-rich"})
        for _ in range(39):  # with its first grant, 1e8 PCU short of the largest balance
            admin.request("POST", "/grants", json={"lab": "lab-rich", "amount": 1e8})
        full = fed.db_rows(*BOOK_TABLES)
        with pytest.raises(RequestRejected, match="beyond the ledger's largest"):
            admin.request("POST", "/grants", json={"lab": "lab-rich", "amount": 1e8})
        assert fed.db_rows(*BOOK_TABLES) == full

        version = admin.request("POST", "/prices", json={
            "w_cpu": 2, "w_mem_gib": 0.2, "gpu_weights": {"h100": 20},
            "effective_from": "2100-01-01T00:00:00Z"})
        assert version["w_cpu"] == 2
        upcoming = admin.request("GET", "/prices")["upcoming"]
        assert [p["id"] for p in upcoming] == [version["id"]]
        granted = admin.request("POST", "/grants", json={"lab": "lab-a", "amount": 12.5,
                                                         "memo": "course allocation"})
        assert Decimal(granted["balance"]) == Decimal("512.5")
    finally:
        admin.close()


def test_books_from_the_command_line(metered):
    import json
    import os
    import subprocess

    from tests.utils.procs import parallex

    fed = metered

    def cli(token: str, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PARALLEX_BROKER_URL": fed.url, "PARALLEX_TOKEN": token}
        env.pop("PARALLEX_ADMIN_TOKEN", None)
        return subprocess.run(parallex("--log-level", "WARNING", *args), env=env,
                              capture_output=True, text=True, timeout=60)

    alice, admin = fed.user_tokens["alice"], fed.admin_token
    shown = cli(alice, "credits")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "lab-a: 500.0000 PCU (new workers are refused below 0)"

    granted = cli(admin, "admin", "grant", "--lab", "lab-a", "--amount", "25.5",
                  "--memo", "teaching allocation")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(cli(alice, "credits", "--json").stdout)["balance"] == "525.5"

    ledger = cli(alice, "ledger")
    assert ledger.returncode == 0, ledger.stderr
    assert "teaching allocation" in ledger.stdout and "25.5000" in ledger.stdout
    assert "initial grant to lab-a" in ledger.stdout

    assert cli(alice, "usage").stdout.strip().endswith("no usage")
    refused = cli(alice, "ledger", "--lab", "lab-b")
    assert refused.returncode == 1 and "books are for its members" in refused.stderr

    priced = cli(admin, "admin", "--json", "price", "set", "--cpu", "1.5", "--mem", "0.1",
                 "--gpu", "h100=15", "--effective", "2100-01-01T00:00:00Z")
    assert priced.returncode == 0, priced.stderr
    classes = {c["class"]: c["weight"] for c in json.loads(priced.stdout)["gpu_classes"]}
    assert classes["h100"] == 15
    bad = cli(admin, "admin", "price", "set", "--cpu", "1", "--mem", "0.1", "--gpu", "h100")
    assert bad.returncode == 1 and "must look like CLASS=WEIGHT" in bad.stderr
    assert "Traceback" not in bad.stderr
