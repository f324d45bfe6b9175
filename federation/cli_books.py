"""`parallex credits`, `ledger`, `usage` and `lab`: a lab's books from the command line.

Readable tables by default; --json prints the broker's answer for scripts.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
from decimal import Decimal

from . import errors
from .client import BrokerClient
from .sizes import parse_memory


def client_from(args: argparse.Namespace, *token_vars: str) -> BrokerClient:
    """A client for --broker/--token, else PARALLEX_BROKER_URL and the first token variable
    of ``token_vars`` that is set."""
    token = args.token or next((os.environ[v] for v in token_vars if os.environ.get(v)), "")
    return BrokerClient(args.broker or os.environ.get("PARALLEX_BROKER_URL", ""), token)


def _fetch(args: argparse.Namespace, path: str, params: dict | None = None,
           lab_path: bool = False) -> dict:
    """GET ``path`` as the user (PARALLEX_TOKEN first); with ``lab_path``, ``{lab}`` in the
    path is --lab or the token's own lab."""
    client = client_from(args, "PARALLEX_TOKEN", "PARALLEX_ADMIN_TOKEN")
    try:
        if lab_path:
            path = path.format(lab=args.lab or _own_lab(client))
        return client.request("GET", path, params=params)
    finally:
        client.close()


def _own_lab(client: BrokerClient) -> str:
    me = client.request("GET", "/whoami")
    if not me.get("lab"):
        raise errors.RequestRejected("this token belongs to no lab; pass --lab")
    return me["lab"]


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _pcu(text: str) -> str:
    return f"{Decimal(text):,.4f}"


def cmd_credits(args: argparse.Namespace) -> int:
    answer = _fetch(args, "/labs/{lab}/balance", lab_path=True)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        limit = Decimal(answer.get("credit_limit", "0"))
        note = (f" (may go down to -{limit:,.2f} before new workers are refused)" if limit
                else " (new workers are refused below 0)")
        print(f"{answer['lab']}: {_pcu(answer['balance'])} PCU{note}")
    return 0


def _what(entry: dict) -> str:
    """One line on what a ledger entry paid for."""
    u = entry.get("usage")
    if not u:
        return entry["memo"]
    size = f"{u['cpus']:g} CPU" + (f" {u['gpus']} GPU" if u["gpus"] else "")
    text = (f"{u['user']}: {size}, {u['seconds']:g} s on {u['provider']} "
            f"({u['provider_lab']}) at {u['pcu_per_hour']:g} PCU/h")
    if u["side"] == "earned":
        text = f"served {u['consumer_lab']}: {size}, {u['seconds']:g} s on {u['provider']}, " \
               f"reliability {u['reliability']:.3f}"
    return text


def cmd_ledger(args: argparse.Namespace) -> int:
    if args.explain is not None:
        answer = _fetch(args, f"/transfers/{args.explain}")
        if args.json:
            print(json.dumps(answer, indent=2, default=str))
            return 0
        print(f"Transfer {answer['transfer_id']} ({answer['kind']}, "
              f"{str(answer['time'])[:19].replace('T', ' ')} UTC)")
        for line in answer["explanation"]:
            print(f"  {line}")
        rows = [["account", "PCU"]] + [[e["account"], _pcu(e["amount"])]
                                       for e in answer["entries"]]
        print(_table(rows, right={1}))
        return 0
    params = {"limit": args.limit} | ({"since": args.since} if args.since else {})
    answer = _fetch(args, "/labs/{lab}/ledger", params, lab_path=True)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    rows = [["time (UTC)", "PCU", "kind", "transfer", "what"]] + [
        [e["time"][:19].replace("T", " "), _pcu(e["amount"]), e["kind"], str(e["transfer_id"]),
         _what(e)] for e in answer["entries"]]
    print(f"Ledger of {answer['lab']} (newest first; `parallex ledger --explain TRANSFER` "
          "shows how an entry was computed)")
    print(_table(rows, right={1, 3}) if len(rows) > 1 else "no entries")
    return 0


def _day(value: str, flag: str) -> dt.date:
    """The UTC day a --since or --until of --period names (a date, or a time on it)."""
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        raise errors.RequestRejected(
            f"{flag} must be a date like 2026-11-01 with --period, not {value!r}") from None


