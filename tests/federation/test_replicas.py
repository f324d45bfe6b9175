"""Two broker replicas on one PostgreSQL: a scale request on one wakes agents long-polling
either (LISTEN/NOTIFY), one replica runs the periodic passes (the leader lease), and when it
is killed with SIGKILL the other takes them over within the lease's time, charging no period
twice; an agent given both replicas' URLs moves to the other when its own is killed."""

from __future__ import annotations

import datetime as dt
import shutil

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from federation import FederatedCluster
from federation.broker.db import plain_engine
from tests.utils.federation import make_federation
from tests.utils.procs import (
    agents_folder,
    kill_workers_under,
    start_agent,
    start_broker,
    wait_until,
)

# Long enough that an agent's own long poll (half of it, at most 20 s) could not explain a
# worker joining within WAKE_WITHIN; the leader lease lasts a third of it.
PROVIDER_TIMEOUT = 40.0
WAKE_WITHIN = 10.0
METERING = ("--metering-interval", "1")


def metric(url: str, token: str, name: str) -> float:
    answer = httpx.get(f"{url}/api/v1/metrics", headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    answer.raise_for_status()
    return next(s.value for f in text_string_to_metric_families(answer.text)
                for s in f.samples if s.name == name)


def test_two_replicas_share_wakeups_and_hand_over_the_periodic_passes(tmp_path, postgres_url):
    fed = make_federation(tmp_path, provider_timeout=PROVIDER_TIMEOUT,
                          cluster_timeout=PROVIDER_TIMEOUT, db_url=postgres_url,
                          broker_args=METERING)
    a = fed.url
    wait_until(lambda: metric(a, fed.admin_token, "parallex_broker_leader") == 1, 30,
               "the first replica to take the periodic passes")
    broker_b, b = start_broker(tmp_path, fed.admin_token, db_url=postgres_url,
                               provider_timeout=PROVIDER_TIMEOUT,
                               cluster_timeout=PROVIDER_TIMEOUT, name="broker-b",
                               extra=METERING)
    agents = agents_folder()
    running = []
    try:
        assert metric(b, fed.admin_token, "parallex_broker_leader") == 0
        fed.add_lab("lab-a", user="alice")
        token = fed.provider_tokens["lab-a"]
        # One agent long-polls each replica; the user's cluster talks to the second.
        # The agent on the first replica knows the second: it moves there when the first
        # stops answering.
        running.append(start_agent(f"{a},{b}", token, agents / "on-a", name="on-a", cpus=2,
                                   memory="4 GiB"))
        running.append(start_agent(b, token, agents / "on-b", name="on-b", cpus=2,
                                   memory="4 GiB"))
        with FederatedCluster(b, fed.user_tokens["alice"], dashboard=False,
                              worker_memory="1 GiB", heartbeat_interval=1) as cluster:
            cluster.scale(4)  # two per machine: the agent polling the first replica is woken
            cluster.wait_for_workers(4, timeout=WAKE_WITHIN)
            assert cluster.get_client().submit(sum, range(100)).result() == 4950
            passes = metric(b, fed.admin_token, "parallex_metering_pass_seconds_count")

            engine = plain_engine(postgres_url)

            def last_heard_of_on_a():
                with engine.connect() as c:
                    return c.execute(text(
                        "SELECT last_seen FROM provider WHERE name = 'on-a'")).scalar()

            fed.broker.kill9()  # the leader
            killed_at = last_heard_of_on_a()
            # Its agent's heartbeats now reach the second replica (it failed over), long
            # before the provider timeout would have ended its leases.
            wait_until(lambda: last_heard_of_on_a() > killed_at + dt.timedelta(seconds=2),
                       15, "the agent of the killed replica to heartbeat the other")
            wait_until(lambda: metric(b, fed.admin_token, "parallex_broker_leader") == 1,
                       PROVIDER_TIMEOUT / 3 + 10, "the second replica to take over")
            wait_until(lambda: metric(b, fed.admin_token,
                                      "parallex_metering_pass_seconds_count") >= passes + 2,
                       30, "the second replica to meter")
            with engine.connect() as c:
                states = dict(c.execute(text(
                    "SELECT state, count(*) FROM lease GROUP BY state")).all())
                twice = c.execute(text(
                    "SELECT count(*) FROM (SELECT lease_id, period_start FROM usagerecord "
                    "GROUP BY lease_id, period_start HAVING count(*) > 1) d")).scalar()
                charged = c.execute(text("SELECT count(*) FROM usagerecord")).scalar()
            engine.dispose()
            assert states == {"running": 4}, states  # none lost, none doubled
            assert charged > 0 and twice == 0
            assert cluster.get_client().submit(sum, range(10)).result() == 45
    finally:
        for agent in running:
            agent.stop()
        kill_workers_under([agents / "on-a", agents / "on-b"])
        shutil.rmtree(agents, ignore_errors=True)
        broker_b.stop()
        fed.stop()
