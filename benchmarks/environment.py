"""environment: seconds from scale(1) to the first connected worker when the notebook has 50
packages the lab's agent lacks, with the agent's cache cold (nothing built, uv's download
cache empty) and warm (built by an earlier cluster), against a notebook whose packages the
agent already has (a ready environment, nothing to build); and the disk each cached
environment takes. Target: warm within 1.2x of ready.

The notebook is a virtual environment of its own (the agent's packages plus 50 pure-Python
packages from PyPI, latest versions); each trial is a fresh FederatedCluster in a process of
that notebook's Python. The cold build downloads from PyPI, so its figure depends on the
network.

Run: python -m benchmarks.environment [--repeat 5] [--packages 50] [--warm-workers 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks.common import quiet_logging, report, summary
from federation.environment import installed, normalize, uv_binary
from federation.environment_cache import disk_usage
from tests.utils.environments import notebook_environment
from tests.utils.federation import make_federation
from tests.utils.procs import wait_warm

#: Small, common pure-Python packages; the first ``--packages`` not installed here are used.
CANDIDATES = """
humanize tabulate pytz simplejson colorama termcolor docopt schedule retrying backoff
cachetools diskcache appdirs portalocker boltons funcy bidict frozendict munch addict
python-box cattrs marshmallow voluptuous schema cerberus xmltodict inflection inflect
unidecode text-unidecode python-slugify emoji ftfy chardet validators furl hyperlink
rfc3986 uritemplate markdown2 commonmark docutils ply lark parsimonious isodate iso8601
croniter python-crontab toml configobj python-dotenv environs loguru structlog
coloredlogs humanfriendly prettytable texttable terminaltables asciitree anytree treelib
pint mpmath sh pyfiglet art tinydb pypdf nameparser pycountry
""".split()

TRIAL = textwrap.dedent("""\
    import json, sys, time
    from federation.cluster import FederatedCluster
    t0 = time.perf_counter()
    cluster = FederatedCluster(sys.argv[1], sys.argv[2], lease_start_timeout=900, quiet=True)
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        cluster.scale(1)
        cluster.wait_for_workers(1)
        first = time.perf_counter() - t1
    finally:
        cluster.close()
    print(json.dumps({"start": started, "first_worker": first}))
""")


def trial(python: Path, fed) -> dict:
    done = subprocess.run([str(python), "-c", TRIAL, fed.url, fed.user_tokens["alice"]],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"trial failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bytes_not_linked(folder: Path, cache: Path) -> int:
    """Disk of the files under ``folder`` that are not hard links of files under ``cache``."""
    import os

    shared = {os.lstat(os.path.join(root, name)).st_ino
              for root, _dirs, files in os.walk(cache) for name in files}
    seen: set[int] = set()
    total = 0
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if st.st_ino not in shared and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="Warm and ready trials (5).")
    parser.add_argument("--packages", type=int, default=50, help="Packages to add (50).")
    parser.add_argument("--warm-workers", type=int, default=1,
                        help="The agent's --warm-workers (default 1, as a lab would run it).")
    args = parser.parse_args()
    quiet_logging()
    here = set(installed())
    extra = [p for p in CANDIDATES if normalize(p) not in here][: args.packages]
    if len(extra) < args.packages:
        sys.exit(f"only {len(extra)} candidate packages are missing here; fewer than "
                 f"{args.packages}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        notebook = notebook_environment(tmp / "notebook")
        subprocess.run([uv_binary(), "pip", "install", "--quiet", "--no-deps", "--python",
                        str(notebook), "--cache-dir", str(tmp / "notebook-uv-cache"), *extra],
                       check=True)
        fed = make_federation(tmp)
        try:
            fed.add_lab("lab-a", user="alice")
            agent = fed.add_agent("lab-a", "agent-a", cpus=2, memory="4 GiB",
                                  extra=("--warm-workers", str(args.warm_workers)))

            def settled_trial(python: Path) -> dict:
                """One trial, then wait until the agent's warm pool is full again (it
                refills in the environment the last lease used)."""
                result = trial(python, fed)
                if args.warm_workers:
                    wait_warm(agent, 1, timeout=120)
                return result

            cache = fed.workdirs["agent-a"] / "environments"
            if args.warm_workers:
                wait_warm(agent, 1, timeout=120)
            ready = [settled_trial(Path(sys.executable)) for _ in range(args.repeat)]
            shutil.rmtree(cache, ignore_errors=True)  # nothing built, no downloads cached
            cold = settled_trial(notebook)
            warm = [settled_trial(notebook) for _ in range(args.repeat)]
            built = [p for p in cache.iterdir() if (p / ".ready").exists()]
            env_bytes = disk_usage(built[0])
            uv_cache_bytes = disk_usage(cache / ".uv-cache")
            own_bytes = bytes_not_linked(built[0], cache / ".uv-cache")
            builds = (cache / "builds.log").read_text().splitlines()
        finally:
            fed.stop()
    rs = summary([t["first_worker"] for t in ready])
    ws = summary([t["first_worker"] for t in warm])
    cs = summary([cold["first_worker"]])
    ratio = ws["median"] / rs["median"]
    print(f"{len(extra)} packages added to the notebook; {len(builds)} build(s) on the agent")
    print(f"disk per cached environment: {env_bytes / 2**20:.1f} MiB of files, of which "
          f"{own_bytes / 2**20:.1f} MiB its own; the rest are hard links into uv's download "
          f"cache ({uv_cache_bytes / 2**20:.1f} MiB, shared by every environment)")
    print(f"cluster start (describing {len(extra)}+ packages): median "
          f"{summary([t['start'] for t in warm])['median']:.2f} s with them, "
          f"{summary([t['start'] for t in ready])['median']:.2f} s without")
    report("environment", [("new environment, cold cache", cs),
                           ("same environment, warm cache", ws),
                           ("ready environment (agent's own)", rs)],
           "s", ".2f", ratio, "<= 1.2 (warm / ready)",
           {"packages": len(extra), "cold_s": cs, "warm_s": ws, "ready_s": rs,
            "env_disk_bytes": env_bytes, "env_own_bytes": own_bytes,
            "uv_cache_bytes": uv_cache_bytes,
            "builds": len(builds), "warm_workers": args.warm_workers})


if __name__ == "__main__":
    main()
