"""The machine owner's policy: when a provider offers its capacity, and what happens to running
leases when the owner comes back (suspend, resume, preempt).

HTCondor's desktop policy is the model (START when the keyboard has been idle 15 min and the
load is low; SUSPEND when the CPU is busy; CONTINUE when idle again; PREEMPT when suspended too
long). Here the owner's activity is the CPU their own processes use (and, on GPU machines, any
process of theirs on a GPU); a lab server has no keyboard. Pure: no clock and no I/O of its own,
so the agent, ``parallex provide --policy FILE --dry-run`` and the tests share one decision.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

OFFER_MODES = ("always", "idle", "schedule")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(?P<days>[a-z]{3}(?:-[a-z]{3})?(?:,[a-z]{3}(?:-[a-z]{3})?)*)\s+"
                     r"(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


class PolicyError(ValueError):
    """A policy file or option that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Window:
    """Days of the week and a time span, e.g. mon-fri 19:00-07:00 (ends the next morning)."""

    days: frozenset[int]  # 0 = Monday
    start: dt.time
    end: dt.time  # 24:00 is written as 00:00 of the next day

    def contains(self, when: dt.datetime) -> bool:
        minute = when.hour * 60 + when.minute
        start = self.start.hour * 60 + self.start.minute
        end = self.end.hour * 60 + self.end.minute
        if start < end:
            return when.weekday() in self.days and start <= minute < end
        # Across midnight (or all day when start == end): from start on a listed day, or
        # before end on the morning after one.
        return ((when.weekday() in self.days and minute >= start)
                or ((when.weekday() - 1) % 7 in self.days and minute < end))


def parse_window(text: str) -> Window:
    """'mon-fri 19:00-07:00', 'sat,sun 00:00-24:00' → Window; raises PolicyError."""
    found = _WINDOW.match(str(text).lower())
    if not found:
        raise PolicyError(f"schedule window {text!r} is not like 'mon-fri 19:00-07:00' or "
                          "'sat,sun 00:00-24:00'")
    days: set[int] = set()
    for part in found["days"].split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise PolicyError(f"schedule window {text!r}: days are {', '.join(DAYS)}")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])

    def clock(value: str) -> dt.time:
        hour, minute = (int(x) for x in value.split(":"))
        if hour == 24 and minute == 0:
            return dt.time(0, 0)
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise PolicyError(f"schedule window {text!r}: {value} is not a time of day")
        return dt.time(hour, minute)

    return Window(frozenset(days), clock(found["start"]), clock(found["end"]))


