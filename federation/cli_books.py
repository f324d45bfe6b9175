"""`parallex credits`, `parallex ledger`, `parallex usage`: a lab's books from the command line.

Readable tables by default; --json prints the broker's answer for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
from decimal import Decimal

from . import errors
from .client import BrokerClient


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
        print(f"{answer['lab']}: {_pcu(answer['balance'])} PCU")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    params = {"limit": args.limit} | ({"since": args.since} if args.since else {})
    answer = _fetch(args, "/labs/{lab}/ledger", params, lab_path=True)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    rows = [["time (UTC)", "PCU", "kind", "memo"]] + [
        [e["time"][:19].replace("T", " "), _pcu(e["amount"]), e["kind"], e["memo"]]
        for e in answer["entries"]]
    print(f"Ledger of {answer['lab']} (newest first)")
    print(_table(rows, right={1}) if len(rows) > 1 else "no entries")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    params = {"by": args.by} | {k: v for k in ("since", "lab") if (v := getattr(args, k))}
    answer = _fetch(args, "/usage", params)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
        return 0
    rows = [[args.by, "charged PCU", "own-machine PCU", "core-hours", "GPU-hours"]] + [
        [r[args.by], _pcu(r["pcu"]), _pcu(r["self_use_pcu"]), f"{r['core_hours']:.3f}",
         f"{r['gpu_hours']:.3f}"] for r in answer["rows"]]
    print(_table(rows, right={1, 2, 3, 4}) if len(rows) > 1 else "no usage")
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
    body = {"w_cpu": args.cpu, "w_mem_gib": args.mem, "gpu_weights": gpu_weights}
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


def policy_body(args: argparse.Namespace, create: bool) -> dict:
    body = {k: getattr(args, k) for k in ("share", "credit_limit", "max_cpus", "max_gpus")
            if getattr(args, k) is not None}
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
    ledger.set_defaults(func=cmd_ledger)

    u = sub.add_parser("usage", help="Usage totals: PCU, core-hours, GPU-hours.")
    common(u)
    u.add_argument("--since", help="Only usage from this UTC time, e.g. 2026-11-01.")
    u.add_argument("--by", choices=["lab", "user", "provider"], default="lab",
                   help="Group by consuming lab, user or provider (default lab).")
    u.add_argument("--lab", help="Only this consuming lab (admins; members see their own).")
    u.set_defaults(func=cmd_usage)

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
    ps.add_argument("--default-gpu", type=float,
                    help="PCU per hour of a GPU that matches no class (default: unchanged).")
    ps.add_argument("--fee", type=float, help="Federation fee, a fraction of each charge "
                                              "(default: unchanged; 0 at first).")
    ps.add_argument("--effective", help="UTC time it takes effect (default: now).")
