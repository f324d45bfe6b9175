"""Everyday Dask, written as Dask's own documentation writes it, on a FederatedCluster whose
workers are leases on two labs' machines: P2P shuffles, futures, tasks that submit tasks,
actors, coordination primitives and cluster operations.

Functions and classes the tasks use are defined inside the tests, so Dask pickles them by value
as it does a notebook's (the workers cannot import this test module).
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split
from distributed import (
    Event,
    Lock,
    Queue,
    Semaphore,
    Variable,
    as_completed,
    fire_and_forget,
    get_client,
    get_task_stream,
    performance_report,
    progress,
    rejoin,
    secede,
    wait,
    worker_client,
)
from distributed.diagnostics.plugin import WorkerPlugin

from federation import FederatedCluster
from tests.utils.federation import make_federation
from tests.utils.procs import wait_until


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    """Two labs' agents, 2 CPUs and 4 GiB each, their workers started from warm interpreters
    (the agent's default); users alice and bob."""
    fed = make_federation(tmp_path_factory.mktemp("pool"))
    try:
        yield fed.with_two_labs(warm=2)
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def pool(labs):
    """alice's cluster holding 2 workers, and its client."""
    with FederatedCluster(labs.url, labs.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=1) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=120)
        with cluster.get_client() as client:
            yield cluster, client


def frames(rows: int = 4000):
    rng = np.random.default_rng(7)
    left = pd.DataFrame({"k": rng.integers(0, 200, rows), "a": np.arange(rows),
                         "x": rng.random(rows)})
    right = pd.DataFrame({"k": np.arange(200), "b": np.arange(200) * 3})
    return left, right, dd.from_pandas(left, npartitions=8), dd.from_pandas(right, npartitions=4)


def used_p2p(stream: list[dict]) -> bool:
    """True when the task stream holds a P2P barrier (every P2P shuffle and rechunk has one)."""
    return any(key_split(t["key"]) == "shuffle-barrier" for t in stream)


def test_dataframe_shuffles_use_p2p_by_default(pool):
    _cluster, client = pool
    left, right, dleft, dright = frames()
    assert dask.config.get("dataframe.shuffle.method", None) in (None, "p2p")
    with get_task_stream(client) as ts:
        merged = dleft.merge(dright, on="k").compute()
    assert used_p2p(ts.data), "merge did not use the P2P shuffle"
    expected = left.merge(right, on="k")
    pd.testing.assert_frame_equal(merged.sort_values("a").reset_index(drop=True),
                                  expected.sort_values("a").reset_index(drop=True))

    joined = dleft.set_index("k").join(dright.set_index("k")).compute()
    assert len(joined) == len(left.set_index("k").join(right.set_index("k")))
    assert joined["b"].sum() == left.set_index("k").join(right.set_index("k"))["b"].sum()

    by_a = dleft.set_index("a").compute()
    pd.testing.assert_frame_equal(by_a, left.set_index("a"))
    ordered = dleft.sort_values("x").compute()
    assert list(ordered["a"]) == list(left.sort_values("x")["a"])

    sums = dleft.groupby("k").x.sum(split_out=4).compute().sort_index()
    pd.testing.assert_series_equal(sums, left.groupby("k").x.sum().sort_index(),
                                   check_names=False)
    unique = dleft.drop_duplicates(subset="k", split_out=4).compute()
    assert sorted(unique["k"]) == sorted(left["k"].unique())


def test_array_rechunk_with_p2p_and_bag_groupby(pool):
    _cluster, client = pool
    x = np.arange(300 * 300, dtype="f8").reshape(300, 300)
    dx = da.from_array(x, chunks=(300, 10))
    with get_task_stream(client) as ts:
        y = dx.rechunk((10, 300), method="p2p").sum(axis=1).compute()
    assert used_p2p(ts.data)
    np.testing.assert_allclose(y, x.sum(axis=1))

    groups = dict(db.from_sequence(range(1000), npartitions=8)
                  .groupby(lambda v: v % 7).map(lambda kv: (kv[0], sum(kv[1]))).compute())
    assert groups == {r: sum(v for v in range(1000) if v % 7 == r) for r in range(7)}


def test_futures(pool):
    _cluster, client = pool

    def square(v):
        return v * v

    futures = client.map(square, range(20))
    assert client.gather(futures) == [v * v for v in range(20)]
    assert sorted(f.result() for f in as_completed(futures)) == sorted(v * v for v in range(20))
    done, not_done = wait(futures)
    assert len(done) == 20 and not not_done
    total = client.submit(sum, futures)
    assert total.result() == sum(v * v for v in range(20))

    def publish(name):
        from distributed import Variable
        Variable(name).set("fired")

    fire_and_forget(client.submit(publish, "fired-and-forgotten"))
    seen = Variable("fired-and-forgotten", client=client)
    assert seen.get(timeout=30) == "fired"


def test_tasks_that_submit_tasks(pool):
    _cluster, client = pool

    def fib(n):
        if n < 2:
            return n
        with worker_client() as inner:
            a, b = inner.submit(fib, n - 1), inner.submit(fib, n - 2)
            return a.result() + b.result()

    assert client.submit(fib, 6).result(timeout=120) == 8

    def fan_out(n):
        c = get_client()
        parts = c.map(lambda v: v + 1, range(n))
        secede()
        result = sum(c.gather(parts))
        rejoin()
        return result

    assert client.submit(fan_out, 10).result(timeout=60) == sum(range(1, 11))


