"""Prices in Parallex Compute Units (PCU): one unit for mixed resources, like Slurm's TRES
billing weights. PCU per hour = cpus·w_cpu + memory_GiB·w_mem + gpus·w_gpu[GPU class].

Prices are versioned: each version is effective from a time and never edited, so every charge
can be explained by the version it used.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass

from sqlmodel import Field, Session, SQLModel, col, select

from .cloud import GiB  # defined once, in the module without database imports
from .gpus import class_of
from .models import utcnow

logger = logging.getLogger("parallex.accounting")


# GPU classes: a pattern matched against the NVML model name (case-insensitive), in order, and
# the PCU per hour of one such GPU. Roughly proportional to what the cards do for ML work.
DEFAULT_GPU_CLASSES: list[tuple[str, str, float]] = [
    ("h200", r"h200", 14.0),
    ("h100", r"h100", 12.0),
    ("a100", r"a100", 8.0),
    ("l40s", r"l40s", 6.0),
    ("l40", r"l40\b", 5.0),
    ("a6000", r"a6000|rtx 6000|a40\b", 4.0),
    ("v100", r"v100", 3.5),
    ("rtx4090", r"4090", 3.0),
    ("a10", r"a10\b|a10g", 2.5),
    ("rtx3090", r"3090|3080", 2.0),
    ("t4", r"\bt4\b", 1.5),
    ("consumer", r"geforce|rtx|gtx", 1.0),
]
DEFAULT_GPU_WEIGHT = 3.0


class PriceVersion(SQLModel, table=True):
    """One version of the price table; effective from ``effective_from`` until the next."""

    id: int | None = Field(default=None, primary_key=True)
    effective_from: dt.datetime = Field(index=True, unique=True)
    w_cpu: float = Field(ge=0, description="PCU per hour per reserved CPU core.")
    w_mem_gib: float = Field(ge=0, description="PCU per hour per reserved GiB of memory.")
    gpu_classes_json: str = Field(description="JSON list of [class, pattern, PCU/hour].")
    default_gpu_weight: float = Field(ge=0, description="PCU/hour of a GPU matching no class.")
    fee_fraction: float = Field(default=0.0, ge=0, lt=1,
                                description="Share of each charge kept by the federation.")
    created_at: dt.datetime = Field(default_factory=utcnow)

    @property
    def gpu_classes(self) -> list[tuple[str, str, float]]:
        return [tuple(c) for c in json.loads(self.gpu_classes_json)]


@dataclass(frozen=True)
class Resources:
    """What a lease reserves."""

    cpus: float
    memory: int  # bytes
    gpus: int = 0
    gpu_model: str | None = None


def gpu_class(price: PriceVersion, model: str | None) -> tuple[str, float]:
    """(class name, PCU per hour) of one GPU of ``model``; unknown models get the default."""
    cls = class_of(model, price.gpu_classes)
    if cls is not None:
        return cls, float(dict((c, w) for c, _p, w in price.gpu_classes)[cls])
    logger.warning("GPU model %r matches no GPU class; charged as the default class (%g PCU/h)",
                   model, price.default_gpu_weight)
    return "default", price.default_gpu_weight


def pcu_per_hour(price: PriceVersion, res: Resources) -> float:
    """The PCU per hour of reserving ``res`` under ``price``."""
    rate = res.cpus * price.w_cpu + res.memory / GiB * price.w_mem_gib
    if res.gpus:
        rate += res.gpus * gpu_class(price, res.gpu_model)[1]
    return rate


def default_price(effective_from: dt.datetime) -> PriceVersion:
    return PriceVersion(effective_from=effective_from, w_cpu=1.0, w_mem_gib=0.1,
                        gpu_classes_json=json.dumps(DEFAULT_GPU_CLASSES),
                        default_gpu_weight=DEFAULT_GPU_WEIGHT)


def ensure_default_price(session: Session) -> None:
    """Install the default price table, effective from the epoch, in an empty database."""
    if session.exec(select(PriceVersion.id).limit(1)).first() is None:
        session.add(default_price(dt.datetime(1970, 1, 1, tzinfo=dt.UTC)))
        session.flush()


def price_at(session: Session, at: dt.datetime) -> PriceVersion:
    """The price version in force at ``at``."""
    price = session.exec(select(PriceVersion).where(PriceVersion.effective_from <= at)
                         .order_by(col(PriceVersion.effective_from).desc()).limit(1)).first()
    if price is None:
        ensure_default_price(session)
        return price_at(session, at)
    return price


GPU_CLASS_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


def check_gpu_class(name: str, pattern: str, weight: float) -> None:
    """Raise ValueError unless (name, pattern, weight) can be a GPU class."""
    if not GPU_CLASS_NAME.fullmatch(name):
        raise ValueError(f"GPU class name {name!r} must be 1-32 lower-case letters, digits, "
                         "'_', '.' or '-', starting with a letter or digit")
    if not 0 < len(pattern) <= 200:
        raise ValueError(f"the pattern of GPU class {name!r} must be 1 to 200 characters")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"the pattern of GPU class {name!r} is not a regular expression: "
                         f"{exc}") from None
    if weight < 0:
        raise ValueError(f"the weight of GPU class {name!r} must be 0 or more; got {weight}")


def set_price(session: Session, *, effective_from: dt.datetime, w_cpu: float, w_mem_gib: float,
              gpu_weights: dict[str, float] | None = None, default_gpu_weight: float | None = None,
              fee_fraction: float | None = None, now: dt.datetime | None = None,
              new_gpu_classes: list[tuple[str, str, float]] | None = None) -> PriceVersion:
    """Add a price version. Raises ValueError for negative weights or a start in the past
    (charges already made under the current version must stay explainable).

    ``new_gpu_classes`` adds classes (name, pattern matched against the GPU's model name,
    PCU/hour); they are tried before the existing ones, so a new card is not caught by a broad
    pattern such as the consumer class's."""
    now = now or utcnow()
    if effective_from < now:
        raise ValueError(f"a new price must take effect now or later; "
                         f"{effective_from:%Y-%m-%d %H:%M} UTC is in the past")
    weights = {"w_cpu": w_cpu, "w_mem_gib": w_mem_gib, **(gpu_weights or {})}
    if default_gpu_weight is not None:
        weights["default GPU"] = default_gpu_weight
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise ValueError(f"weights must be 0 or more; got {negative}")
    if fee_fraction is not None and not 0 <= fee_fraction < 1:
        raise ValueError(f"fee must be a fraction from 0 up to (not including) 1; "
                         f"got {fee_fraction}")
    current = price_at(session, now)
    classes = current.gpu_classes
    known = {c[0] for c in classes}
    unknown = sorted(set(gpu_weights or {}) - known)
    if unknown:
        raise ValueError(f"unknown GPU classes {unknown}; known: {sorted(known)}")
    classes = [(c, p, (gpu_weights or {}).get(c, w)) for c, p, w in classes]
    added = []
    for name, pattern, weight in new_gpu_classes or []:
        check_gpu_class(name, pattern, weight)
        if name in known or name in {c for c, _p, _w in added}:
            raise ValueError(f"GPU class {name!r} exists already; set its weight with "
                             f"gpu_weights ({name}=WEIGHT)")
        added.append((name, pattern, float(weight)))
    classes = added + classes
    if session.exec(select(PriceVersion.id)
                    .where(PriceVersion.effective_from == effective_from)).first():
        raise ValueError(f"a price version already takes effect at {effective_from}")
    version = PriceVersion(
        effective_from=effective_from, w_cpu=w_cpu, w_mem_gib=w_mem_gib,
        gpu_classes_json=json.dumps(classes),
        default_gpu_weight=(default_gpu_weight if default_gpu_weight is not None
                            else current.default_gpu_weight),
        fee_fraction=fee_fraction if fee_fraction is not None else current.fee_fraction)
    session.add(version)
    session.flush()
    return version