@dataclass(frozen=True)
class OwnerPolicy:
    """When to offer the machine and how to make way for its owner (times in seconds, CPU in
    cores of the owner's own processes)."""

    #: always; idle (the owner's CPU use below ``idle_cpus`` for ``idle_for``); schedule
    #: (inside ``schedule``); idle and schedule together: idle within the schedule.
    offer: tuple[str, ...] = ("always",)
    #: The owner's CPU use (cores) below which the machine counts as idle. HTCondor: load 0.3.
    idle_cpus: float = 0.3
    #: Seconds the owner must have been idle before capacity is offered. HTCondor: 15 min.
    idle_for: float = 900.0
    #: The owner's CPU use (cores) above which the owner is back and leases make way.
    busy_cpus: float = 0.5
    #: Seconds the owner must have been busy before the leases are suspended (0: at once).
    #: HTCondor suspends after 2 min of busy CPU; we default to 10 s: an owner should not wait.
    suspend_after: float = 10.0
    #: Seconds the owner must have been idle again before suspended leases resume. HTCondor: 5 min.
    resume_after: float = 300.0
    #: Seconds a lease stays suspended before it is preempted (its worker retired through its
    #: scheduler, the lease ended "preempted"). HTCondor: 10 min.
    preempt_after: float = 600.0
    #: Seconds a preempted worker gets to hand its data to other workers before it is killed
    #: (HTCondor's MachineMaxVacateTime, 10 min there; data moves in seconds here). Keep it
    #: below the broker's release_timeout (60 s by default), after which the lease ends lost.
    vacate_time: float = 30.0
    #: Windows in which capacity may be offered (with offer: schedule), in ``timezone``.
    schedule: tuple[Window, ...] = ()
    #: The machine's time zone for the schedule (default: the machine's local time).
    timezone: str | None = None
    #: Whose processes are the owner's: account names or uids ("alice", "1000-1999"). Empty:
    #: every process that is not Parallex's (the agent, its workers, their accounts).
    owner_accounts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [m for m in self.offer if m not in OFFER_MODES]
        if bad or not self.offer or ("always" in self.offer and len(self.offer) > 1):
            raise PolicyError(f"offer must be always, idle, schedule or [idle, schedule], not "
                              f"{list(self.offer)}")
        if "schedule" in self.offer and not self.schedule:
            raise PolicyError("offer: schedule needs schedule windows, e.g. "
                              "['mon-fri 19:00-07:00', 'sat,sun 00:00-24:00']")
        for name in ("idle_cpus", "idle_for", "busy_cpus", "suspend_after", "resume_after",
                     "preempt_after", "vacate_time"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0 or value != value:
                raise PolicyError(f"{name} must be a number ≥ 0, not {value!r}")
        if self.busy_cpus < self.idle_cpus:
            raise PolicyError(f"busy_cpus ({self.busy_cpus:g} cores) must not be below "
                              f"idle_cpus ({self.idle_cpus:g} cores)")
        if self.timezone:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise PolicyError(f"timezone {self.timezone!r} is not a known time zone such "
                                  "as Europe/Zurich") from exc

    @property
    def shares_with_owner(self) -> bool:
        """True when the owner works on this machine too (leases make way for them)."""
        return "idle" in self.offer

    def local(self, now: dt.datetime) -> dt.datetime:
        return now.astimezone(ZoneInfo(self.timezone) if self.timezone else None)

    def in_schedule(self, now: dt.datetime) -> bool:
        when = self.local(now)
        return any(w.contains(when) for w in self.schedule)


def load_policy(path: str | Path | None = None, **overrides) -> OwnerPolicy:
    """The policy from a YAML file (keys as OwnerPolicy's fields), with ``overrides`` (not
    None) on top; raises PolicyError with what is wrong."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise PolicyError(f"policy file {path} must be a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(OwnerPolicy)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"unknown policy setting(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")
    offer = data.get("offer", "always")
    data["offer"] = tuple([offer] if isinstance(offer, str) else offer)
    data["schedule"] = tuple(parse_window(w) for w in data.get("schedule") or ())
    data["owner_accounts"] = tuple(str(a) for a in data.get("owner_accounts") or ())
    try:
        return OwnerPolicy(**data)
    except TypeError as exc:
        raise PolicyError(f"policy: {exc}") from exc


@dataclass(frozen=True)
class Activity:
    """One reading of the owner's activity."""

    cpus: float  # cores the owner's processes used since the last reading
    gpu_processes: int = 0  # the owner's processes on GPUs this machine offers


@dataclass(frozen=True)
class Decision:
    """What the agent should do now, and why (said to the lab administrator and the user)."""

    offer: bool
    suspend: bool
    preempt: bool
    why: str

    @property
    def action(self) -> str:
        """One word: preempt, suspend, offer or withhold."""
        return ("preempt" if self.preempt else "suspend" if self.suspend
                else "offer" if self.offer else "withhold")


@dataclass
class OwnerWatch:
    """Follows the owner's activity over time and applies the policy to it."""

    policy: OwnerPolicy
    busy_since: dt.datetime | None = None
    idle_since: dt.datetime | None = None
    suspended_since: dt.datetime | None = None
    history: list[str] = field(default_factory=list)

    def observe(self, now: dt.datetime, activity: Activity) -> Decision:
        """Take one reading at ``now``; the decision for this moment."""
        p = self.policy
        busy = activity.cpus > p.busy_cpus or activity.gpu_processes > 0
        idle = activity.cpus < p.idle_cpus and activity.gpu_processes == 0
        if busy:
            self.busy_since = self.busy_since or now
        else:
            self.busy_since = None
        if idle:
            self.idle_since = self.idle_since or now
        else:
            self.idle_since = None
        what = (f"the owner uses {activity.cpus:.2f} cores"
                + (f" and {activity.gpu_processes} GPU process(es)"
                   if activity.gpu_processes else ""))
        idle_for = (now - self.idle_since).total_seconds() if self.idle_since else 0.0
        busy_for = (now - self.busy_since).total_seconds() if self.busy_since else 0.0

        if "schedule" in p.offer and not p.in_schedule(now):
            # Outside the owner's windows the machine is theirs: leases go now.
            self.suspended_since = None
            return Decision(False, False, True,
                            f"outside the schedule ({p.local(now):%a %H:%M})")
        if not p.shares_with_owner:
            return Decision(True, False, False, "always offered" if "always" in p.offer
                            else f"inside the schedule ({p.local(now):%a %H:%M})")

        if self.suspended_since is None and busy and busy_for >= p.suspend_after:
            self.suspended_since = now
        if self.suspended_since is not None:
            suspended_for = (now - self.suspended_since).total_seconds()
            if idle and idle_for >= p.resume_after:
                self.suspended_since = None
            elif suspended_for >= p.preempt_after:
                self.suspended_since = None
                return Decision(False, False, True,
                                f"{what}; suspended {suspended_for:.0f} s ≥ preempt_after "
                                f"{p.preempt_after:g} s")
            else:
                return Decision(False, True, False,
                                f"{what}; suspended until idle for {p.resume_after:g} s "
                                f"(preempted after {p.preempt_after:g} s)")
        offered = idle and idle_for >= p.idle_for
        if offered:
            return Decision(True, False, False, f"{what}, idle for {idle_for:.0f} s ≥ "
                                                f"{p.idle_for:g} s")
        if busy:
            return Decision(False, False, False,
                            f"{what} (> {p.busy_cpus:g}); leases suspend after "
                            f"{p.suspend_after:g} s of this")
        # Neither offered (not idle long enough) nor busy enough to suspend: leases keep
        # running, nothing new is placed.
        return Decision(False, False, False,
                        f"{what}; offered once below {p.idle_cpus:g} cores for "
                        f"{p.idle_for:g} s (idle {idle_for:.0f} s so far)")
