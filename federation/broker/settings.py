"""The broker's settings: one dataclass whose fields carry their help texts and units; the
`parallex broker` command line is generated from it, so each default is written once.

A field's help says what it does; the command line adds the unit and the default. Settings are
kept in seconds (and PCU, requests); ``cli_scale`` shows a field in a friendlier unit on the
command line (hours for half-lives).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from accounting.cloud import CloudPrices, load_cloud_prices
from accounting.half_lives import DEFAULT_HALF_LIFE, DEFAULT_RELIABILITY_HALF_LIFE

from ..cli_numbers import number, out_of_range

HOUR = 3600.0


def setting(default: Any, help: str, *, unit: str = "s", cli_scale: float = 1.0,
            env: str | None = None, cli: bool = True, least: float = 0.0,
            above: bool = False, most: float = math.inf) -> Any:
    """A BrokerSettings field. ``unit``: the unit the command line shows (``cli_scale`` setting
    units per command-line unit); ``env``: an environment variable that overrides the default
    on the command line; ``cli=False``: not a flag (derived or set in code). A number must be
    at least ``least`` (more than it, with ``above``) and at most ``most``, in setting units."""
    return field(default=default, metadata={"help": help, "unit": unit, "cli_scale": cli_scale,
                                            "env": env, "cli": cli, "least": least,
                                            "above": above, "most": most})


@dataclass
class BrokerSettings:
    """The broker's tunables; times are in seconds."""

    provider_timeout: float = setting(
        30.0, "without a provider heartbeat, after which its leases end as lost", above=True)
    cluster_timeout: float = setting(
        60.0, "without a cluster heartbeat, after which its leases end", above=True)
    start_timeout: float = setting(
        300.0, "from a lease's placement until its worker must have joined the cluster's "
        "scheduler (confirmed by the cluster); after that it ends 'failed' and its provider "
        "earns nothing", above=True)
    release_timeout: float = setting(
        60.0, "a released lease may wait for its agent to report the worker stopped before it "
        "ends 'lost' and its capacity is free again; keep it above the agents' --release-grace "
        "plus their stop timeout (10 s)", above=True)
    min_heartbeat_interval: float = setting(
        1.0, "that must pass between two heartbeats of one provider; a sooner one is answered "
        "429 (never more than half the interval agents are told, provider timeout / 5)")
    rate_limit: float = setting(
        20.0, "one token may make to the agent and cluster endpoints, per provider machine for "
        "agents; more are answered 429 with Retry-After", unit="requests/s", above=True)
    rate_burst: float = setting(
        100.0, "one token may make at once above --rate-limit before it applies",
        unit="requests", least=1.0)
    max_concurrent_requests: int = setting(
        16, "one token (per provider machine) may have in flight at once, long polls included",
        unit="requests", least=1)
    max_concurrent_reports: int = setting(
        2, "one token may have in flight at once among the reports that sum usage history "
        "(usage totals, a lab's members, machines and ledger, the job-record feed); each "
        "holds a request thread and a database connection while it runs, and more are "
        "answered 429 with Retry-After", unit="requests", least=1)
    report_threads: int = setting(
        8, "reports that sum usage history one broker replica runs at once, all tokens "
        "together (of its request threads); more wait their turn holding no thread, so "
        "reports never take the threads that agents' and clusters' requests need",
        unit="requests", least=1)
    poll_timeout: float = setting(
        20.0, "an agent's long poll waits at most (derived: provider timeout / 2, 1 to 20)",
        cli=False, above=True)
    metering_interval: float = setting(
        60.0, "per metered period of a running lease; keep it fixed for a database: periods "
        "continue from where the last one ended", above=True)
    metering_unit: int = setting(
        1000, "one unit of work of the periodic metering pass charges, each unit committed "
        "by itself: a lease report or release waits for one unit at most, and a smaller unit "
        "is a shorter burst of work on a busy machine", unit="leases", least=1)
    metering_pause: float = setting(
        1.0, "pause after each unit of the periodic metering pass, as a multiple of the time "
        "the unit took (at most 1 s a pause), so that requests have the machine between "
        "units: 1 makes a pass take about twice as long and leaves half of its time to the "
        "requests (0: no pause)", unit="ratio", most=10.0)
    end_metering_spacing: float = setting(
        10.0, "at least between two batches that charge the last part of leases that ended; "
        "the ends in between are gathered into the next batch, a lone end after a quiet "
        "spell is charged at once. Ends come in bursts (clusters closing or scaling down "
        "together), whose charges then wait for the burst to pass instead of competing with "
        "the requests that made it (0: a batch as soon as the last one ends)")
    placement_spacing: float = setting(
        0.25, "at least between the starts of two placement passes on the replica that places; "
        "the asks in between are served by the next pass, a lone ask after a quiet spell at "
        "once. Under churn (many clusters scaling together) each pass reads every online "
        "machine with its usage, the heaviest statement on the database, so fewer, fuller "
        "passes leave more of the machine to requests; a scale request that waits for its "
        "pass may wait this much longer (0: a pass as soon as the last one ends)",
        most=5.0)
    initial_grant: float = setting(
        1000.0, "granted to each new lab from the grants account (0 grants nothing)",
        unit="PCU")
    fair_share_half_life: float = setting(
        DEFAULT_HALF_LIFE, "after which past usage counts half for fair share", unit="hours",
        cli_scale=HOUR, above=True)
    reliability_half_life: float = setting(
        DEFAULT_RELIABILITY_HALF_LIFE, "of clean lease time served that halve a provider's "
        "reliability penalty from lost and failed leases", unit="hours", cli_scale=HOUR, above=True)
    cloud_prices: CloudPrices = field(default_factory=load_cloud_prices,
                                      metadata={"cli": False})
    reaper_stall: float = setting(
        120.0, "one reaper tick (ending what went silent, the leader's metering and capacity "
        "passes) may run before its replica stops renewing the leadership, so another replica "
        "takes over the periodic passes and placement from one whose tick hangs; a metering "
        "pass over 10,000 leases takes 1-30 s (the longer on a saturated machine, its process "
        "niced), and up to twice that with its pauses (--metering-pause)", above=True)
    periodic_niceness: int = setting(
        10, "added to the process that runs the leader's periodic passes (metering, capacity "
        "samples) on PostgreSQL, so that on a busy machine the replicas answering agents and "
        "users have the cores first: a pass may take longer, a request should not (0: as "
        "the broker)", unit="niceness", least=0, most=19)
    queued_heartbeat_answers: int = setting(
        1, "1: an agent's heartbeat that repeats the last one this replica recorded (the same "
        "workers, the same offer) is answered once queued, before its batch is written, "
        "while this replica's heartbeat batches commit; one that changes something, and "
        "every heartbeat while batches fail or stall, waits for its batch. 0: every "
        "heartbeat waits for its batch (answered 503 when it fails)", unit="switch", least=0,
        most=1)
    thread_niceness: int = setting(
        5, "added to a replica's threads other than its event loop (the request pool, the "
        "batches of heartbeats, reports and lease lists, placement), so that on a busy "
        "machine the event loop, which reads every request and answers agents' heartbeats, "
        "has its process's share of the cores first (0: all threads alike; Linux only)",
        unit="niceness", least=0, most=19)
    capacity_interval: float = setting(
        60.0, "between capacity samples (CPUs and GPUs online and leased per lab) for the "
        "dashboards' capacity history", above=True)
    hub_api_url: str | None = setting(
        None, "JupyterHub API URL whose user tokens the broker accepts (set when the hub runs "
        "the broker as a service; empty: Parallex tokens only)", unit="", env="JUPYTERHUB_API_URL")
    hub_service_name: str = setting(
        "parallex", "service name in the scope a hub token needs, "
        "access:services!service=NAME", unit="", env="JUPYTERHUB_SERVICE_NAME")
    hub_token_cache: float = setting(
        60.0, "a hub token's owner is remembered before the hub is asked again")
    token_cache: float = setting(
        10.0, "an API token's owner (lab, user, role) is remembered by a broker replica "
        "before the database is asked again; a revocation or a membership change clears it "
        "at once on every replica (0: ask every time)")
    db_ping_after_idle: float = setting(
        5.0, "a pooled PostgreSQL connection may sit unused before it is checked with a "
        "round trip as it is next used (and replaced if it broke); connections in steady use "
        "are not checked: one that broke fails its request, answered 503, and the pool is "
        "renewed (0: check every time; lower it where a firewall or pooler drops idle "
        "connections sooner)")
    scheduler_networks: str = setting(
        "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        "networks where users' schedulers may listen, comma-separated: a cluster whose "
        "scheduler address lies elsewhere is refused, so neither the gateway nor lab workers "
        "can be pointed at other hosts. The default (loopback and private networks) keeps out "
        "public hosts and link-local metadata services; narrow it to the hub's user-server "
        "network", unit="")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "least" in f.metadata and _is_number(value):
                unit = f.metadata["unit"]  # in code, times are seconds whatever the flag shows
                word = "s" if unit in ("s", "hours") else UNIT_WORDS.get(unit, unit)
                if not math.isfinite(value):  # as the flags refuse it: inf is no timeout
                    raise ValueError(f"{f.name} must be a finite number, not {value}")
                wrong = out_of_range(value, f.metadata["least"], f.metadata["above"], word,
                                     f.metadata["most"])
                if wrong:
                    raise ValueError(f"{f.name} {wrong}")


