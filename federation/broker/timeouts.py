"""Timeouts: what has been silent or stuck too long. These functions find and end it (the
caller commits and wakes whom it concerns); the service calls them from heartbeats and from
the reaper that runs every second."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from accounting.models import as_utc

from ..lease_states import EndReason, LeaseState
from .lease_ends import end, end_by_provider
from .models import HELD_STATES, NOT_ENDED, ClusterRecord, Lease, Provider
from .settings import BrokerSettings


def overdue(state: LeaseState, lease_id: str, releasing_at: dt.datetime | None,
            assigned_at: dt.datetime | None, alive: set[str], now: dt.datetime,
            settings: BrokerSettings, started_at: dt.datetime | None = None,
            listed_before: dt.datetime | None = None) -> str | None:
    """Why a held lease is overdue on its provider's heartbeat ("release", "gone",
    "start"), or None. From columns, so a heartbeat batch need not build a Lease per
    held lease to find the few that are.

    ``listed_before``: a running lease missing from ``alive`` is gone only if it started
    before then. A heartbeat answered once queued (agent_batches.py) may be recorded after
    the agent's next report, which may start a lease the heartbeat could not list yet."""
    if (state == LeaseState.releasing and releasing_at is not None
            and (now - as_utc(releasing_at)).total_seconds() > settings.release_timeout):
        return "release"
    if (state in (LeaseState.running, LeaseState.suspended) and lease_id not in alive
            and (listed_before is None or started_at is None
                 or as_utc(started_at) < listed_before)):
        return "gone"
    if (state == LeaseState.starting and assigned_at is not None
            and (now - as_utc(assigned_at)).total_seconds() > settings.start_timeout):
        return "start"
    return None


def end_overdue(s: Session, lease: Lease, alive: set[str], now: dt.datetime,
                settings: BrokerSettings, listed_before: dt.datetime | None = None) -> bool:
    """On a provider's heartbeat: end its lease if it is overdue — a release the agent never
    confirmed, a running lease whose worker the agent no longer has, a start that never
    joined its scheduler. True when the lease ended."""
    why = overdue(lease.state, lease.id, lease.releasing_at, lease.assigned_at, alive, now,
                  settings, lease.started_at, listed_before)
    if why == "release":
        # The agent could not report the end (or would not): the capacity it holds comes
        # back, and billing stops. Lost, whatever the release aimed at.
        lease.release_reason = None
        end(lease, EndReason.lost, f"the provider did not report the worker stopped within "
                                   f"{settings.release_timeout:g} s of its release")
    elif why == "gone":
        end_by_provider(s, lease, EndReason.failed, "the provider reports no worker process "
                                                    "for this lease")
    elif why == "start":
        end_by_provider(s, lease, EndReason.failed,
                        f"the worker did not connect to its scheduler within "
                        f"{settings.start_timeout:g} s of being placed")
    else:
        return False
    s.add(lease)
    return True


@dataclass
class Silent:
    """What a reaper pass found silent: providers (now offline, their leases ended) and
    clusters (still to be closed as lost)."""

    providers: list[str] = field(default_factory=list)
    leases: set[str] = field(default_factory=set)
    clusters: list[str] = field(default_factory=list)


def end_silent_providers(s: Session, now: dt.datetime, settings: BrokerSettings) -> Silent:
    """Providers past the provider timeout go offline and their leases end lost; clusters
    past the cluster timeout are listed (closing them is the service's)."""
    silent = Silent()
    provider_cutoff = now - dt.timedelta(seconds=settings.provider_timeout)
    cluster_cutoff = now - dt.timedelta(seconds=settings.cluster_timeout)
    names: dict[str, str] = {}
    for p in s.exec(select(Provider).where(Provider.online == True,  # noqa: E712
                                           Provider.last_seen < provider_cutoff)
                    .order_by(Provider.id)):
        p.online = False
        s.add(p)
        silent.providers.append(p.id)
        names[p.id] = p.name
    # Their leases locked in one statement, in id order, before any is changed: every other
    # writer of many leases (reports, releases, cluster heartbeats, metering) takes them in
    # that order too. Provider by provider, as before, the locks went in no order across
    # providers, and a metering unit charging the same leases deadlocked with the reaper
    # (PostgreSQL aborted one of them after a second).
    if names:
        for lease in s.exec(select(Lease).where(col(Lease.provider_id).in_(names), NOT_ENDED,
                                                col(Lease.state).in_(HELD_STATES))
                            .order_by(Lease.id).with_for_update()):
            end_by_provider(s, lease, EndReason.lost,
                            f"provider {names[lease.provider_id]} stopped heart-beating for "
                            f"more than {settings.provider_timeout:g} s")
            s.add(lease)
            silent.leases.add(lease.id)
    silent.clusters = [c.id for c in s.exec(
        select(ClusterRecord).where(ClusterRecord.active == True,  # noqa: E712
                                    ClusterRecord.last_seen < cluster_cutoff))]
    return silent
