"""The whole API fuzzed from its own OpenAPI document (schemathesis) with a member's, a PI's, an
administrator's and a provider's token: no request is a server error, every answer conforms to
the schema it documents, and every refusal leaves the database exactly as it was."""

from __future__ import annotations

import sqlite3

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from federation.tls import ClusterAuthority
from tests.utils.federation import make_federation

EXAMPLES_PER_OPERATION = 20
#: Nothing in the broker may change the database on its own while the fuzzer compares it.
QUIET = ("--rate-limit", "1000000", "--rate-burst", "1000000", "--max-concurrent-requests",
         "1000", "--min-heartbeat-interval", "0", "--metering-interval", "100000",
         "--capacity-interval", "100000")


@pytest.fixture(params=["sqlite", "postgresql"])
def populated(request, tmp_path):
    """Two labs with a member, a PI and an administrator, a registered provider, a cluster
    with a placed lease (so real ids exist), and the four tokens; on SQLite and on
    PostgreSQL (production's database, whose errors and types differ)."""
    db_url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    fed = make_federation(tmp_path, provider_timeout=100_000, cluster_timeout=100_000,
                          broker_args=QUIET, db_url=db_url)
    try:
        fed.add_lab("lab-a", user="alice")
        fed.add_user("lab-a", "pia", role="pi")
        fed.add_user("lab-a", "ada", role="admin")
        fed.add_lab("lab-b", user="bob")
        provider = {"Authorization": f"Bearer {fed.provider_tokens['lab-b']}"}
        httpx.post(f"{fed.url}/api/v1/agent/register", headers=provider, json={
            "name": "box", "cpus": 4, "memory": "8 GiB"}).raise_for_status()
        alice = {"Authorization": f"Bearer {fed.user_tokens['alice']}"}
        cluster = httpx.post(f"{fed.url}/api/v1/clusters", headers=alice, json={
            "scheduler_address": "tls://127.0.0.1:1",
            "ca_cert": ClusterAuthority().ca_pem}).json()["id"]
        httpx.post(f"{fed.url}/api/v1/clusters/{cluster}/leases", headers=alice, json={
            "spec": {"cpus": 1, "memory": "1 GiB"},
            "workers": [{"lease_id": "ls-fuzzlease00001"}]}).raise_for_status()
        yield fed, {"member": fed.user_tokens["alice"], "pi": fed.user_tokens["pia"],
                    "admin": fed.user_tokens["ada"], "provider": fed.provider_tokens["lab-b"]}
    finally:
        fed.stop()


class Snapshots:
    """Every table's rows, read through one connection kept open for the whole test: a new
    connection and a catalogue read per request made the PostgreSQL run take most of its
    time limit. On PostgreSQL one statement returns each table's rows digested in the
    database, so a snapshot is one round trip whatever the tables hold."""

    def __init__(self, fed) -> None:
        self.fed = fed
        if fed.db_url:
            self.con = psycopg.connect(fed.db_url, autocommit=True)
            tables = [r[0] for r in self.con.execute(
                "SELECT table_name FROM information_schema.tables "
                # The leader lease is renewed every reaper tick, whatever the requests do.
                "WHERE table_schema = 'public' AND table_name <> 'broker_leader' "
                "ORDER BY table_name")]
            self.query = " UNION ALL ".join(
                f"SELECT '{t}', count(*), md5(coalesce(string_agg(r::text, '|' "  # noqa: S608
                f"ORDER BY r::text), '')) FROM \"{t}\" r" for t in tables)
        else:
            self.con = sqlite3.connect(f"file:{fed.tmp / 'broker.db'}?mode=ro", uri=True)
            self.tables = [r[0] for r in self.con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]

    def take(self) -> dict[str, object]:
        if self.fed.db_url:
            return {name: (count, digest)
                    for name, count, digest in self.con.execute(self.query).fetchall()}
        return {t: sorted(self.con.execute(f'SELECT * FROM "{t}"').fetchall(),  # noqa: S608
                          key=repr) for t in self.tables}

    def close(self) -> None:
        self.con.close()


def test_no_request_is_a_server_error_and_refusals_write_nothing(populated):
    fed, tokens = populated
    schema = schemathesis.openapi.from_url(f"{fed.url}/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 25
    problems: list[str] = []
    calls = 0
    snapshots = Snapshots(fed)

    def fuzz(operation, mode: GenerationMode) -> None:
        # Each generated request is sent with every role's token: generating a case costs
        # the test more than sending it (a profile: 55 % generating, 23 % calling and
        # comparing), and one request under every role is what authorization needs.

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            if case.query and "wait" in case.query:
                case.query["wait"] = 0  # long polls: answer at once
            for who, token in tokens.items():
                send(case, who, token, mode)

        try:
            check()
        except Unsatisfiable:
            # Nothing in this operation can be made invalid (no parameters, no body).
            assert mode is GenerationMode.NEGATIVE, operation.label

    def send(case, who: str, token: str, mode: GenerationMode) -> None:
        nonlocal calls
        before = snapshots.take()
        response = case.call(base_url=fed.url, headers={"Authorization": f"Bearer {token}"})
        calls += 1
        where = f"{who} {mode.value} {case.operation.label} -> {response.status_code}"
        if response.status_code >= 500:
            problems.append(f"{where}: {response.text[:200]}")
        elif response.status_code >= 400:
            after = snapshots.take()
            changed = [t for t in before if before[t] != after.get(t)]
            if changed:
                problems.append(f"{where} changed {changed}")
            if not response.json().get("message"):
                problems.append(f"{where} has no message: {response.text[:200]}")
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except FailureGroup as exc:  # schemathesis's failures, one group per answer
            problems.append(f"{where}: the answer violates the schema: {str(exc)[:300]}")

    try:
        for operation in operations:
            for mode in GenerationMode:  # valid requests, then invalid ones
                fuzz(operation, mode)
    finally:
        snapshots.close()
    assert calls > 2000
    assert problems == [], "\n".join(problems)
