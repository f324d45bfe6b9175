"""What a cluster has cost so far and costs per hour now, for `cluster.cost` and estimates.

Metered periods are read from the usage records (and the sums kept of pruned ones); the time
a running lease has served since its last metered period is priced the same way (it will be
charged at the next pass), so the figure moves while the notebook runs instead of in
metering-interval steps.
"""

from __future__ import annotations

import datetime as dt

from sqlmodel import Session, select

from accounting.cloud import CloudPrices
from accounting.models import as_utc
from accounting.pricing import Resources, gpu_class, pcu_per_hour, price_at
from accounting.retention import lease_sums
from accounting.units import to_nano, to_pcu

from .models import ClusterRecord, Lease, LeaseState, Provider


def cluster_cost(s: Session, cluster: ClusterRecord, *, now: dt.datetime,
                 cloud: CloudPrices) -> dict:
    """PCU charged so far (metered plus accrued), self-use, and the rate of held leases."""
    leases = s.exec(select(Lease, Provider.lab_id).join(
        Provider, Provider.id == Lease.provider_id, isouter=True)
        .where(Lease.cluster_id == cluster.id)).all()
    lease_ids = [lease.id for lease, _lab in leases]
    # From the usage records, and the sums kept of those pruned (accounting/retention.py).
    sums = lease_sums(s, lease_ids).values()
    charged = sum(x.charged for x in sums)
    self_use = sum(x.self_use for x in sums)
    cloud_cost = sum(x.cloud_cost for x in sums)
    price = price_at(s, now)
    accrued = accrued_own = 0
    rate = charged_rate = 0.0
    for lease, provider_lab in leases:
        if lease.state not in (LeaseState.running, LeaseState.releasing) or not lease.started_at:
            continue
        res = Resources(lease.cpus, lease.memory, lease.gpus, lease.priced_gpu_model)
        per_hour = pcu_per_hour(price, res)
        own = provider_lab == cluster.lab_id
        rate += per_hour
        charged_rate += 0 if own else per_hour
        since = as_utc(lease.metered_until or lease.started_at)
        seconds = max(0.0, (now - since).total_seconds())
        pending = to_nano(per_hour * seconds / 3600)
        if own:
            accrued_own += pending
        else:
            accrued += pending
        cls = gpu_class(price, lease.priced_gpu_model)[0] if lease.gpus else None
        cloud_cost += cloud.cost(cpus=lease.cpus, memory=lease.memory, gpus=lease.gpus,
                                 gpu_class=cls, seconds=seconds)
    return {"cluster_id": cluster.id, "pcu": str(to_pcu(charged + accrued)),
            "metered_pcu": str(to_pcu(charged)), "accrued_pcu": str(to_pcu(accrued)),
            "self_use_pcu": str(to_pcu(self_use + accrued_own)),
            "pcu_per_hour": charged_rate, "list_pcu_per_hour": rate,
            "cloud_cost": cloud_cost, "currency": cloud.currency,
            "price_version": price.id}
