"""kernel_start: seconds from starting a kernel (through jupyter_client, as a notebook server
does) until it answers its first execute request, Parallex kernel against a plain ipykernel in
the same run. The Parallex kernel is pointed at a live local federation, so it really starts
its pool connection in the background meanwhile. Target: at most 1.2x.

Run: python -m benchmarks.kernel_start [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from jupyter_client import KernelManager

from benchmarks.common import quiet_logging, report, summary
from tests.utils.federation import make_federation
from tests.utils.kernels import kernel_specs


def time_kernel(km: KernelManager, env: dict[str, str]) -> float:
    start = time.perf_counter()
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("1 + 1", timeout=60)
        elapsed = time.perf_counter() - start
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7, help="Trials of each (default 7).")
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory() as tmp:
        fed = make_federation(Path(tmp))
        try:
            fed.add_lab("lab-a", user="alice")
            fed.add_agent("lab-a", "agent-a", cpus=2, memory="2 GiB")
            specs = kernel_specs(Path(tmp) / "k")
            base = {k: v for k, v in os.environ.items() if not k.startswith("PARALLEX_")}
            env = {**base, "PARALLEX_BROKER_URL": fed.url,
                   "PARALLEX_TOKEN": fed.user_tokens["alice"]}
            parallex, plain = [], []
            for _ in range(args.repeat):  # interleaved so drift hits both alike
                parallex.append(time_kernel(
                    KernelManager(kernel_name="parallex", kernel_spec_manager=specs), env))
                plain.append(time_kernel(KernelManager(kernel_name="python3"), base))
        finally:
            fed.stop()
    ps, bs = summary(parallex), summary(plain)
    ratio = ps["median"] / bs["median"]
    report("kernel_start", [("Parallex kernel (pool connecting in background)", ps),
                            ("plain ipykernel", bs)], "s", ".2f", ratio, "<= 1.2",
           {"parallex_s": ps, "ipykernel_s": bs})


if __name__ == "__main__":
    main()
