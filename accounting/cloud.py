"""Reference cloud prices: each usage record's equivalent on-demand cloud cost ("savings").

The table is configuration, not ledger data: it is read from a YAML file (a shipped default,
or the broker's --cloud-prices file) and the cost it gives is stored on each usage record, so
changing the table later does not rewrite what was recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GiB = 2**30  # bytes; pricing takes it from here (this module loads no database code)

DEFAULT_TABLE = Path(__file__).with_name("cloud_prices.yaml")


@dataclass(frozen=True)
class CloudPrices:
    """Per-hour prices of one reserved CPU, GiB and GPU (by GPU class)."""

    currency: str = "USD"
    cpu_hour: float = 0.0
    memory_gib_hour: float = 0.0
    gpu_hour: dict[str, float] = field(default_factory=dict)
    default_gpu_hour: float = 0.0

    def cost(self, *, cpus: float, memory: int, gpus: int, gpu_class: str | None,
             seconds: float) -> float:
        """What ``seconds`` of these resources would cost in the cloud."""
        gpu_rate = self.gpu_hour.get(gpu_class or "", self.default_gpu_hour) if gpus else 0.0
        hourly = cpus * self.cpu_hour + memory / GiB * self.memory_gib_hour + gpus * gpu_rate
        return hourly * seconds / 3600

    def public(self) -> dict[str, Any]:
        return {"currency": self.currency, "cpu_hour": self.cpu_hour,
                "memory_gib_hour": self.memory_gib_hour, "gpu_hour": dict(self.gpu_hour),
                "default_gpu_hour": self.default_gpu_hour}


class CloudPriceError(ValueError):
    """The reference price file is missing, unreadable or has bad values."""


def load_cloud_prices(path: str | Path | None = None) -> CloudPrices:
    """Read a reference table; the shipped one when ``path`` is None."""
    path = Path(path) if path else DEFAULT_TABLE
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CloudPriceError(f"cannot read cloud price table {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CloudPriceError(f"cloud price table {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise CloudPriceError(f"cloud price table {path} must be a mapping; see {DEFAULT_TABLE}")
    unknown = set(raw) - {"currency", "cpu_hour", "memory_gib_hour", "gpu_hour",
                          "default_gpu_hour"}
    if unknown:
        raise CloudPriceError(f"cloud price table {path}: unknown keys {sorted(unknown)}")
    try:
        gpu = {str(k): float(v) for k, v in (raw.get("gpu_hour") or {}).items()}
        table = CloudPrices(currency=str(raw.get("currency", "USD")),
                            cpu_hour=float(raw.get("cpu_hour", 0)),
                            memory_gib_hour=float(raw.get("memory_gib_hour", 0)),
                            gpu_hour=gpu, default_gpu_hour=float(raw.get("default_gpu_hour", 0)))
    except (TypeError, ValueError) as exc:
        raise CloudPriceError(f"cloud price table {path}: prices must be numbers ({exc})") from exc
    negative = [k for k, v in [("cpu_hour", table.cpu_hour),
                               ("memory_gib_hour", table.memory_gib_hour),
                               ("default_gpu_hour", table.default_gpu_hour),
                               *table.gpu_hour.items()] if v < 0]
    if negative:
        raise CloudPriceError(f"cloud price table {path}: negative prices for {negative}")
    return table
