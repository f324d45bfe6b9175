"""The dashboards in real headless Chromium (Debian's chromium driven by Playwright): an
administrator, a PI and a student log in through the hub and each sees their own view and
none of what they must not; the filters change the figures. PARALLEX_SCREENSHOTS=1 saves
each view under docs/screenshots/."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path

import pytest
from sqlmodel import select

from accounting.cloud import load_cloud_prices
from accounting.metering import LeaseUsage, meter
from accounting.models import Lab, User, utcnow
from accounting.pricing import GiB, Resources
from federation.broker import db
from tests.utils.browser import chromium
from tests.utils.hub import start_hub
from tests.utils.procs import wait_until

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def hub_with_usage(tmp_path_factory):
    hub = start_hub(tmp_path_factory.mktemp("dash"))
    try:
        for inst, user, password in [("north", "alice", "alice-pw"), ("south", "alice",
                                     "alice-pw"), ("north", "petra", "petra-pw"),
                                     ("south", "root", "root-pw")]:
            assert hub.login(inst, user, password).status_code == 200
        # Two days ago: alice@north used South's machine (4 CPUs, 8 GiB, 2 h), alice@south
        # used North's (2 CPUs, 4 GiB, one A100, 1 h). Metered by the real metering code.
        engine = db.make_engine(f"sqlite:///{hub.tmp / 'broker.db'}")
        with db.session(engine) as s:
            labs = {lab.name: lab.id for lab in s.exec(select(Lab))}
            users = {u.name: u for u in s.exec(select(User))}
            start = utcnow().replace(hour=8, minute=0, second=0,
                                     microsecond=0) - dt.timedelta(days=2)
            meter(s, [
                LeaseUsage("ls-dash-1", users["alice@north"].id, labs["north-physics"],
                           labs["south-chemistry"], "m-south", start,
                           start + dt.timedelta(hours=2), Resources(4, 8 * GiB)),
                LeaseUsage("ls-dash-2", users["alice@south"].id, labs["south-chemistry"],
                           labs["north-physics"], "m-north", start,
                           start + dt.timedelta(hours=1), Resources(2, 4 * GiB, 1, "A100")),
            ], now=utcnow(), interval=3600, cloud=load_cloud_prices())
            s.commit()
        engine.dispose()
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


@contextlib.contextmanager
def dashboard_as(browser, hub, institution: str, user: str, password: str):
    """A fresh browser session: hub login through the institution, then the dashboard page;
    the session is closed on exit."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.goto(f"{hub.url}/hub/login?institution={institution}"
                  "&next=/services/parallex-dashboard/")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_selector(".px-whoami", timeout=60_000)
        yield page
    finally:
        context.close()


# Panel renders into shadow roots, which innerText does not enter; this walks them.
_ALL_TEXT = """(root) => {
  const parts = [];
  const walk = (node) => {
    if (node.nodeType === Node.TEXT_NODE && node.parentElement
        && !['STYLE', 'SCRIPT'].includes(node.parentElement.tagName)) parts.push(node.textContent);
    if (node.shadowRoot) walk(node.shadowRoot);
    node.childNodes.forEach(walk);
  };
  walk(root || document.body);
  return parts.join(' ');
}"""


def text(page, selector: str | None = None) -> str:
    """The visible words of the page (or of ``selector``), single-spaced."""
    raw = (page.locator(selector).first.evaluate(_ALL_TEXT) if selector
           else page.evaluate(_ALL_TEXT))
    return " ".join(raw.split())


def shoot(page, name: str, tmp: Path) -> None:
    target = SCREENSHOTS if os.environ.get("PARALLEX_SCREENSHOTS") else tmp
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / f"{name}.png"), full_page=True)


def wait_for_text(page, needle: str, timeout: float = 30_000) -> None:
    page.wait_for_function(f"() => ({_ALL_TEXT})(null).includes({needle!r})", timeout=timeout)


def tab(page, title: str, shows: str) -> str:
    """Open a tab and wait until its content (rendered by the server on demand) shows."""
    page.locator(".bk-tab", has_text=title).first.click()
    wait_for_text(page, shows)
    return text(page)


def test_admin_sees_every_lab_and_filters_change_the_figures(hub_with_usage, browser,
                                                              tmp_path):
    with dashboard_as(browser, hub_with_usage, "south", "root", "root-pw") as page:
        body = text(page)
        assert "root@south (administrator)" in body
        page.wait_for_selector(".px-summary")
        summary = text(page, ".px-summary")
        # 9.6 PCU (alice@north) + 1 h of 2 CPUs + 4 GiB + an A100 (2 + 0.4 + 8 = 10.4 PCU)
        assert "20.00 PCU used" in summary, summary
        assert "about $0.00" not in summary  # the cloud equivalent is shown
        assert "north-physics" in body and "south-chemistry" in body
        shoot(page, "admin-overview", tmp_path)

        usage = tab(page, "Usage", "Usage by user")
        assert "alice@north" in usage and "alice@south" in usage and "a100" in usage

        # Filter to one institution: the figures change to that institution's labs only.
        page.locator(".choices").first.click()  # institutions come before labs
        page.keyboard.type("South Institute")
        page.keyboard.press("Enter")
        users = ".px-table-usage_by_user"

        def followed() -> str | None:
            shown = text(page, users)
            return shown if "alice@north" not in shown else None

        filtered = wait_until(followed, 30, "the user table to follow the filter")
        assert "alice@south" in filtered and "alice@north" not in filtered, filtered
        flows = tab(page, "Credit flows", "credit_flows.csv")
        assert "south-chemistry" in flows
        shoot(page, "admin-credit-flows", tmp_path)


def test_pi_sees_their_lab_only(hub_with_usage, browser, tmp_path):
    with dashboard_as(browser, hub_with_usage, "north", "petra", "petra-pw") as page:
        body = text(page)
        assert "petra@north (PI of north-physics)" in body
        assert "Credit flows" not in body  # no federation-wide views
        page.wait_for_selector(".px-outlook")
        shoot(page, "pi-lab", tmp_path)
        members = tab(page, "Members", "Members' usage")
        assert "alice@north" in members and "alice@south" not in members
        waiting = tab(page, "Why are we waiting?", "Fair-share order")
        assert "north-physics is #" in waiting
        shoot(page, "pi-fair-share", tmp_path)


def test_student_sees_their_own_usage(hub_with_usage, browser, tmp_path):
    with dashboard_as(browser, hub_with_usage, "north", "alice", "alice-pw") as page:
        page.wait_for_selector(".px-mine")
        body = text(page)
        assert "alice@north (member of north-physics)" in body
        assert "You used 9.60 PCU" in text(page, ".px-mine")
        assert "alice@south" not in body and "south-chemistry" not in body
        assert "Members" not in body and "Credit flows" not in body
        shoot(page, "student", tmp_path)
