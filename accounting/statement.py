"""Statements: why a usage record cost what it did, in words a PI or an administrator reads.

Every number comes from the record and the price version it was metered under, so the
explanation of an old charge does not change when prices do.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metering import UsageRecord
from .pricing import GiB, PriceVersion, gpu_class
from .units import fmt_pcu, to_pcu


@dataclass(frozen=True)
class Parties:
    """Readable names of who took part in a metered period."""

    consumer_lab: str
    provider_lab: str
    provider: str
    user: str  # a name, or a phrase like "a member of lab-b" when the reader may not see it


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:.4g} min"
    return f"{seconds / 3600:.4g} h"


def rate_terms(record: UsageRecord, price: PriceVersion) -> list[str]:
    """The terms of PCU per hour: '2 CPUs × 1 PCU/h', '4 GiB × 0.1 PCU/h', ..."""
    terms = [f"{record.cpus:g} CPU{'s' if record.cpus != 1 else ''} × {price.w_cpu:g} PCU/h",
             f"{record.memory / GiB:.4g} GiB × {price.w_mem_gib:g} PCU/h"]
    if record.gpus:
        cls, weight = gpu_class(price, record.gpu_model)
        terms.append(f"{record.gpus} GPU{'s' if record.gpus != 1 else ''} "
                     f"({record.gpu_model or 'unknown model'}, class {cls}) × {weight:g} PCU/h")
    return terms


def explain_usage(record: UsageRecord, price: PriceVersion, parties: Parties,
                  currency: str = "USD") -> list[str]:
    """Lines that take a reader from the reserved resources to every ledger entry."""
    when = f"{record.period_start:%Y-%m-%d %H:%M:%S}–{record.period_end:%H:%M:%S} UTC"
    lines = [
        f"{parties.user} ({parties.consumer_lab}) held lease {record.lease_id} on "
        f"{parties.provider} ({parties.provider_lab}) for {_duration(record.seconds)}, {when}.",
        f"Rate under price version {price.id} (in force from "
        f"{price.effective_from:%Y-%m-%d %H:%M} UTC): " + " + ".join(rate_terms(record, price))
        + f" = {record.pcu_per_hour:g} PCU/h.",
        f"Cost: {record.pcu_per_hour:g} PCU/h × {_duration(record.seconds)} = "
        f"{fmt_pcu(record.charge)} (exactly {to_pcu(record.charge)} PCU).",
    ]
    if record.self_use:
        lines.append(f"Self-use: {parties.consumer_lab} used its own machine, so nothing was "
                     "charged and nothing earned; the cost is recorded for the lab's statement.")
    else:
        kept = record.charge - record.earned
        lines += [
            f"{parties.consumer_lab} was charged {fmt_pcu(record.charge)}.",
            f"{parties.provider_lab} earned {fmt_pcu(record.earned)} = charge × "
            f"(1 − {price.fee_fraction:.4g} federation fee) × {record.reliability:.3f} "
            f"reliability of {parties.provider}.",
            f"The federation account kept {fmt_pcu(kept)}"
            + (" (fee and the reliability discount)." if kept else "."),
        ]
    if record.cloud_cost:
        lines.append(f"The same resources on demand in a public cloud: about "
                     f"{record.cloud_cost:,.4f} {currency}.")
    return lines
