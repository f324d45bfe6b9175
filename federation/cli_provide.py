"""`parallex provide`'s owner-policy and lease-limit options, its `--dry-run` and its
`--print-systemd-unit`: what a lab administrator sets up once per machine."""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from pathlib import Path

from .owner_activity import OwnerMeter, parse_accounts
from .owner_policy import OwnerPolicy, OwnerWatch, PolicyError, load_policy

#: Where the documented installation puts Parallex: readable by the worker accounts.
INSTALL_PREFIX = "/opt/parallex"


def add_options(p: argparse.ArgumentParser) -> None:
    """The owner-policy, limit and installation options of `parallex provide`."""
    pol = p.add_argument_group(
        "owner policy", "When this machine offers its capacity and how leases make way for its "
        "owner. A YAML file (--policy) holds the same settings (keys: offer, idle_cpus, "
        "idle_for, busy_cpus, suspend_after, resume_after, preempt_after, vacate_time, "
        "schedule, timezone, owner_accounts); an option given here overrides the file.")
    pol.add_argument("--policy", metavar="FILE", help="YAML owner-policy file (default: none, "
                     "offer always).")
    pol.add_argument("--dry-run", action="store_true",
                     help="Measure the owner's activity for one second, print what the policy "
                          "would do right now and why, and exit (nothing is started).")
    pol.add_argument("--offer", help="When to offer capacity: always, idle, schedule, or "
                     "idle,schedule for idle within the schedule (default always).")
    pol.add_argument("--schedule", action="append", metavar="WINDOW",
                     help="A window in which capacity may be offered, e.g. 'mon-fri "
                          "19:00-07:00' or 'sat,sun 00:00-24:00'; repeat for more (default: "
                          "none; needed with --offer schedule).")
    pol.add_argument("--timezone", help="Time zone of the schedule, e.g. Europe/Zurich "
                     "(default: the machine's local time).")
    pol.add_argument("--idle-cpus", type=float, help="Owner CPU use in cores below which the "
                     "machine counts as idle (default 0.3).")
    pol.add_argument("--idle-for", type=float, help="Seconds the owner must have been idle "
                     "before capacity is offered (default 900).")
    pol.add_argument("--busy-cpus", type=float, help="Owner CPU use in cores above which the "
                     "owner is back and leases make way (default 0.5).")
    pol.add_argument("--suspend-after", type=float, help="Seconds of owner activity before "
                     "the leases' workers are suspended; 0 suspends at once (default 10).")
    pol.add_argument("--resume-after", type=float, help="Seconds the owner must have been idle "
                     "again before suspended workers resume (default 300).")
    pol.add_argument("--preempt-after", type=float, help="Seconds a worker stays suspended "
                     "before it is preempted: retired through its scheduler so its data "
                     "moves, its lease ended 'preempted' (default 600).")
    pol.add_argument("--vacate-time", type=float, help="Seconds a preempted worker gets to "
                     "hand its data over before it is killed (default 30; keep it below the "
                     "broker's release timeout, 60 s by default).")
    pol.add_argument("--owner-accounts", metavar="LIST",
                     help="Comma-separated accounts, uids or uid ranges whose processes are "
                          "the owner's, e.g. 'alice,1000-1999' (default: every process that "
                          "is not Parallex's).")
    lim = p.add_argument_group("lease limits")
    lim.add_argument("--cgroups", choices=["auto", "v1", "v2", "off"], default="auto",
                     help="Hold each lease's worker to its size in a cgroup: CPU quota = its "
                          "CPUs, memory maximum = its memory, a pids limit; auto detects the "
                          "version and falls back to rlimits and a memory watchdog where the "
                          "agent may not use cgroups (not root, no delegated subtree); off "
                          "always uses the fallback (default auto).")
    lim.add_argument("--lease-pids", type=int, default=1024, metavar="N",
                     help="Most processes plus threads one lease's worker may run; a fork "
                          "bomb stops there (default 1024).")
    env = p.add_argument_group("software environments")
    env.add_argument("--environment", choices=["build", "fixed"], default="build",
                     help="build: give each cluster its notebook's packages, installed with "
                          "uv from the package index into a cache on this machine (only what "
                          "differs from this agent's own environment); fixed: build nothing "
                          "and serve only clusters whose Python, dask and distributed match "
                          "this agent's (default build).")
    env.add_argument("--package-index", action="append", metavar="URL",
                     help="A package index builds may use; repeat for more, the first is the "
                          "main one (default: https://pypi.org/simple). Packages found on no "
                          "allowed index are refused, naming the package.")
    env.add_argument("--environment-cache", type=float, default=20.0, metavar="GIB",
                     help="Most disk the built environments may take, in GiB; the least "
                          "recently used go first, and an environment larger than this is "
                          "refused (default 20).")
    p.add_argument("--no-peer-connections", action="store_true",
                   help="This machine's workers accept no connections from other sites (a "
                        "lab behind NAT or a firewall): the broker keeps a cluster that uses "
                        "it within this site (default: they accept them).")
    p.add_argument("--print-systemd-unit", action="store_true",
                   help="Print a systemd unit that runs this agent as root with a delegated "
                        "cgroup subtree, with the options given here, and exit.")