#: How a help text starts for each unit (the help itself continues the sentence).
LEADS = {"s": "Seconds ", "hours": "Hours ", "requests/s": "Requests per second ",
         "requests": "Requests ", "PCU": "PCU ", "niceness": "Niceness ",
         "leases": "Leases "}


METAVARS = {"s": "SECONDS", "hours": "HOURS", "requests/s": "N", "requests": "N",
            "PCU": "PCU", "niceness": "N", "leases": "N", "ratio": "RATIO",
            "switch": "0|1"}


def _is_number(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool)


#: The unit's word in an error message.
UNIT_WORDS = {"s": "seconds", "hours": "hours", "requests/s": "requests per second",
              "requests": "requests", "PCU": "PCU", "niceness": "nice levels",
              "leases": "leases", "ratio": "times the unit's time", "switch": ""}


def _checked(kind: type, meta: Any) -> Any:
    """An argparse type that reads a number of ``kind`` and refuses one out of its range
    (in the command line's unit)."""
    return number(kind, least=meta["least"] / meta["cli_scale"], above=meta["above"],
                  most=meta["most"] / meta["cli_scale"],
                  unit=UNIT_WORDS.get(meta["unit"], meta["unit"]))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per command-line setting of BrokerSettings, with its unit and default."""
    for f in fields(BrokerSettings):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        scale, unit = meta["cli_scale"], meta["unit"]
        default = f.default if f.default is not MISSING else None
        shown = default / scale if isinstance(default, float) else default
        env = meta.get("env")
        if env and os.environ.get(env):
            shown = os.environ[env]
        kind = {"int": int, "float": float}.get(str(f.type), str)
        lead = LEADS.get(unit, "")
        text = lead + meta["help"] if lead else meta["help"][0].upper() + meta["help"][1:]
        if shown in (None, ""):
            text += " (default: empty"
        else:
            text += f" (default {shown:g}" if isinstance(shown, float) else f" (default {shown}"
        text += f"; the environment's {env} when set)" if env else ")"
        if kind in (int, float):
            kind = _checked(kind, meta)
        parser.add_argument(_flag(f.name), type=kind, default=shown, help=text,
                            dest=f.name, metavar=METAVARS.get(unit, "TEXT"))


def from_arguments(args: argparse.Namespace, **extra: Any) -> BrokerSettings:
    """The settings the parsed flags (and ``extra`` fields) say."""
    values: dict[str, Any] = {}
    for f in fields(BrokerSettings):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        value = getattr(args, f.name)
        if _is_number(value):
            value = value * meta["cli_scale"] if meta["cli_scale"] != 1.0 else value
        if value == "":
            value = None
        values[f.name] = value
    values.setdefault("poll_timeout", min(20.0, max(1.0, values["provider_timeout"] / 2)))
    return BrokerSettings(**{**values, **extra})
