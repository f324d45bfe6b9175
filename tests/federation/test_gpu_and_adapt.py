"""GPU worker groups (with a faked GPU inventory: the machine has none), adaptive scaling, and
the agent keeping its token away from workers."""

from __future__ import annotations

import json
import os
import time

import dask
import psutil
from distributed import wait

from federation import FederatedCluster
from tests.utils.procs import live_worker_pids, recorded_workers, wait_until

FAKE_GPUS = json.dumps([{"index": 0, "model": "NVIDIA A100-SXM4-40GB", "memory": 40 * 2**30},
                        {"index": 1, "model": "NVIDIA A100-SXM4-40GB", "memory": 40 * 2**30}])


def test_gpu_group_routes_annotated_tasks_and_pins_devices(federation):
    def visible_devices() -> str:  # defined here so it is pickled by value for the workers
        return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")

    fed = federation
    fed.add_lab("lab-gpu", user="alice")
    fed.add_agent("lab-gpu", "gpu-box", cpus=2, memory="4 GiB", gpus="1",
                  env={"PARALLEX_FAKE_GPUS": FAKE_GPUS})
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB") as cluster:
        cluster.scale(1)
        cluster.scale(1, gpus=1, gpu_model="a100")
        cluster.wait_for_workers(2, timeout=60)
        client = cluster.get_client()
        gpu_lease = next(le for le in cluster.leases if le["gpus"] == 1)
        resources = {ws["name"]: ws["resources"] for ws in cluster.connected_workers()}
        assert resources[gpu_lease["id"]] == {"GPU": 1}
        with dask.annotate(resources={"GPU": 1}):
            on_gpu = dask.delayed(visible_devices)().persist()
        # Only GPU 1 was offered (--gpus 1), so the lease got device 1 and nothing else.
        assert on_gpu.compute() == "1"
        who = client.who_has(on_gpu)
        (holders,) = who.values()
        by_address = {ws["address"]: ws for ws in cluster.connected_workers()}
        assert [by_address[a]["name"] for a in holders] == [gpu_lease["id"]]
        cpu_worker = next(a for a, ws in by_address.items() if not ws["resources"])
        assert client.submit(visible_devices, workers=[cpu_worker], pure=False).result() == ""
        client.close()


def test_adapt_scales_up_under_load_and_back_down(two_labs):
    fed = two_labs
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False,
                          worker_memory="1 GiB", heartbeat_interval=0.5) as cluster:
        cluster.adapt(minimum=1, maximum=3, interval="200ms", wait_count=2)
        wait_until(lambda: len(cluster.connected_workers()) == 1, 60, "the adaptive minimum")
        client = cluster.get_client()
        futures = client.map(time.sleep, [0.5] * 40, pure=False)
        wait_until(lambda: len(cluster.connected_workers()) == 3, 60, "scale-up to 3 workers")
        wait(futures, timeout=120)
        wait_until(lambda: len(cluster.connected_workers()) == 1, 60, "scale-down to 1 worker")
        wait_until(lambda: sum(len(live_worker_pids(w)) for w in fed.workdirs.values()) == 1,
                   30, "retired worker processes to exit")

        def ended_released():
            cluster.sync(cluster._refresh)
            done = [le for le in cluster.leases if le["state"] == "ended"]
            return done if len(done) >= 2 else None

        ended = wait_until(ended_released, 30, "released leases to end")
        # Retired by the adaptive policy: released, never mistaken for failed workers.
        assert {le["end_reason"] for le in ended} == {"released"}, ended
        client.close()


def test_agent_token_never_reaches_workers(federation):
    fed = federation
    fed.add_lab("lab-a", user="alice")
    token = fed.provider_tokens["lab-a"]
    # The worst case for leaking: token on the agent's command line and in its environment.
    fed.add_agent("lab-a", "leaky", cpus=2, token_on_command_line=True,
                  env={"PARALLEX_PROVIDER_TOKEN": token, "MY_SERVICE_TOKEN": token})
    with FederatedCluster(fed.url, fed.user_tokens["alice"], dashboard=False) as cluster:
        cluster.scale(1)
        cluster.wait_for_workers(1, timeout=60)
        (state,) = recorded_workers(fed.workdirs["leaky"]).values()
        worker = psutil.Process(state["pid"])
        assert token not in " ".join(worker.cmdline())  # its title, "dask worker [address]"
        assert all(token not in v for v in worker.environ().values())
        assert not [k for k in worker.environ() if k.startswith("PARALLEX_")]
        for path in (fed.workdirs["leaky"] / "leases").rglob("*"):
            if path.is_file():
                assert token not in path.read_text(errors="replace"), path
        # Code running on the worker sees no token either.
        client = cluster.get_client()
        seen = client.run(lambda: {k: v for k, v in os.environ.items() if "TOKEN" in k})
        assert seen and all(env == {} for env in seen.values())
        # The command line the worker was started with (ps shows its title instead).
        argv = client.run(lambda: " ".join(__import__("sys").argv))
        assert argv and all("--tls-key" in a and token not in a for a in argv.values())
        client.close()