def environments_from_args(args: argparse.Namespace, workdir: Path, name: str):
    """The agent's EnvironmentCache from the --environment options."""
    from .environment_cache import EnvironmentCache

    if args.environment_cache <= 0:
        raise ValueError("--environment-cache must be more than 0 GiB")
    return EnvironmentCache(workdir / "environments", mode=args.environment,
                            indexes=tuple(args.package_index or ()),
                            max_bytes=int(args.environment_cache * 2**30), where=name)


def policy_from_args(args: argparse.Namespace) -> OwnerPolicy:
    """The owner policy from --policy and the options; raises PolicyError."""
    offer = args.offer.split(",") if args.offer else None
    policy = load_policy(
        args.policy, offer=offer, schedule=args.schedule, timezone=args.timezone,
        idle_cpus=args.idle_cpus, idle_for=args.idle_for, busy_cpus=args.busy_cpus,
        suspend_after=args.suspend_after, resume_after=args.resume_after,
        preempt_after=args.preempt_after, vacate_time=args.vacate_time,
        owner_accounts=args.owner_accounts.split(",") if args.owner_accounts else None)
    try:
        parse_accounts(policy.owner_accounts)
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc
    return policy


def owner_meter(policy: OwnerPolicy, worker_uids: range | None,
                gpu_indices: list[int]) -> OwnerMeter:
    """The meter of the owner's activity the policy describes."""
    return OwnerMeter(parse_accounts(policy.owner_accounts),
                      parallex_uids=lambda: worker_uids or (), gpu_indices=gpu_indices)


def dry_run(policy: OwnerPolicy, meter: OwnerMeter, seconds: float = 1.0) -> str:
    """What the policy would do right now, measured over ``seconds``, and why."""
    meter.read()
    time.sleep(seconds)
    activity = meter.read()
    now = dt.datetime.now(dt.UTC)
    watch = OwnerWatch(policy)
    decision = watch.observe(now, activity)
    lines = [f"policy: offer {', '.join(policy.offer)}"]
    if policy.schedule:
        lines.append(f"schedule ({policy.timezone or 'local time'}): "
                     f"{'inside' if policy.in_schedule(now) else 'outside'} a window now "
                     f"({policy.local(now):%a %H:%M})")
    if policy.shares_with_owner:
        lines.append(f"owner: {activity.cpus:.2f} cores now (idle below {policy.idle_cpus:g}, "
                     f"busy above {policy.busy_cpus:g}); GPU processes: "
                     f"{activity.gpu_processes}")
        lines.append(f"when the owner is busy: suspend after {policy.suspend_after:g} s, "
                     f"resume after {policy.resume_after:g} s idle, preempt after "
                     f"{policy.preempt_after:g} s suspended, {policy.vacate_time:g} s to "
                     f"vacate")
    verdict = "OFFER capacity" if decision.offer else "WITHHOLD capacity"
    if decision.preempt:
        verdict += ", PREEMPT running leases"
    elif decision.suspend:
        verdict += ", SUSPEND running leases"
    lines.append(f"now: {verdict} — {decision.why}")
    return "\n".join(lines)


def systemd_unit(argv: list[str]) -> str:
    """A unit that runs `parallex provide` with ``argv`` (minus --print-systemd-unit) as
    root, with a delegated cgroup subtree for the leases' groups."""
    args = [a for a in argv if a != "--print-systemd-unit"]
    given = {a.split("=")[0] for a in args}
    if "--workdir" not in given:
        args += ["--workdir", "/var/lib/parallex/agent"]
    if not given & {"--token", "--token-file"}:
        args += ["--token-file", "/etc/parallex/provider-token"]
    command = " ".join(shlex.quote(a) for a in [f"{INSTALL_PREFIX}/venv/bin/parallex",
                                                 "provide", *args])
    return f"""\
# /etc/systemd/system/parallex-agent.service  (generated by parallex provide
# --print-systemd-unit). Install Parallex where the worker accounts can read it:
#   python3 -m venv {INSTALL_PREFIX}/venv && {INSTALL_PREFIX}/venv/bin/pip install parallex
# Put the provider token in /etc/parallex/provider-token (mode 0600, owner root), then:
#   systemctl daemon-reload && systemctl enable --now parallex-agent
[Unit]
Description=Parallex provider agent: offers this machine's idle capacity to the federation
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=root
ExecStart={command}
# The agent makes one cgroup per lease (CPU quota, memory maximum, pids limit, freezer)
# under its own: systemd must hand it that subtree.
Delegate=yes
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1
# The agent only opens outbound connections, and keeps nothing outside its work folder.
StateDirectory=parallex

[Install]
WantedBy=multi-user.target
"""


def print_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
