"""The owner policy's decisions over time (pure: readings and a clock passed in), its schedule
windows, its file and options, and `parallex provide --dry-run` / `--print-systemd-unit`."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest

from federation.owner_policy import (
    Activity,
    OwnerWatch,
    PolicyError,
    load_policy,
    parse_window,
)
from tests.utils.procs import parallex

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)  # a Monday


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_an_idle_policy_offers_after_the_idle_time_and_suspends_resumes_preempts():
    policy = load_policy(offer="idle", idle_for=60, suspend_after=2, resume_after=30,
                         preempt_after=100)
    watch = OwnerWatch(policy)
    assert not watch.observe(at(0), Activity(0.1)).offer
    assert not watch.observe(at(59), Activity(0.1)).offer
    offered = watch.observe(at(60), Activity(0.1))
    assert offered.offer and offered.action == "offer" and "idle for 60 s" in offered.why
    # The owner comes back: withheld at once, suspended after suspend_after.
    back = watch.observe(at(61), Activity(1.0))
    assert (back.offer, back.suspend) == (False, False)
    suspended = watch.observe(at(63), Activity(1.0))
    assert suspended.suspend and "1.00 cores" in suspended.why
    # Idle again, but not for resume_after yet: still suspended.
    assert watch.observe(at(70), Activity(0.0)).suspend
    assert watch.observe(at(99), Activity(0.0)).suspend
    resumed = watch.observe(at(100), Activity(0.0))
    assert not resumed.suspend and not resumed.preempt
    # Busy again, this time for good: preempted preempt_after after the suspension.
    watch.observe(at(200), Activity(2.0))
    assert watch.observe(at(202), Activity(2.0)).suspend
    assert watch.observe(at(301), Activity(2.0)).suspend
    gone = watch.observe(at(302), Activity(2.0))
    assert gone.preempt and gone.action == "preempt" and "preempt_after" in gone.why


def test_between_the_thresholds_leases_keep_running_but_nothing_new_is_offered():
    watch = OwnerWatch(load_policy(offer="idle", idle_for=0, idle_cpus=0.3, busy_cpus=0.8,
                                   suspend_after=0))
    assert watch.observe(at(0), Activity(0.1)).offer
    middle = watch.observe(at(1), Activity(0.5))
    assert (middle.offer, middle.suspend, middle.preempt) == (False, False, False)


def test_a_gpu_process_of_the_owner_counts_as_activity():
    watch = OwnerWatch(load_policy(offer="idle", idle_for=0, suspend_after=0))
    assert watch.observe(at(0), Activity(0.0)).offer
    busy = watch.observe(at(1), Activity(0.0, gpu_processes=1))
    assert busy.suspend and "1 GPU process" in busy.why


def test_always_never_suspends():
    watch = OwnerWatch(load_policy())
    decision = watch.observe(at(0), Activity(16.0))
    assert decision.offer and not decision.suspend and not decision.preempt


@pytest.mark.parametrize(("window", "when", "inside"), [
    ("mon-fri 19:00-07:00", dt.datetime(2026, 11, 30, 20, 0), True),   # Monday evening
    ("mon-fri 19:00-07:00", dt.datetime(2026, 12, 1, 6, 59), True),    # Tuesday morning
    ("mon-fri 19:00-07:00", dt.datetime(2026, 12, 1, 7, 0), False),
    ("mon-fri 19:00-07:00", dt.datetime(2026, 11, 30, 12, 0), False),  # Monday noon
    ("mon-fri 19:00-07:00", dt.datetime(2026, 12, 5, 6, 0), True),     # Saturday 6:00
    ("mon-fri 19:00-07:00", dt.datetime(2026, 12, 6, 6, 0), False),    # Sunday 6:00
    ("sat,sun 00:00-24:00", dt.datetime(2026, 12, 6, 23, 59), True),
    ("sat,sun 00:00-24:00", dt.datetime(2026, 12, 7, 0, 1), False),    # Monday
    ("fri-mon 09:00-17:00", dt.datetime(2026, 11, 30, 10, 0), True),   # wraps the week
    ("fri-mon 09:00-17:00", dt.datetime(2026, 12, 1, 10, 0), False),
])
def test_schedule_windows(window, when, inside):
    assert parse_window(window).contains(when) is inside


def test_idle_within_the_schedule_preempts_when_the_window_closes():
    policy = load_policy(offer=["idle", "schedule"], schedule=["mon-fri 19:00-07:00"],
                         timezone="UTC", idle_for=0)
    watch = OwnerWatch(policy)
    evening = dt.datetime(2026, 11, 30, 20, 0, tzinfo=dt.UTC)
    assert watch.observe(evening, Activity(0.0)).offer
    morning = dt.datetime(2026, 12, 1, 7, 0, tzinfo=dt.UTC)
    closed = watch.observe(morning, Activity(0.0))
    assert closed.preempt and not closed.offer and "outside the schedule" in closed.why


@pytest.mark.parametrize(("settings", "message"), [
    ({"offer": "sometimes"}, "offer must be always, idle, schedule"),
    ({"offer": ["always", "idle"]}, "offer must be"),
    ({"offer": "schedule"}, "needs schedule windows"),
    ({"schedule": ["weekdays 9-5"]}, "is not like 'mon-fri 19:00-07:00'"),
    ({"schedule": ["mon-fri 25:00-07:00"]}, "is not a time of day"),
    ({"idle_for": -1}, "idle_for must be a number ≥ 0"),
    ({"busy_cpus": 0.1, "idle_cpus": 0.3}, "must not be below idle_cpus"),
    ({"timezone": "Mars/Olympus"}, "is not a known time zone"),
    ({"suspend_afterr": 3}, "unknown policy setting(s) suspend_afterr"),
])
def test_bad_policies_are_refused_with_what_to_change(settings, message):
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_policy(**settings)


def test_a_policy_file_and_options_over_it(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("offer: idle\nidle_for: 120\nsuspend_after: 0\n")
    policy = load_policy(path, idle_for=5)
    assert policy.offer == ("idle",) and policy.idle_for == 5 and policy.suspend_after == 0
    path.write_text("- not a mapping\n")
    with pytest.raises(PolicyError, match="must be a mapping"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_dry_run_prints_what_the_policy_would_do_now(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("offer: idle\nbusy_cpus: 64\nidle_cpus: 64\nidle_for: 0\n")
    done = subprocess.run(parallex("provide", "--policy", str(path), "--dry-run"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "policy: offer idle" in done.stdout
    assert "now: OFFER capacity" in done.stdout and "cores now" in done.stdout
    bad = subprocess.run(parallex("provide", "--offer", "schedule", "--dry-run"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs schedule windows" in bad.stderr
    assert "Traceback" not in bad.stderr
    pids = subprocess.run(parallex("provide", "--lease-pids", "3", "--dry-run"),
                          capture_output=True, text=True, timeout=60)
    assert pids.returncode == 2 and "--lease-pids must be 16 to 1000000, not 3" in pids.stderr
    unknown = subprocess.run(parallex("provide", "--owner-accounts", "nobody-here-xyz",
                                      "--dry-run"), capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
    assert "owner account 'nobody-here-xyz' does not exist" in unknown.stderr


def test_worker_news_groups_what_the_user_should_read():
    from federation.lease_keeper import worker_news

    leases = [
        {"state": "ended", "end_reason": "preempted", "message": "owner activity on box-3"},
        {"state": "releasing", "release_reason": "preempted", "end_reason": None,
         "message": "owner activity on box-3"},
        {"state": "suspended", "end_reason": None, "message": "owner activity on box-4"},
        {"state": "ended", "end_reason": "failed", "message": "worker ls-1 used 2.3 GiB of "
                                                             "its 2 GiB"},
        {"state": "ended", "end_reason": "released", "message": ""},
        {"state": "running", "end_reason": None, "message": ""},
    ]
    assert worker_news(leases) == [
        "1 worker failed: worker ls-1 used 2.3 GiB of its 2 GiB",
        "2 workers preempted: owner activity on box-3",
        "1 worker suspended: owner activity on box-4"]


def test_print_systemd_unit_runs_the_agent_as_root_with_a_delegated_cgroup():
    done = subprocess.run(parallex("provide", "--broker", "https://broker.example",
                                   "--worker-uids", "20000-20063", "--print-systemd-unit"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = done.stdout
    assert "Delegate=yes" in unit and "User=root" in unit
    assert ("ExecStart=/opt/parallex/venv/bin/parallex provide --broker "
            "https://broker.example --worker-uids 20000-20063 --workdir "
            "/var/lib/parallex/agent --token-file /etc/parallex/provider-token") in unit


def test_the_shipped_agent_unit_is_what_the_agent_generates():
    """deploy/systemd/parallex-agent.service stays the generator's output (plus its note)."""
    shipped = (Path(__file__).resolve().parents[2] / "deploy" / "systemd"
               / "parallex-agent.service").read_text()
    done = subprocess.run(parallex("provide", "--broker",
                                   "https://hub.example.edu/services/parallex",
                                   "--worker-uids", "20000-20063", "--print-systemd-unit"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert shipped.startswith(done.stdout)