def _periods(args: argparse.Namespace) -> list[tuple[str | None, str | None]]:
    """[(since, until)] — one span, or one per day/month of --since..--until."""
    if not args.period:
        return [(args.since, args.until)]
    if not args.since:
        raise errors.RequestRejected("--period needs --since (the first period's start)")
    start = _day(args.since, "--since")
    # Without --until, through the UTC day under way (its part so far): ending at the local
    # date left out today's use, and a day late or early east or west of UTC.
    end = (_day(args.until, "--until") if args.until
           else dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1))
    spans = []
    while start < end:
        nxt = (start + dt.timedelta(days=1) if args.period == "day"
               else (start.replace(day=1) + dt.timedelta(days=32)).replace(day=1))
        spans.append((start.isoformat(), min(nxt, end).isoformat()))
        start = nxt
    return spans


def cmd_usage(args: argparse.Namespace) -> int:
    fmt = "json" if args.json else args.format
    base = {"by": args.by, "side": args.side} | ({"lab": args.lab} if args.lab else {})
    rows, answer = [], {}
    for since, until in _periods(args):
        params = base | {k: v for k, v in (("since", since), ("until", until)) if v}
        answer = _fetch(args, "/usage", params)
        rows += [{"period_start": since, "period_end": until, **r} for r in answer["rows"]]
    if fmt == "json":
        print(json.dumps({**answer, "since": args.since, "until": args.until,
                          "period": args.period, "rows": rows}, indent=2, default=str))
        return 0
    if fmt == "csv":
        fields = list(dict.fromkeys(k for r in rows for k in r)) or [
            "period_start", "period_end", args.by]
        writer = csv.DictWriter(sys.stdout, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    cur = answer.get("currency", "USD")
    period = bool(args.period)
    head = (["period"] if period else []) + [
        args.by, "charged PCU", "earned PCU", "own-machine PCU", "core-hours", "GPU-hours",
        f"cloud {cur}"]
    table = [head + (["reliability"] if args.by == "provider" else [])] + [
        ([r["period_start"]] if period else [])
        + [r[args.by], _pcu(r["pcu"]), _pcu(r["earned_pcu"]), _pcu(r["self_use_pcu"]),
           f"{r['core_hours']:.3f}", f"{r['gpu_hours']:.3f}", f"{r['cloud_cost']:,.2f}"]
        + ([f"{r['reliability']:.3f}"] if args.by == "provider" else [])
        for r in rows]
    print(f"Usage {args.side} ({answer['scope']})")
    shift = 1 if period else 0
    print(_table(table, right=set(range(1 + shift, 8 + shift))) if len(table) > 1
          else "no usage")
    return 0


def cmd_records(args: argparse.Namespace) -> int:
    """`parallex records`: every job record (one per ended lease) in the window, all pages."""
    from .broker.job_records import FIELDS as JOB_RECORD_FIELDS

    params = {k: v for k in ("since", "until", "lab") if (v := getattr(args, k))}
    found: list[dict] = []
    cursor = None
    while True:
        page = _fetch(args, "/usage/records", params | {"limit": 10_000} | (
            {"after": cursor} if cursor else {}))
        found += page["records"]
        cursor = page["next"]
        if not cursor:
            break
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "json":
            out.write(json.dumps(found, indent=2) + "\n")
        else:
            writer = csv.DictWriter(out, fieldnames=JOB_RECORD_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(found)
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"wrote {len(found)} records to {args.output}", file=sys.stderr)
    return 0


def _environments(machine: dict) -> str:
    """How a machine provides clusters' software: "build, 3 ready" or "fixed: Python 3.11,
    dask 2026.8.0, distributed 2026.8.0"."""
    env = machine.get("environment") or {}
    if not env:
        return "its own (agent predates environments)"
    if env.get("mode") == "fixed":
        return (f"fixed: Python {env.get('python') or '?'}, dask {env.get('dask') or '?'}, "
                f"distributed {env.get('distributed') or '?'}")
    return f"build, {machine.get('environments_ready', 0)} ready"


def cmd_lab(args: argparse.Namespace) -> int:
    """`parallex lab members|machines`: a PI's view of their lab."""
    params = {"since": args.since} if getattr(args, "since", None) else None
    answer = _fetch(args, "/labs/{lab}/" + args.lab_view, params, lab_path=True)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    if args.lab_view == "members":
        rows = [["user", "role", "holds CPUs", "holds GPUs", "charged PCU", "core-hours",
                 "GPU-hours", "quota CPUs", "quota GPUs"]] + [
            [m["user"], m["role"], f"{m['held_cpus']:g}", str(m["held_gpus"]), _pcu(m["pcu"]),
             f"{m['core_hours']:.3f}", f"{m['gpu_hours']:.3f}",
             "-" if m["max_cpus"] is None else f"{m['max_cpus']:g}",
             "-" if m["max_gpus"] is None else str(m["max_gpus"])]
            for m in answer["members"]]
        print(f"Members of {answer['lab']}")
    else:
        rows = [["machine", "online", "CPUs", "GPUs", "reliability", "lost", "failed",
                 "earned PCU", "environments"]] + [
            [m["name"], "yes" if m["online"] else "no", f"{m['cpus']:g}", str(len(m["gpus"])),
             f"{m['reliability']:.3f}", str(m["lost_leases"]), str(m["failed_leases"]),
             _pcu(m["earned_pcu"]), _environments(m)] for m in answer["machines"]]
        print(f"Machines of {answer['lab']}")
    print(_table(rows, right=set(range(2, 9))) if len(rows) > 1 else "none")
    return 0


def cmd_grant(client: BrokerClient, args: argparse.Namespace) -> dict:
    return client.request("POST", "/grants", json={"lab": args.lab, "amount": args.amount,
                                                   "memo": args.memo or ""})


def cmd_price_set(client: BrokerClient, args: argparse.Namespace) -> dict:
    gpu_weights = {}
    for item in args.gpu or []:
        name, sep, weight = item.partition("=")
        try:
            gpu_weights[name] = float(weight)
        except ValueError as exc:
            raise errors.RequestRejected(f"--gpu {item!r} must look like CLASS=WEIGHT, "
                                         "e.g. h100=12") from exc
        if not sep:
            raise errors.RequestRejected(f"--gpu {item!r} must look like CLASS=WEIGHT")
    new_classes = []
    for item in args.gpu_class or []:
        name, sep, rest = item.partition("=")
        pattern, colon, weight = rest.rpartition(":")
        try:
            new_classes.append({"name": name, "pattern": pattern, "weight": float(weight)})
        except ValueError as exc:
            raise errors.RequestRejected(f"--gpu-class {item!r} must look like "
                                         "NAME=PATTERN:WEIGHT, e.g. b200=b200:20") from exc
        if not (sep and colon and name and pattern):
            raise errors.RequestRejected(f"--gpu-class {item!r} must look like "
                                         "NAME=PATTERN:WEIGHT, e.g. b200=b200:20")
    body = {"w_cpu": args.cpu, "w_mem_gib": args.mem, "gpu_weights": gpu_weights,
            "new_gpu_classes": new_classes}
    if args.effective:
        body["effective_from"] = args.effective
    if args.fee is not None:
        body["fee_fraction"] = args.fee
    if args.default_gpu is not None:
        body["default_gpu_weight"] = args.default_gpu
    return client.request("POST", "/prices", json=body)


def add_policy_options(parser: argparse.ArgumentParser) -> None:
    """Options of `admin lab create` and `admin lab set`."""
    parser.add_argument("--share", type=float, help="Fair-share weight (default 1).")
    parser.add_argument("--credit-limit", type=float,
                        help="PCU the lab may owe before new workers are refused (default 0).")
    parser.add_argument("--max-cpus", type=float,
                        help="Most CPUs the lab's users may hold at once (default: no limit).")
    parser.add_argument("--max-gpus", type=int,
                        help="Most GPUs the lab's users may hold at once (default: no limit).")
    parser.add_argument("--provider-max-cpus", type=int,
                        help="Most CPU cores one of the lab's machines may offer (default 256).")
    parser.add_argument("--provider-max-memory",
                        help="Most memory one of the lab's machines may offer, e.g. '512 GiB' "
                             "(default 2 TiB).")
    parser.add_argument("--provider-max-gpus", type=int,
                        help="Most GPUs one of the lab's machines may offer (default 16).")


def policy_body(args: argparse.Namespace, create: bool) -> dict:
    body = {k: getattr(args, k) for k in ("share", "credit_limit", "max_cpus", "max_gpus",
                                          "provider_max_cpus", "provider_max_memory",
                                          "provider_max_gpus")
            if getattr(args, k, None) is not None}
    if "provider_max_memory" in body:
        body["provider_max_memory"] = parse_memory(body["provider_max_memory"])
    if not create and args.clear_quotas:
        body["clear_quotas"] = True
    return body


def add_parsers(sub, admin_sub) -> None:
    """Add the book-keeping commands to the `parallex` and `parallex admin` parsers."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help="Broker URL (default PARALLEX_BROKER_URL).")
        p.add_argument("--token", help="Token (default PARALLEX_TOKEN, else "
                                       "PARALLEX_ADMIN_TOKEN).")
        p.add_argument("--json", action="store_true", help="Print the answer as JSON.")

    c = sub.add_parser("credits", help="A lab's credit balance in PCU.")
    common(c)
    c.add_argument("--lab", help="Lab (default: your own).")
    c.set_defaults(func=cmd_credits)

    ledger = sub.add_parser("ledger", help="A lab's ledger entries, newest first.")
    common(ledger)
    ledger.add_argument("--lab", help="Lab (default: your own).")
    ledger.add_argument("--since", help="Only entries from this UTC time, e.g. 2026-11-01.")
    ledger.add_argument("--limit", type=int, default=200,
                        help="Most entries to show (default 200).")
    ledger.add_argument("--explain", type=int, metavar="TRANSFER",
                        help="Show how one transfer (the 'transfer' column) was computed.")
    ledger.set_defaults(func=cmd_ledger)

    u = sub.add_parser("usage", help="Usage totals: PCU, core-hours, GPU-hours, cloud cost.")
    common(u)
    u.add_argument("--since", help="Only usage from this UTC time, e.g. 2026-11-01.")
    u.add_argument("--until", help="Only usage before this UTC time, e.g. 2026-12-01.")
    u.add_argument("--by", choices=["lab", "user", "provider", "provider_lab"], default="lab",
                   help="Group by consuming lab, user, provider machine or provider lab "
                        "(default lab).")
    u.add_argument("--side", choices=["consumed", "provided"], default="consumed",
                   help="consumed: what members used (default); provided: what the lab's "
                        "machines served (PIs and admins).")
    u.add_argument("--lab", help="Only this lab (default: yours; admins: all labs). Members "
                                 "see their own usage, PIs their lab's.")
    u.add_argument("--period", choices=["day", "month"],
                   help="One row per group and UTC day or month from --since to --until, or "
                        "through today without --until (default: one total over the whole "
                        "span).")
    u.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="Output format (default table; --json is json).")
    u.set_defaults(func=cmd_usage)

    rec = sub.add_parser("records", help="Job records, one per ended lease, for a site's "
                                         "accounting (docs/job-records.md).")
    common(rec)
    rec.add_argument("--since", help="Leases that ended from this UTC time, e.g. 2026-11-01.")
    rec.add_argument("--until", help="Leases that ended before this UTC time.")
    rec.add_argument("--lab", help="Only this lab (default: yours; admins: all labs).")
    rec.add_argument("--format", choices=["csv", "json"], default="csv",
                     help="Output format (default csv).")
    rec.add_argument("--output", metavar="FILE", help="Write to FILE (default: standard "
                                                       "output).")
    rec.set_defaults(func=cmd_records)

    lab = sub.add_parser("lab", help="Your lab's members and machines (PIs and admins).")
    lsub = lab.add_subparsers(dest="lab_view", required=True)
    members = lsub.add_parser("members", help="Members: role, holdings, usage, quotas.")
    common(members)
    members.add_argument("--lab", help="Lab (default: your own).")
    members.add_argument("--since", help="Usage from this UTC time (default: all).")
    members.set_defaults(func=cmd_lab)
    machines = lsub.add_parser("machines", help="Machines: reliability and earnings.")
    common(machines)
    machines.add_argument("--lab", help="Lab (default: your own).")
    machines.set_defaults(func=cmd_lab)

    g = admin_sub.add_parser("grant", help="Give a lab PCU from the grants account.")
    g.add_argument("--lab", required=True, help="Lab to credit.")
    g.add_argument("--amount", type=float, required=True, help="PCU to give (more than 0).")
    g.add_argument("--memo", help="Why, for the lab's statement.")

    price = admin_sub.add_parser("price", help="Set the PCU price table.")
    psub = price.add_subparsers(dest="price_cmd", required=True)
    ps = psub.add_parser("set", help="Add a price version, effective now or later.")
    ps.add_argument("--cpu", type=float, required=True, help="PCU per hour per CPU core.")
    ps.add_argument("--mem", type=float, required=True, help="PCU per hour per GiB of memory.")
    ps.add_argument("--gpu", action="append", metavar="CLASS=WEIGHT",
                    help="PCU per hour per GPU of a class, e.g. h100=12 (repeatable).")
    ps.add_argument("--gpu-class", action="append", metavar="NAME=PATTERN:WEIGHT",
                    help="Add a GPU class: its name, a regular expression matched against the "
                         "GPU's model name, and PCU per hour per GPU, e.g. b200=b200:20 "
                         "(repeatable; tried before the existing classes).")
    ps.add_argument("--default-gpu", type=float,
                    help="PCU per hour of a GPU that matches no class (default: unchanged).")
    ps.add_argument("--fee", type=float, help="Federation fee, a fraction of each charge "
                                              "(default: unchanged; 0 at first).")
    ps.add_argument("--effective", help="UTC time it takes effect (default: now).")
