"""A federation across separate networks: JupyterHub, the broker, the gateway (a process of
its own, as a site runs it) and the student's kernel (with its scheduler) in a ``hub`` network
namespace; one lab machine each in ``lab-a`` and ``lab-b``, which can reach only the hub's
public address (the broker and the gateway) and not each other. The test proves those
refusals first, then runs the student's journey in Chromium: scale(4) across both labs, a P2P
merge, %%remote, a lab agent killed and restarted, adapt, and the Dask dashboard through the
hub (the student's server, and the broker)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil

import pytest
import yaml

from tests.utils.browser import chromium
from tests.utils.hub import Hub, start_hub
from tests.utils.netns import HUB_PUBLIC, NamespacesUnavailable, SmallInternet
from tests.utils.notebook import UI_TIMEOUT_MS, open_jupyterlab, run_cell
from tests.utils.procs import agents_folder, kill_workers_under

USER = "alice@north"
# Which lab machine sits in which namespace (and site): north-physics's in lab-a,
# south-chemistry's in lab-b. Both refuse connections from other sites (--no-peer-connections).
MACHINES = {"lab-a": "north-physics", "lab-b": "south-chemistry"}

REFUSED = {"refused", "unreachable", "timed out"}


@pytest.fixture(scope="module")
def internet():
    try:
        net = SmallInternet().build()
    except NamespacesUnavailable as exc:
        pytest.skip(f"cannot build the test's networks here: {exc}")
    try:
        with net.enter("hub"):
            yield net
    finally:
        net.destroy()


@pytest.fixture(scope="module")
def hub(internet, tmp_path_factory):
    # The gateway as a site runs it: a process of its own that the hub's broker names.
    running = start_hub(tmp_path_factory.mktemp("hub"), public_host=HUB_PUBLIC, gateway="own")
    try:
        yield running
    finally:
        running.stop()


def netns_inode(net: SmallInternet, where: str) -> int:
    return os.stat(f"/run/netns/{net.names[where]}").st_ino


def user_server_port(hub: Hub) -> int:
    with contextlib.closing(hub.db()) as con:
        row = con.execute("SELECT s.port FROM servers s JOIN spawners sp ON sp.server_id = s.id "
                          "JOIN users u ON u.id = sp.user_id WHERE u.name = ?", (USER,)).fetchone()
    assert row, "the student's server is not in the hub's database"
    return int(row[0])


def gateway_port(hub: Hub) -> int:
    """The gateway's port, from the hub's settings file (where workers dial it)."""
    settings = yaml.safe_load((hub.tmp / "hub.yaml").read_text())
    return int((settings.get("gateway") or settings["gateway_public"]).rsplit(":", 1)[1])


@pytest.mark.timeout(900)
def test_a_student_computes_on_two_labs_that_reach_only_the_gateway(internet, hub):
    net = internet
    agents = agents_folder()
    running: dict[str, object] = {}
    broker_port = int(hub.broker_url.rsplit(":", 1)[1])
    try:
        # The second lab exists once one of its people signed in.
        assert hub.login("south", "alice", "alice-pw").status_code == 200
        with chromium() as browser:
            context, page = open_jupyterlab(browser, hub.url, "north", "alice", "alice-pw")

            # 1. The networks refuse what a campus firewall refuses.
            server = user_server_port(hub)
            assert net.connects("hub", "127.0.0.1", server) == "ok"
            with net.listener("lab-b") as lab_b_port:
                assert net.connects("lab-b", net.lab_address("lab-b"), lab_b_port) == "ok"
                assert net.connects("lab-a", net.lab_address("lab-b"), lab_b_port) in REFUSED
            for lab in MACHINES:
                assert net.connects(lab, HUB_PUBLIC, broker_port) == "ok"
                assert net.connects(lab, HUB_PUBLIC, gateway_port(hub)) == "ok"
                assert net.connects(lab, HUB_PUBLIC, server) in REFUSED
                assert net.connects(lab, net.hub_link_address(lab), server) in REFUSED

            # 2. One agent per lab network; sites that accept no peer connections.
            for where, lab in MACHINES.items():
                running[where] = hub.start_lab_agent(
                    lab, agents / where, f"{lab}-1", prefix=tuple(net.prefix(where)),
                    extra=("--site", where, "--no-peer-connections"))

            card = page.locator('.jp-LauncherCard[data-category="Notebook"]',
                                has_text="Parallex")
            card.click()
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
            page.get_by_text("Parallex | Idle").wait_for()

            # 3. The kernel's scheduler is in the hub's network; the labs cannot dial it.
            started = run_cell(page, "parallex_pool.start()\n"
                                     "assert parallex_pool.ready.wait(120)\n"
                                     "print('scheduler', parallex_pool.cluster.scheduler_address)",
                               0)
            scheduler = re.search(r"scheduler \w+://[\d.]+:(\d+)", started)
            assert scheduler, started
            for lab in MACHINES:
                assert net.connects(lab, HUB_PUBLIC, int(scheduler.group(1))) in REFUSED

            # 4. scale(4) across both labs: every worker runs on a lab's network.
            scaled = run_cell(page, "import os\n"
                                    "%parallex scale 4\n"
                                    "cluster = parallex_pool.cluster\n"
                                    "cluster.wait_for_workers(4, timeout=240)\n"
                                    "print('labs', sorted(cluster.workers_by_lab().items()))\n"
                                    "nets = parallex_pool.client.run(\n"
                                    "    lambda: os.stat('/proc/self/ns/net').st_ino)\n"
                                    "print('nets', sorted(set(nets.values())))", 1)
            assert "labs [('north-physics', 2), ('south-chemistry', 2)]" in scaled, scaled
            assert f"nets {sorted(netns_inode(net, w) for w in MACHINES)}" in scaled, scaled
            # Nothing on a lab listens beyond its own loopback: every connection is outbound.
            for lab in MACHINES:
                exposed = [s for s in net.listening(lab)
                           if not re.search(r"\s(127\.0\.0\.1|\[::1\]):\d+\s", s)]
                assert exposed == [], exposed

            # 5. Dask's P2P merge: its transfers go worker to worker, through the gateway.
            merged = run_cell(page, "import pandas as pd, dask.dataframe as dd\n"
                                    "left = dd.from_pandas(pd.DataFrame({'k': range(4000), "
                                    "'a': 1}), npartitions=8)\n"
                                    "right = dd.from_pandas(pd.DataFrame({'k': range(0, 4000, 2),"
                                    " 'b': 2}), npartitions=4)\n"
                                    "joined = left.merge(right, on='k', shuffle_method='p2p')\n"
                                    "print('rows', len(joined.compute()))", 2)
            assert "rows 2000" in merged, merged

            # 6. %%remote runs on a lab machine (a worker of its own, so the pool gives one
            # back) and sends its assignments back.
            run_cell(page, "%parallex scale 3\n"
                           "import time\n"
                           "deadline = time.monotonic() + 120\n"
                           "while len(cluster.scheduler_info['workers']) > 3 "
                           "and time.monotonic() < deadline:\n"
                           "    time.sleep(0.2)", 3)
            remote = run_cell(page, "%%remote\n"
                                    "import os\n"
                                    "from distributed import get_worker\n"
                                    "remote_net = os.stat('/proc/self/ns/net').st_ino\n"
                                    "remote_worker = get_worker().address\n"
                                    "print('remote says hello')", 4)
            assert "remote says hello" in remote, remote
            back = run_cell(page, "print('remote net', remote_net)\n"
                                  "print('workers', sorted(parallex_pool.client.run("
                                  "lambda: 0)))", 5)
            assert any(f"remote net {netns_inode(net, w)}" in back for w in MACHINES), back
            workers_before = re.search(r"workers (\[.*\])", back).group(1)
            assert workers_before.count("parallex://") == 4, back

            # 7. lab-b's agent is killed and restarted: it adopts its running workers.
            running["lab-b"].kill9()
            running["lab-b"] = hub.start_lab_agent(
                MACHINES["lab-b"], agents / "lab-b", f"{MACHINES['lab-b']}-1",
                prefix=tuple(net.prefix("lab-b")),
                extra=("--site", "lab-b", "--no-peer-connections"),
                token=(agents / f"{MACHINES['lab-b']}-1.token").read_text())
            after = run_cell(page, "import dask.array as da\n"
                                   "print('sum', int(da.arange(100_000, chunks=5_000).sum()"
                                   ".compute()))\n"
                                   "print('workers', sorted(parallex_pool.client.run("
                                   "lambda: 0)))", 6)
            assert "sum 4999950000" in after, after
            assert f"workers {workers_before}" in after, (workers_before, after)

            # 8. adapt: the pool's workers go when idle (the %%remote worker is held), and
            # come back under load.
            adapted = run_cell(page, "import time\n"
                                     "cluster.adapt(minimum=0, maximum=4)\n"
                                     "def pool():\n"
                                     "    return len(set(cluster.scheduler_info['workers'])"
                                     " - {remote_worker})\n"
                                     "deadline = time.monotonic() + 120\n"
                                     "while pool() > 0 and time.monotonic() < deadline:\n"
                                     "    time.sleep(0.5)\n"
                                     "print('idle', pool())\n"
                                     "futures = parallex_pool.client.map(\n"
                                     "    lambda i: time.sleep(1) or i, range(60), pure=False)\n"
                                     "deadline = time.monotonic() + 180\n"
                                     "while pool() < 2 and time.monotonic() < deadline:\n"
                                     "    time.sleep(0.5)\n"
                                     "print('busy', pool() >= 2, "
                                     "sum(parallex_pool.client.gather(futures)))", 7)
            assert "idle 0" in adapted and "busy True 1770" in adapted, adapted

            # 9. The Dask dashboard, through the hub and the student's own server.
            status = run_cell(page, "%parallex", 8)
            link = re.search(r"dashboard: (\S+)", status)
            assert link and link.group(1).startswith(f"/user/{USER}/proxy/"), status
            dashboard = context.new_page()
            dashboard.goto(hub.url + link.group(1))
            dashboard.wait_for_function("document.title.includes('Dask')",
                                        timeout=UI_TIMEOUT_MS)
            dashboard.locator(".bk-Canvas, canvas").first.wait_for()
            dashboard.close()
            # The same dashboard served by the broker (for servers that cannot proxy it),
            # through the hub's proxy: the link the cluster holds.
            served = run_cell(page, "print(parallex_pool.cluster.broker_dashboard_link)", 9)
            assert served.strip().startswith(f"{hub.url}/services/parallex/api/v1/clusters/"), \
                served
            relayed = context.new_page()
            relayed.goto(served.strip())
            relayed.wait_for_function("document.title.includes('Dask')", timeout=UI_TIMEOUT_MS)
            relayed.locator(".bk-Canvas, canvas").first.wait_for()
            relayed.close()
    except BaseException:
        for log in (hub.tmp / "hub" / "users" / USER / ".parallex" / "logs").glob("*.log"):
            print(f"==== {log}\n{log.read_text(errors='replace')[-6000:]}")
        for where in MACHINES:
            log = agents / f"{MACHINES[where]}-1.log"
            if log.exists():
                print(f"==== {log}\n{log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        hub.api("DELETE", f"/users/{USER}/server")
        for agent in running.values():
            agent.stop()
        kill_workers_under([agents / where for where in MACHINES])
        shutil.rmtree(agents, ignore_errors=True)
