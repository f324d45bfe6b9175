"""A running federation for tests and benchmarks: a real broker process, labs, tokens and
real provider agents; ``stop()`` ends every process it started, workers included."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx

from federation.client import BrokerClient
from tests.utils.procs import (
    Proc,
    agents_folder,
    kill_workers_under,
    start_agent,
    start_broker,
    wait_until,
    wait_warm,
    worker_uid_args,
)

#: Leases not ended yet, or ended with a part not charged (models.END_NOT_CHARGED).
UNSETTLED = ("SELECT COUNT(*) FROM lease WHERE state != 'ended' OR (started_at IS NOT NULL "
             "AND (metered_until IS NULL OR metered_until < ended_at))")


@dataclass
class Federation:
    """A running broker with labs, tokens and agents; every process is stopped at teardown."""

    tmp: Path
    url: str
    admin_token: str
    broker: Proc
    provider_timeout: float
    cluster_timeout: float
    db_url: str | None = None
    broker_args: tuple[str, ...] = ()
    agents: dict[str, Proc] = field(default_factory=dict)
    workdirs: dict[str, Path] = field(default_factory=dict)
    user_tokens: dict[str, str] = field(default_factory=dict)
    provider_tokens: dict[str, str] = field(default_factory=dict)
    agents_root: Path | None = None
    accounts: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def admin(self) -> BrokerClient:
        return BrokerClient(self.url, self.admin_token)

    def add_lab(self, lab: str, user: str | None = None) -> None:
        with_admin = self.admin()
        try:
            with_admin.request("POST", "/labs", json={"name": lab})
            self.provider_tokens[lab] = with_admin.request(
                "POST", "/tokens", json={"kind": "provider", "lab": lab})["token"]
            if user:
                self.user_tokens[user] = with_admin.request(
                    "POST", "/tokens", json={"kind": "user", "lab": lab, "user": user})["token"]
        finally:
            with_admin.close()

    def add_user(self, lab: str, user: str, role: str = "member") -> None:
        """A user of ``lab`` with ``role`` (member, pi, admin) and a token."""
        with_admin = self.admin()
        try:
            with_admin.request("PUT", f"/labs/{lab}/members/{user}", json={"role": role})
            self.user_tokens[user] = with_admin.request(
                "POST", "/tokens", json={"kind": "user", "lab": lab, "user": user})["token"]
        finally:
            with_admin.close()

    def add_agent(self, lab: str, name: str, cpus: float, memory: str = "4 GiB",
                  **options) -> Proc:
        if self.agents_root is None:
            self.agents_root = agents_folder()
        workdir = self.agents_root / name
        self.workdirs[name] = workdir
        options.setdefault("accounts", worker_uid_args())
        self.accounts[name] = options["accounts"]
        proc = start_agent(self.url, self.provider_tokens[lab], workdir, name=name, cpus=cpus,
                           memory=memory, **options)
        self.agents[name] = proc
        return proc

    def balance(self, lab: str) -> Decimal:
        """The lab's balance in PCU, read through the admin API."""
        admin = self.admin()
        try:
            return Decimal(admin.request("GET", f"/labs/{lab}/balance")["balance"])
        finally:
            admin.close()

    def db_rows(self, *tables: str) -> dict[str, list[tuple]]:
        """A read-only snapshot of whole tables of the broker's SQLite file, rows sorted."""
        with contextlib.closing(self._read_only_db()) as con:
            return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(),  # noqa: S608
                              key=repr) for t in tables}

    def db_dicts(self, sql: str) -> list[dict]:
        """Rows of a read-only query on the broker's database, as dicts by column name."""
        with contextlib.closing(self._read_only_db()) as con:
            cur = con.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def db_value(self, sql: str):
        """The first column of the first row of a read-only query on the broker's database."""
        with contextlib.closing(self._read_only_db()) as con:
            return con.execute(sql).fetchone()[0]

    def wait_until_charged(self, timeout: float = 60) -> None:
        """Wait until every lease has ended and been charged to its end. A lease's last part
        is charged after it ends (by the broker's end meterer), so reads of usage and of
        balances made before that could straddle the charge."""
        wait_until(lambda: self.db_value(UNSETTLED) == 0, timeout,
                   "every lease to end and be charged to its end")

    def _read_only_db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.tmp / 'broker.db'}?mode=ro", uri=True)

    def with_two_labs(self, warm: int = 0) -> Federation:
        """lab-a and lab-b, one agent each offering 2 CPUs and 4 GiB; users alice and bob.
        ``warm``: each agent's --warm-workers (ready before this returns)."""
        self.add_lab("lab-a", user="alice")
        self.add_lab("lab-b", user="bob")
        for lab, name in (("lab-a", "agent-a"), ("lab-b", "agent-b")):
            agent = self.add_agent(lab, name, cpus=2, extra=("--warm-workers", str(warm)))
            if warm:
                wait_warm(agent, warm)
        return self

    def restart_broker(self) -> None:
        port = int(self.url.rsplit(":", 1)[1])
        self.broker, url = start_broker(self.tmp, self.admin_token, port=port,
                                        db_url=self.db_url, extra=self.broker_args,
                                        provider_timeout=self.provider_timeout,
                                        cluster_timeout=self.cluster_timeout,
                                        name="broker-restarted")
        assert url == self.url

    def stop(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        kill_workers_under(list(self.workdirs.values()))
        self.broker.stop()
        if self.agents_root is not None:
            self._keep_logs()
            shutil.rmtree(self.agents_root, ignore_errors=True)

    def _keep_logs(self) -> None:
        """The agents' logs (``start_agent`` writes ``<name>.log`` beside their folders),
        copied into the test's own folder (pytest keeps it for the last few runs) before
        they go: a test that failed in CI can then be read from its agents' side too. Only
        those: walking the agents' folders (environments, leases) at every test's end would
        cost more than it tells; workers' logs go with their leases anyway."""
        kept = self.tmp / "agent-logs"
        kept.mkdir(exist_ok=True)
        for log in self.agents_root.glob("*.log"):
            shutil.copyfile(log, kept / log.name)


def api_client(fed: Federation, token: str, **options) -> httpx.Client:
    """An HTTP client of the broker's API with ``token`` (``options`` go to httpx.Client)."""
    options.setdefault("timeout", 30)
    return httpx.Client(base_url=f"{fed.url}/api/v1",
                        headers={"Authorization": f"Bearer {token}"}, **options)


def make_federation(tmp: Path, provider_timeout: float = 30, cluster_timeout: float = 60,
                    db_url: str | None = None, broker_args: tuple[str, ...] = ()) -> Federation:
    admin_token = secrets.token_hex(24)
    broker, url = start_broker(tmp, admin_token, provider_timeout=provider_timeout,
                               cluster_timeout=cluster_timeout, db_url=db_url, extra=broker_args)
    return Federation(tmp, url, admin_token, broker, provider_timeout, cluster_timeout, db_url,
                      broker_args)
