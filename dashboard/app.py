"""The dashboard views: one Panel page per viewer, built from ``reports``.

An administrator gets every lab (overview, usage, credit flows, live leases, machines, waits);
a PI their own lab (contribution against consumption, outlook, members, machines, fair-share
position); a member their own usage and clusters. Every table has a CSV download; the period,
institution and lab filters re-run the queries.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Callable

import holoviews as hv
import hvplot.pandas  # noqa: F401  (registers DataFrame.hvplot)
import pandas as pd
import panel as pn
from sqlmodel import Session

from accounting.fairshare import DEFAULT_HALF_LIFE
from federation.broker.access import Scope

from . import reports

Sessions = Callable[[], Session]
DEFAULT_DAYS = 30


def table(df: pd.DataFrame, name: str, title: str) -> pn.Column:
    """A table with a CSV download of exactly what it shows."""
    shown = df.copy()
    for c in shown.select_dtypes("float").columns:
        shown[c] = shown[c].round(4)
    download = pn.widgets.FileDownload(
        callback=lambda: io.StringIO(df.to_csv(index=False)), filename=f"{name}.csv",
        label=f"CSV: {name}.csv", button_type="light", css_classes=["px-csv"])
    body = (pn.widgets.Tabulator(shown, show_index=False, disabled=True, pagination="local",
                                 page_size=12, sizing_mode="stretch_width", name=name)
            if len(shown) else pn.pane.Markdown("_Nothing in this period._"))
    return pn.Column(f"### {title}", body, download, css_classes=[f"px-table-{name}"],
                     sizing_mode="stretch_width")


def plot(df: pd.DataFrame, kind: str, title: str, **kw) -> pn.viewable.Viewable:
    if df.empty:
        return pn.pane.Markdown(f"### {title}\n_Nothing in this period._")
    x = kw.get("x")
    if x == "day":
        # Bars want categories, lines want times; rollups hold plain dates.
        df = df.assign(day=df["day"].astype(str) if kind == "bar"
                       else pd.to_datetime(df["day"]))
    figure = getattr(df.hvplot, kind)(title=title, height=300, responsive=True, **kw)
    return pn.pane.HoloViews(figure, sizing_mode="stretch_width")


class Dashboard:
    """The page of one viewer; ``panel()`` is what the server shows."""

    def __init__(self, sessions: Sessions, viewer: Scope,
                 fair_share_half_life: float = DEFAULT_HALF_LIFE, today: dt.date | None = None):
        self.sessions, self.viewer = sessions, viewer
        self.half_life = fair_share_half_life
        today = today or reports.utcnow().date()
        self.period = pn.widgets.DateRangePicker(
            name="Period (UTC days)", value=(today - dt.timedelta(days=DEFAULT_DAYS - 1), today))
        with sessions() as s:
            self.lab_ids = reports.lab_choices(s, viewer)
            self.institution_ids = reports.institution_choices(s)
        self.labs = pn.widgets.MultiChoice(name="Labs (all when empty)",
                                           options=sorted(self.lab_ids))
        self.institutions = pn.widgets.MultiChoice(name="Institutions (all when empty)",
                                                   options=sorted(self.institution_ids))

    def filters(self, period, labs, institutions) -> reports.Filters:
        since, until = period
        return reports.Filters(since, until + dt.timedelta(days=1),
                               lab_ids=tuple(self.lab_ids[name] for name in labs),
                               institution_ids=tuple(self.institution_ids[n]
                                                     for n in institutions))

    def _bound(self, view: Callable[[reports.Filters], pn.viewable.Viewable]):
        def render(period, labs, institutions):
            return view(self.filters(period, labs, institutions))

        return pn.bind(render, self.period, self.labs, self.institutions)

    # ---- administrator -----------------------------------------------------------------

    def admin_overview(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            saved = reports.savings(s, self.viewer, f)
            balances = reports.balances(s, self.viewer)
            daily = reports.usage_over_time(s, self.viewer, f)
            cap = reports.capacity(s, self.viewer, f)
        warn = balances[balances.status != "ok"]
        summary = pn.pane.Markdown(
            f"**{saved['pcu']:,.2f} PCU** used in the period; the same resources on demand "
            f"in a public cloud: **about ${saved['cloud_cost']:,.2f}**. "
            f"Labs needing attention: **{len(warn)}**.", css_classes=["px-summary"])
        capacity = cap.groupby("at", as_index=False)[
            ["cpus_online", "cpus_leased", "cpus_idle", "gpus_online", "gpus_leased"]].sum()
        return pn.Column(
            summary,
            plot(daily, "bar", "PCU per day by lab", x="day", y="pcu", by="lab", stacked=True),
            plot(capacity, "line", "Pool capacity: CPUs and GPUs online, leased and idle",
                 x="at", y=["cpus_online", "cpus_leased", "cpus_idle", "gpus_online",
                            "gpus_leased"]),
            plot(cap, "area", "CPUs online by lab", x="at", y="cpus_online", by="lab",
                 stacked=True),
            table(balances, "balances", "Balances and credit limits"),
            sizing_mode="stretch_width")

    def usage_tables(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            parts = [table(reports.usage_by(s, self.viewer, f, by), f"usage_by_{by}",
                           f"Usage by {label}")
                     for by, label in (("institution", "institution"), ("lab", "lab"),
                                       ("user", "user"), ("gpu_class", "GPU model class"))]
        return pn.Column(*parts, sizing_mode="stretch_width")

    def flows(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            df = reports.credit_flows(s, self.viewer, f)
        heat = (pn.pane.HoloViews(hv.HeatMap(df, ["to_lab", "from_lab"], "pcu").opts(
            title="PCU from consuming lab (rows) to providing lab (columns)", colorbar=True,
            tools=["hover"], height=350, responsive=True), sizing_mode="stretch_width")
                if len(df) else pn.pane.Markdown("_No credits moved in this period._"))
        return pn.Column(heat, table(df, "credit_flows", "Credit flows"),
                         sizing_mode="stretch_width")

    def live(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            return pn.Column(table(reports.live_leases(s, self.viewer), "live_leases",
                                   "Live and waiting leases"),
                             table(reports.wait_times(s, self.viewer, f), "wait_times",
                                   "Lease wait times (request → worker started)"),
                             sizing_mode="stretch_width")

    def machines(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            return pn.Column(table(reports.provider_reliability(s, self.viewer),
                                   "machines", "Machines and their reliability"),
                             sizing_mode="stretch_width")

    # ---- PI ----------------------------------------------------------------------------

    def pi_lab(self, f: reports.Filters) -> pn.Column:
        lab_id = self.viewer.lab_id
        with self.sessions() as s:
            daily = reports.contribution_vs_consumption(s, lab_id, f)
            outlook = reports.balance_outlook(s, lab_id)
            by_machine = reports.served_by_machines(s, lab_id, f)
        heading = (f"Balance **{outlook['balance']:,.2f} PCU** (credit limit "
                   f"{outlook['credit_limit']:,.2f}); over the last 7 days the lab "
                   f"{'gained' if outlook['net_pcu_per_day'] >= 0 else 'spent'} "
                   f"**{abs(outlook['net_pcu_per_day']):,.2f} PCU a day** net")
        if outlook["days_until_limit"] is not None:
            heading += (f"; at that rate it reaches its credit limit in "
                        f"**{outlook['days_until_limit']:,.1f} days**")
        return pn.Column(
            pn.pane.Markdown(heading + ".", css_classes=["px-outlook"]),
            plot(daily.melt(id_vars="day", var_name="kind", value_name="pcu"), "bar",
                 "Contribution (earned) against consumption (charged) per day", x="day",
                 y="pcu", by="kind"),
            table(daily, "contribution", "Per day"),
            table(by_machine, "usage_by_machine",
                  "What each of the lab's machines served (all users)"),
            sizing_mode="stretch_width")

    def pi_members(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            return pn.Column(table(reports.usage_by(s, self.viewer, f, "user"),
                                   "usage_by_user", "Members' usage"),
                             table(reports.live_leases(s, self.viewer), "live_leases",
                                   "Members' live and waiting leases"),
                             sizing_mode="stretch_width")

    def pi_fair_share(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            df = reports.fair_share_position(s, self.viewer.lab_id, self.half_life,
                                             reveal_names=self.viewer.is_admin)
        me = df[df.you].iloc[0]
        text = (f"When capacity is short, waiting workers are served lab by lab in order of "
                f"share ÷ recent usage. **{self.viewer.lab_name}** is **#{me.served}** of "
                f"{len(df)} (share {me.share:g}, recent use {me.recent_pcu:,.2f} PCU, "
                f"{me.waiting_workers} workers waiting).")
        return pn.Column(pn.pane.Markdown(text, css_classes=["px-fairshare"]),
                         table(df.drop(columns="you"), "fair_share", "Fair-share order"),
                         sizing_mode="stretch_width")

    # ---- member ------------------------------------------------------------------------

    def member_usage(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            daily = reports.usage_over_time(s, self.viewer, f)
            totals = reports.savings(s, self.viewer, f)
            balances = reports.balances(s, self.viewer)
        lab = balances.iloc[0] if len(balances) else None
        text = (f"You used **{totals['pcu']:,.2f} PCU** in the period (about "
                f"${totals['cloud_cost']:,.2f} in a public cloud)."
                + (f" Your lab **{lab['lab']}** has **{lab['balance']:,.2f} PCU**."
                   if lab is not None else ""))
        return pn.Column(pn.pane.Markdown(text, css_classes=["px-mine"]),
                         plot(daily, "bar", "My PCU per day", x="day", y="pcu"),
                         table(daily, "my_usage", "My usage per day"),
                         sizing_mode="stretch_width")

    def member_clusters(self, f: reports.Filters) -> pn.Column:
        with self.sessions() as s:
            return pn.Column(table(reports.my_clusters(s, self.viewer, f), "my_clusters",
                                   "My clusters"),
                             table(reports.live_leases(s, self.viewer), "live_leases",
                                   "My live and waiting leases"),
                             sizing_mode="stretch_width")

    # ---- the page ------------------------------------------------------------------------

    def tabs(self) -> list[tuple[str, Callable]]:
        if self.viewer.is_admin:
            return [("Overview", self.admin_overview), ("Usage", self.usage_tables),
                    ("Credit flows", self.flows), ("Live", self.live),
                    ("Machines", self.machines)]
        if self.viewer.role == "pi":
            return [("My lab", self.pi_lab), ("Members", self.pi_members),
                    ("Machines", self.machines), ("Why are we waiting?", self.pi_fair_share)]
        return [("My usage", self.member_usage), ("My clusters", self.member_clusters)]

    def panel(self) -> pn.viewable.Viewable:
        who = {"admin": "administrator", "pi": f"PI of {self.viewer.lab_name}",
               "member": f"member of {self.viewer.lab_name}"}[self.viewer.role]
        controls = [self.period] + ([self.institutions, self.labs]
                                    if self.viewer.is_admin else [])
        return pn.Column(
            pn.pane.Markdown(f"## Parallex — {self.viewer.name} ({who})",
                             css_classes=["px-whoami"]),
            pn.Row(*controls),
            pn.Tabs(*[(title, self._bound(view)) for title, view in self.tabs()],
                    dynamic=True),
            sizing_mode="stretch_width")
