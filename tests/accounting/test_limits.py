"""Credit limits (HTTP 402) and concurrent CPU/GPU quotas, through FederatedCluster and the CLI."""

from __future__ import annotations

import os
import subprocess

import pytest

from federation import CreditLimitExceeded, FederatedCluster, QuotaExceeded
from tests.utils.federation import make_federation
from tests.utils.procs import parallex, wait_until


@pytest.fixture
def no_grants(tmp_path):
    """lab-a (alice) starts at 0 PCU with no credit; lab-b offers a 2-CPU machine."""
    fed = make_federation(tmp_path, broker_args=("--metering-interval", "1",
                                                 "--initial-grant", "0"))
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_lab("lab-b")
        fed.add_agent("lab-b", "agent-b", cpus=2, memory="8 GiB")
        yield fed
    finally:
        fed.stop()


def admin_cli(fed, *args: str) -> str:
    done = subprocess.run(parallex("admin", *args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PARALLEX_BROKER_URL": fed.url,
                               "PARALLEX_ADMIN_TOKEN": fed.admin_token})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_lab_below_its_credit_limit_gets_no_new_workers(no_grants):
    fed = no_grants
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB", heartbeat_interval=0.5) as cluster:
        cluster.scale(1)  # a balance of 0 is not below a credit limit of 0
        cluster.wait_for_workers(1, timeout=60)
        wait_until(lambda: fed.balance("lab-a") < 0, 30, "lab-a to owe for its worker")
        with pytest.raises(CreditLimitExceeded,
                           match=r"lab lab-a's balance is -0\.\d{4} PCU, below its credit limit "
                                 r"of -0\.00 PCU: new workers are refused \(running ones keep"):
            cluster.scale(2)
        assert len(cluster.plan) == 1
        assert len(cluster.connected_workers()) == 1  # the running worker keeps running

        admin_cli(fed, "lab", "set", "lab-a", "--credit-limit", "100")
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)


def test_lab_and_user_quotas_cap_concurrent_cpus(no_grants):
    fed = no_grants
    admin_cli(fed, "lab", "set", "lab-a", "--credit-limit", "100", "--max-cpus", "2")
    out = admin_cli(fed, "member", "add", "--lab", "lab-a", "--user", "alice", "--role", "pi",
                    "--max-cpus", "1")
    assert "role=pi" in out and "max_cpus=1.0" in out
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        with pytest.raises(QuotaExceeded, match="you may hold at most 1 CPUs at once; 0 are "
                                                "held and this asks for 2 more"):
            cluster.scale(2)
        assert cluster.plan == set()
        admin_cli(fed, "member", "add", "--lab", "lab-a", "--user", "alice", "--role", "pi")
        with pytest.raises(QuotaExceeded, match="lab lab-a may hold at most 2 CPUs at once"):
            cluster.scale(3)
        cluster.scale(2)
        assert len(cluster.plan) == 2
        with pytest.raises(QuotaExceeded, match="2 are held and this asks for 1 more"):
            cluster.scale(1, cpus=1.0, memory="512 MiB")  # a second group counts as well
        admin_cli(fed, "lab", "set", "lab-a", "--clear-quotas")
        cluster.scale(1, cpus=1.0, memory="512 MiB")
        assert len(cluster.plan) == 3