def test_actors(pool):
    _cluster, client = pool

    class Counter:
        n = 0

        def increment(self):
            self.n += 1
            return self.n

    counter = client.submit(Counter, actor=True).result()
    assert [counter.increment().result() for _ in range(3)] == [1, 2, 3]
    assert counter.n == 3


def test_coordination_primitives_from_the_client_and_from_tasks(pool):
    _cluster, client = pool
    variable = Variable("shared", client=client)
    variable.set(10)
    queue = Queue("work", client=client)
    event = Event("go", client=client)
    lock = Lock("only-one")
    semaphore = Semaphore(max_leases=1, name="one-at-a-time")

    def worker_side():
        from distributed import Event, Lock, Queue, Semaphore, Variable
        Event("go").wait(timeout=30)
        with Lock("only-one"), Semaphore(max_leases=1, name="one-at-a-time"):
            value = Variable("shared").get(timeout=10)
            Queue("work").put(value + 1)
        return value

    future = client.submit(worker_side)
    event.set()
    assert future.result(timeout=60) == 10
    assert queue.get(timeout=30) == 11
    with lock, semaphore:
        assert lock.locked()

    client.publish_dataset(numbers=client.scatter(list(range(5))))
    assert list(client.list_datasets()) == ["numbers"]

    def read_dataset():
        with worker_client() as inner:
            return inner.gather(inner.get_dataset("numbers"))

    assert client.submit(read_dataset).result(timeout=30) == list(range(5))
    client.unpublish_dataset("numbers")


def test_cluster_operations(pool, tmp_path):
    _cluster, client = pool
    module = tmp_path / "parallex_helper_mod.py"
    module.write_text("def triple(v):\n    return 3 * v\n")
    client.upload_file(str(module))

    def use_module(v):
        import parallex_helper_mod
        return parallex_helper_mod.triple(v)

    assert client.submit(use_module, 5).result(timeout=30) == 15

    class Marker(WorkerPlugin):
        def setup(self, worker):
            worker.parallex_marker = "set up"

    client.register_plugin(Marker(), name="marker")
    assert set(client.run(lambda dask_worker: dask_worker.parallex_marker).values()) == \
        {"set up"}

    report = tmp_path / "report.html"
    with performance_report(filename=str(report)):
        futures = client.map(lambda v: v + 1, range(50))
        progress(futures, notebook=False)
        assert sum(client.gather(futures)) == sum(range(1, 51))
    wait_until(report.exists, 30, "the performance report to be written")
    assert "Dask Performance Report" in report.read_text()

    with get_task_stream(client) as ts:
        client.submit(time.sleep, 0.01).result()
    assert len(ts.data) >= 1


def test_an_idle_cluster_gives_its_workers_back(labs):
    with FederatedCluster(labs.url, labs.user_tokens["bob"], dashboard=False,
                          heartbeat_interval=0.5, idle_timeout=3) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        with cluster.get_client() as client:
            assert client.submit(lambda: 1).result() == 1
        busy_until = time.monotonic()
        wait_until(lambda: not cluster.live and not cluster.connected_workers(), 30,
                   "the idle cluster to give its worker back")
        assert time.monotonic() - busy_until >= 3
        assert all(group["desired"] == 0 for group in cluster.groups().values())
        with pytest.raises(TimeoutError):  # LeaseStartTimeout is a TimeoutError
            cluster.wait_for_workers(1, timeout=0.5)


def test_a_cluster_can_be_kept_to_labs_its_owner_trusts(labs):
    from federation import RequestRejected

    # alice is of lab-a; her own lab's machine would come first, but she allows only lab-b.
    with FederatedCluster(labs.url, labs.user_tokens["alice"], dashboard=False,
                          heartbeat_interval=0.5, labs=["lab-b"]) as cluster:
        cluster.scale(1, memory="1 GiB")
        cluster.wait_for_workers(1, timeout=60)
        assert cluster.workers_by_lab() == {"lab-b": 1}
    with pytest.raises(RequestRejected, match="labs: no lab named 'lab-nowhere'"):
        FederatedCluster(labs.url, labs.user_tokens["alice"], dashboard=False,
                         labs=["lab-nowhere"])


def test_client_restart_gives_fresh_workers(labs):
    """Dask's restart without nannies shuts the workers down and waits for the deployment to
    replace them: the cluster sees their leases end and asks for new ones."""
    with FederatedCluster(labs.url, labs.user_tokens["bob"], dashboard=False,
                          heartbeat_interval=0.5) as cluster:
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=120)
        with cluster.get_client() as client:
            remembered = client.submit(lambda: 41, pure=False)
            assert remembered.result(timeout=30) == 41
            before = cluster.live
            started = time.monotonic()
            client.restart(timeout=60)
            took = time.monotonic() - started
            after = cluster.live
            assert len(after) == 2 and not after & before, (before, after)
            assert remembered.status == "cancelled"  # restart forgets every result
            assert client.submit(lambda x: x + 1, 1, pure=False).result(timeout=30) == 2
            # The replacements started at the first try: none failed on the way (each handed
            # a warm interpreter still importing did, before warm_worker._say_ready).
            admin = labs.admin()
            try:
                leases = admin.request("GET", f"/clusters/{cluster.cluster_id}")["leases"]
            finally:
                admin.close()
            assert [lease["id"] for lease in leases if lease["end_reason"] == "failed"] == []
            print(f"restart took {took:.1f} s")
