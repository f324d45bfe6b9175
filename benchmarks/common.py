"""Shared helpers of the benchmarks: timing statistics and writing results."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from pathlib import Path

import psutil
import psycopg

RESULTS = Path(__file__).with_name("results")


def quiet_logging() -> None:
    """Warnings only: Distributed logs an INFO traceback for every orderly worker close."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform()}


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def write(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def report(name: str, rows: list[tuple[str, dict]], unit: str, fmt: str, ratio: float,
           target: str, extra: dict) -> None:
    """Print the comparison table and the ratio, and write the JSON result."""
    print(table([("cluster", f"median {unit}", "min", "max")]
                + [(label, format(s["median"], fmt), format(s["min"], fmt),
                    format(s["max"], fmt)) for label, s in rows]))
    print(f"ratio federated/peer: {ratio:.2f} (target {target})")
    print(f"wrote {write(name, {**extra, 'ratio': ratio, 'target': target})}")


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def postmaster_of(db_url: str) -> psutil.Process | None:
    """The PostgreSQL server process (postmaster) behind ``db_url``, on this machine."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        backend = psutil.Process(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        return backend.parent()


def server_cpu(postmaster: psutil.Process) -> dict[int, float]:
    """CPU seconds of the server's processes so far, by process id."""
    out = {}
    for p in [postmaster, *postmaster.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = times.user + times.system
    return out


def exited_children_cpu(postmaster: psutil.Process) -> float:
    """CPU seconds of the server's processes that have exited (backends of closed
    connections): the postmaster reaps them, and the kernel adds their times to its."""
    times = postmaster.cpu_times()
    return times.children_user + times.children_system


def server_cpu_between(before: dict[int, float], exited_before: float,
                       postmaster: psutil.Process) -> float:
    """CPU seconds the server's processes used since ``before`` (``server_cpu``) and
    ``exited_before`` (``exited_children_cpu``) were read: of those still running, what they
    added; of those that exited meanwhile, their whole time less what ``before`` held."""
    now = server_cpu(postmaster)
    running = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
    gone_before = sum(cpu for pid, cpu in before.items() if pid not in now)
    return running + exited_children_cpu(postmaster) - exited_before - gone_before
