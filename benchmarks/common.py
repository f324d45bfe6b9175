"""Shared helpers of the benchmarks: timing statistics and writing results."""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from pathlib import Path

import psutil

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
