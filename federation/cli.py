"""The `parallex` command: broker, provide, up and admin."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from . import cli_books, cli_numbers, errors
from .cli_provide import add_options as cli_provide_options
from .worker_accounts import WorkerAccountError, WorkerAccounts, parse_uid_range

DEFAULT_PORT = 8470


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "parallex"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # One line per HTTP request drowns what matters; failures are logged by our own code.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Alembic narrates every plugin it loads; db.migrate logs the one line that matters.
    logging.getLogger("alembic").setLevel(logging.WARNING)


# ---- broker -----------------------------------------------------------------------------------

def _db_url(args: argparse.Namespace) -> str:
    from .broker.db import default_url

    if args.db_url:
        return args.db_url
    _data_home().mkdir(parents=True, exist_ok=True)
    return default_url()


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboards until stopped."""
    from dashboard.server import serve

    from .broker import db_open

    db_url = _db_url(args)
    try:
        with db_open.opening(db_url):
            serve(db_url, port=args.port, address=args.address, prefix=args.prefix,
                  dev_user=args.dev_user,
                  fair_share_half_life=args.fair_share_half_life * 3600,
                  schema_wait=args.schema_wait)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Show or apply schema migrations (the broker also applies them when it starts)."""
    from .broker import db, db_open

    db_url = _db_url(args)
    if args.db_command == "prune":
        return _prune(args, db_url)
    with db_open.opening(db_url):
        engine = db.plain_engine(db_url)
        before = db.current_revision(engine)
        if args.db_command == "upgrade":
            db.migrate(engine)
            print(f"database at revision {db.current_revision(engine)} (was {before or 'empty'})")
        else:
            state = "current" if before == db.head_revision() else "needs `parallex db upgrade`"
            print(f"database at revision {before or 'empty'}; newest is {db.head_revision()} "
                  f"({state})")
    return 0


def _prune(args: argparse.Namespace, db_url: str) -> int:
    """`parallex db prune`: usage records and capacity samples older than --keep-days."""
    from .broker import db, db_open, retention

    if args.keep_days is None:
        print("error: `parallex db prune` needs --keep-days DAYS (how many days of usage "
              f"records to keep; at least {retention.MIN_KEEP_DAYS})", file=sys.stderr)
        return 2
    with db_open.opening(db_url):
        engine = db.plain_engine(db_url)
        at = db.current_revision(engine)
        if at != db.head_revision():
            print(f"error: the database is at revision {at or 'empty'}, not "
                  f"{db.head_revision()}; run `parallex db upgrade` first", file=sys.stderr)
            return 1

        def progress(r: retention.PruneReport) -> None:
            print(f"  … {r.leases:,} leases' records ({r.records:,} records) folded, "
                  f"{r.capacity_samples:,} capacity samples deleted", file=sys.stderr)

        try:
            report = retention.prune(engine, args.keep_days, batch=args.batch,
                                     dry_run=args.dry_run, progress=progress)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    verb = "would prune" if report.dry_run else "pruned"
    print(f"{verb} the usage records of {report.leases:,} leases that ended before "
          f"{report.before:%Y-%m-%d} UTC ({report.records:,} records; each lease's totals "
          f"kept) and {report.capacity_samples:,} capacity samples taken before then")
    if report.held_back_at is not None:
        print(f"stopped at a lease that ended {report.held_back_at:%Y-%m-%d %H:%M} UTC and "
              "whose end is not charged yet (a broker's metering pass charges it; run the "
              "prune again after)")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    import uvicorn

    from accounting.cloud import CloudPriceError, load_cloud_prices

    from .broker import collector, db_open, pool_threads
    from .broker import settings as broker_settings
    from .broker.app import create_app

    if args.gateway_internal and not (args.gateway or args.gateway_public):
        print("error: --gateway-internal names where schedulers dial a gateway: give the "
              "gateway too, --gateway HOST:PORT (in this broker) or --gateway-public HOST:PORT "
              "(a `parallex gateway` of its own)", file=sys.stderr)
        return 2
    db_url = _db_url(args)
    try:
        cloud_prices = load_cloud_prices(args.cloud_prices)
    except CloudPriceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    settings = broker_settings.from_arguments(args, cloud_prices=cloud_prices)
    try:
        with db_open.opening(db_url):
            app = create_app(db_url, settings)
    except ValueError as exc:  # a setting the broker cannot work with, e.g. a bad network
        print(f"error: {exc}", file=sys.stderr)
        return 2
    broker = app.state.broker
    if args.gateway_public and not args.gateway:
        # A gateway of its own (`parallex gateway`): every replica hands out its address from
        # its first answer, and none of them takes workers' connections down when it stops.
        broker.gateway_address = args.gateway_public
        broker.gateway_internal = args.gateway_internal or args.gateway_public
    # A long-running server: start-up's objects out of every collection, fewer young ones
    # (federation/broker/collector.py: up to 0.6 s pauses under load before).
    collector.set_for_server()
    pool_threads.keep_idle_threads()
    if args.base_path.strip("/"):
        from .broker.app import StripPrefix

        app = StripPrefix(app, args.base_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another "
              "--port or stop what uses it", file=sys.stderr)
        return 1
    # Accepted connections inherit this: without it, a response written as headers then body
    # waits for the client's delayed ACK (~40 ms per request on a kept-alive connection).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A federation's agents reconnect together after a restart: with a backlog of 128, a
    # thousand of them overflowed it and waited for TCP's one-second SYN retries.
    sock.listen(2048)
    sock.setblocking(False)
    host, port = sock.getsockname()[:2]
    # Keep-alive longer than any client's pause between requests (heartbeats every 5 s by
    # default): at uvicorn's 5 s the broker closed connections just as agents reused them,
    # and those requests failed with "server disconnected" (issue 14's load benchmark).
    config = uvicorn.Config(app, log_level=args.log_level.lower(), access_log=False,
                            timeout_graceful_shutdown=2, timeout_keep_alive=75)

    class BrokerServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Long polls are answered now; they run only after the listening sockets close,
            # at shutdown's first await, so none of their clients comes back to this replica.
            broker.wakeups.close()
            await super().shutdown(sockets)

    server = BrokerServer(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(f"PARALLEX_BROKER_URL=http://{host}:{port}", flush=True)
            if args.gateway:
                gateway = await _start_gateway(broker, args.gateway, args.gateway_public,
                                               args.gateway_internal)
                print(f"PARALLEX_GATEWAY={gateway.address}", flush=True)
        await task

    _run_loop(serve())
    return 0


def _run_loop(main) -> None:
    """Run the broker's event loop on uvloop where it is installed (uvicorn[standard]
    brings it), else asyncio's own. The loop answers every agent's heartbeat and report. In
    issue 14's load benchmark (same day, A/B) its timers ran late by up to 1 s at the p99 on
    asyncio's loop in both runs and by up to 0.5 s on uvloop in four runs of five, and
    reports' median fell from ~0.7 s to 0.44-0.68 s; the p99s stayed within the runs' spread."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_gateway(args: argparse.Namespace) -> int:
    """Serve the federation gateway until stopped. A process of its own so that a broker
    replica's restart (an upgrade, a crash) does not close workers' connections: Dask workers
    end when their scheduler connection drops, so an in-broker gateway's restart ended every
    lease behind it."""
    from .broker import db, db_open
    from .gateway import Gateway
    from .gateway_routes import DatabaseRoutes

    if problem := cli_numbers.host_port_problem(args.listen):
        print(f"error: --listen {problem}", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    db_url = _db_url(args)
    try:
        with db_open.opening(db_url):
            # An unreachable database is said now, not at the first worker's connection.
            engine = db.reader_engine(db_url, wait=args.schema_wait)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    async def serve() -> None:
        gateway = Gateway(DatabaseRoutes(engine))
        try:
            await gateway.start(host, int(port))
        except OSError as exc:
            raise errors.ParallexError(f"cannot listen on {args.listen} ({exc.strerror}); "
                                       "choose another --listen or stop what uses it") from exc
        print(f"PARALLEX_GATEWAY={gateway.address}", flush=True)
        logging.getLogger("parallex.gateway").info("gateway listening on %s", gateway.address)
        if args.metrics_port is not None:
            from .gateway_metrics import serve_metrics

            try:
                port_served = serve_metrics(gateway, args.metrics_port, args.metrics_address)
            except OSError as exc:
                raise errors.ParallexError(
                    f"cannot serve metrics on {args.metrics_address}:{args.metrics_port} "
                    f"({exc.strerror}); choose another --metrics-port") from exc
            print(f"PARALLEX_GATEWAY_METRICS=http://{args.metrics_address}:{port_served}"
                  "/metrics", flush=True)
        await asyncio.Event().wait()

    _run_loop(serve())
    return 0


async def _start_gateway(broker, listen: str, public: str | None, internal: str | None):
    """The federation gateway in the broker's process, routing by the broker's clusters."""
    from .gateway import Gateway

    host, _, port = listen.rpartition(":")
    gateway = Gateway(broker.scheduler_of)
    await gateway.start(host, int(port))  # --gateway is HOST:PORT (cli_numbers.host_port)
    broker.gateway_address = public or gateway.address
    bound_host, _, bound_port = gateway.address.rpartition(":")
    if bound_host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard is not dialable
        bound_host = "127.0.0.1"
    broker.gateway_internal = internal or f"{bound_host}:{bound_port}"
    logging.getLogger("parallex.gateway").info(
        "gateway listening on %s; workers dial %s", gateway.address, broker.gateway_address)
    return gateway


# ---- provide ----------------------------------------------------------------------------------

def _read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise errors.ParallexError(f"cannot read --token-file {args.token_file}: "
                                       f"{exc.strerror}") from exc
    return args.token or os.environ.get("PARALLEX_PROVIDER_TOKEN")


def _worker_accounts(args: argparse.Namespace) -> WorkerAccounts:
    """The accounts workers run under: one per lease from --worker-uids, or (development
    only, said out loud) the agent's own."""
    if args.worker_uids:
        if args.insecure_shared_account:
            raise WorkerAccountError("give either --worker-uids or --insecure-shared-account")
        return WorkerAccounts(parse_uid_range(args.worker_uids))
    if not args.insecure_shared_account:
        raise WorkerAccountError(
            "workers need accounts of their own: run the agent as root with --worker-uids "
            "20000-20063 (one unused uid per lease that may run at once). On a single-user "
            "development machine, --insecure-shared-account runs every worker as this "
            "agent's account instead, where they can read its token and each other's keys")
    logging.getLogger("parallex.agent").warning(
        "--insecure-shared-account: every worker runs as %s, can read the provider token and "
        "other leases' keys; never use this where people you do not trust run code",
        "root" if os.geteuid() == 0 else "this agent's account")
    return WorkerAccounts(None)


#: The most warm worker interpreters an agent keeps (each holds ~100 MB and a worker uid).
MAX_WARM_WORKERS = 64


def cmd_provide(args: argparse.Namespace) -> int:
    from . import cli_provide, limits
    from .agent import ProviderAgent
    from .cgroups import CgroupUnavailable
    from .inventory import offer
    from .launchers import ProcessLauncher
    from .owner_policy import PolicyError

    if args.print_systemd_unit:
        print(cli_provide.systemd_unit(sys.argv[sys.argv.index("provide") + 1:]
                                       if "provide" in sys.argv else []))
        return 0
    try:
        policy = cli_provide.policy_from_args(args)
    except PolicyError as exc:
        return cli_provide.print_error(str(exc))
    if not 16 <= args.lease_pids <= 1_000_000:
        return cli_provide.print_error(f"--lease-pids must be 16 to 1000000, not "
                                       f"{args.lease_pids}")
    if args.dry_run:
        uids = parse_uid_range(args.worker_uids) if args.worker_uids else None
        print(cli_provide.dry_run(policy, cli_provide.owner_meter(policy, uids, [])))
        return 0
    token = _read_token(args)
    if not args.broker or not token:
        print("error: `parallex provide` needs --broker URL and a provider token (--token, "
              "--token-file or PARALLEX_PROVIDER_TOKEN)", file=sys.stderr)
        return 2
    if not 0 <= args.warm_workers <= MAX_WARM_WORKERS:
        print(f"error: --warm-workers must be 0 (off) to {MAX_WARM_WORKERS}, not "
              f"{args.warm_workers}", file=sys.stderr)
        return 2
    try:
        capacity = offer(cpus=args.cpus, memory=args.memory, gpus=args.gpus)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        accounts = _worker_accounts(args)
    except WorkerAccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or _data_home() / "agent")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        enforcement = limits.choose(workdir, args.cgroups)
    except (CgroupUnavailable, OSError) as exc:
        return cli_provide.print_error(f"--cgroups {args.cgroups}: {exc}")
    launcher = ProcessLauncher(workdir, args.worker_host, warm=args.warm_workers,
                               limits=enforcement, lease_pids=args.lease_pids)
    meter = cli_provide.owner_meter(policy, accounts.uids,
                                    [g["index"] for g in capacity.gpus])
    try:
        environments = cli_provide.environments_from_args(
            args, workdir, args.name or socket.gethostname())
    except ValueError as exc:
        return cli_provide.print_error(str(exc))
    agent = ProviderAgent(args.broker, token, capacity, workdir=workdir, name=args.name,
                          site=args.site, worker_host=args.worker_host,
                          accounts=accounts, release_grace=args.release_grace,
                          launcher=launcher, policy=policy, owner_meter=meter,
                          accepts_peers=not args.no_peer_connections,
                          environments=environments)
    try:
        agent.prepare()
    except (WorkerAccountError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("parallex.agent").info(
        "workers run under %s; lease sizes enforced by %s; owner policy: offer %s",
        accounts.describe(), enforcement.describe(), ", ".join(policy.offer))
    if args.metrics_port is not None:
        from .agent_metrics import AgentMetrics

        agent.metrics = AgentMetrics(agent)
        try:
            port = agent.metrics.serve(args.metrics_port, args.metrics_address)
        except OSError as exc:
            return cli_provide.print_error(
                f"--metrics-port {args.metrics_port} on {args.metrics_address}: {exc.strerror}")
        print(f"PARALLEX_AGENT_METRICS=http://{args.metrics_address}:{port}/metrics",
              flush=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        # Machine-readable, like the provider id: tests and benchmarks wait on it.
        agent.on_ready = lambda n: print(f"PARALLEX_WARM_READY={n}", flush=True)
        # Machine-readable too: what the owner policy does now (tests wait on it).
        agent.on_decision = lambda d: print(f"PARALLEX_OWNER={d.action}", flush=True)
        runner = asyncio.create_task(agent.run())
        registered = asyncio.create_task(agent.registered.wait())
        await asyncio.wait({runner, registered}, return_when=asyncio.FIRST_COMPLETED)
        if agent.registered.is_set():
            print(f"PARALLEX_PROVIDER_ID={agent.provider_id}", flush=True)
        await runner

    try:
        asyncio.run(main())
    except errors.TokenRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if agent.failed else 0


# ---- admin ------------------------------------------------------------------------------------

def cmd_admin(args: argparse.Namespace) -> int:
    client = cli_books.client_from(args, "PARALLEX_ADMIN_TOKEN", "PARALLEX_TOKEN")
    try:
        if args.admin_cmd == "lab":
            if args.lab_cmd == "create":
                out = client.request("POST", "/labs", json={
                    "name": args.name, "site": args.site or "",
                    "institution": args.institution,
                    **cli_books.policy_body(args, create=True)})
            elif args.lab_cmd == "set":
                out = client.request("PATCH", f"/labs/{args.name}",
                                     json=cli_books.policy_body(args, create=False))
            else:
                out = client.request("GET", "/labs")
        elif args.admin_cmd == "member":
            out = client.request("PUT", f"/labs/{args.lab}/members/{args.user}", json={
                "role": args.role, "max_cpus": args.max_cpus, "max_gpus": args.max_gpus})
        elif args.admin_cmd == "user-token":
            out = client.request("POST", "/tokens", json={"kind": "user", "lab": args.lab,
                                                          "user": args.user})
        elif args.admin_cmd == "provider-token":
            out = client.request("POST", "/tokens", json={"kind": "provider", "lab": args.lab})
        elif args.admin_cmd == "revoke":
            out = client.request("DELETE", f"/tokens/{args.token_id}")
        elif args.admin_cmd == "grant":
            out = cli_books.cmd_grant(client, args)
        elif args.admin_cmd == "price":
            out = cli_books.cmd_price_set(client, args)
        else:
            raise AssertionError(args.admin_cmd)
    finally:
        client.close()
    if args.json:
        print(json.dumps(out, default=str, indent=2))
    elif isinstance(out, dict) and "token" in out:
        print(f"token id: {out['id']} ({out['kind']}, lab {out['lab']}"
              + (f", user {out['user']}" if out.get("user") else "") + ")")
        print(f"token:    {out['token']}")
        print("The token is shown only this once; it is stored hashed.")
    elif isinstance(out, list):
        for row in out:
            print("  ".join(f"{k}={v}" for k, v in row.items()))
    else:
        print("  ".join(f"{k}={v}" for k, v in out.items() if not isinstance(v, list | dict)))
    return 0


# ---- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from accounting.half_lives import DEFAULT_HALF_LIFE

    from .broker import settings as broker_settings

    parser = argparse.ArgumentParser(prog="parallex", description=__doc__)
    parser.add_argument("--log-level", default="INFO",
                        help="Logging level: DEBUG, INFO, WARNING or ERROR (default INFO).")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="Run the federation broker (REST API under /api/v1).")
    b.add_argument("--db-url", help="SQLAlchemy database URL; default: PARALLEX_DB_URL, else an "
                   "SQLite file in ~/.local/share/parallex/broker.db. postgresql:// accepted.")
    b.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    b.add_argument("--port", type=cli_numbers.port, default=DEFAULT_PORT,
                   help=f"TCP port; 0 picks a free one (default {DEFAULT_PORT}).")
    broker_settings.add_arguments(b)
    b.add_argument("--base-path", default=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", ""),
                   help="Also serve the API under this path prefix, e.g. /services/parallex/ "
                        "behind JupyterHub's proxy (default JUPYTERHUB_SERVICE_PREFIX; empty: "
                        "only at the root).")
    b.add_argument("--gateway", metavar="HOST:PORT", type=cli_numbers.host_port,
                   help="Also listen here for workers' TLS connections and route each to its "
                        "cluster's scheduler by server name (the federation gateway); port 0 "
                        "picks a free one. Workers are then given parallex:// addresses and "
                        "schedulers need to be reachable only from this host (default off: "
                        "workers dial schedulers directly).")
    b.add_argument("--gateway-public", metavar="HOST:PORT", type=cli_numbers.host_port,
                   help="The gateway address workers dial, when it differs from --gateway "
                        "(behind NAT or a load balancer; default: the --gateway address). "
                        "Without --gateway: the address of a gateway that runs as a process "
                        "of its own (`parallex gateway`), which every replica must name.")
    b.add_argument("--gateway-internal", metavar="HOST:PORT", type=cli_numbers.host_port,
                   help="The gateway address users' schedulers dial to reach their workers: "
                        "they run in the hub's network, where the public address may not "
                        "route back in (no NAT hairpin) or would take a detour (default: the "
                        "--gateway address, 127.0.0.1 for a wildcard host; with a gateway of "
                        "its own, --gateway-public).")
    b.add_argument("--cloud-prices", metavar="FILE",
                   help="YAML table of reference on-demand cloud prices used for the savings "
                        "figures (default: the shipped accounting/cloud_prices.yaml).")
    b.set_defaults(func=cmd_broker)

    gw = sub.add_parser("gateway", help="Run the federation gateway as a process of its own, "
                                        "routing by the brokers' database.")
    gw.add_argument("--listen", metavar="HOST:PORT", default="0.0.0.0:8786",  # noqa: S104
                    help="Where workers' TLS connections arrive (default 0.0.0.0:8786; port 0 "
                         "picks a free one). Give every broker replica --gateway-public (what "
                         "workers dial) and --gateway-internal (what schedulers dial).")
    gw.add_argument("--db-url", help="The brokers' database URL, read for each cluster's "
                    "scheduler (default PARALLEX_DB_URL, else ~/.local/share/parallex/"
                    "broker.db).")
    gw.add_argument("--schema-wait", type=cli_numbers.number(), default=60.0,
                    help="Seconds to wait for a broker to migrate the database to the schema "
                         "this gateway reads before giving up with a message (default 60); "
                         "the gateway never migrates it itself.")
    gw.add_argument("--metrics-port", type=cli_numbers.port, default=None,
                    help="Serve Prometheus metrics (parked and carried connections, routed "
                         "and refused counts) on this TCP port; 0 picks a free one (default: "
                         "none).")
    gw.add_argument("--metrics-address", default="127.0.0.1",
                    help="Address the metrics listen on (default 127.0.0.1: scrape from the "
                         "gateway's host).")
    gw.set_defaults(func=cmd_gateway)

    p = sub.add_parser("provide", help="Offer this machine's CPUs/GPUs to a broker.")
    p.add_argument("--broker", default=os.environ.get("PARALLEX_BROKER_URL"),
                   help="Broker URL; several broker replicas comma-separated, the agent "
                        "moving to the next when the one in use does not answer (default "
                        "PARALLEX_BROKER_URL).")
    p.add_argument("--token", help="Provider token. Visible to local users in the process list; "
                   "prefer --token-file or PARALLEX_PROVIDER_TOKEN.")
    p.add_argument("--token-file", help="File holding the provider token (mode 0600).")
    p.add_argument("--cpus", type=float, help="CPU cores to offer (default: all).")
    p.add_argument("--memory", help="Memory to offer, e.g. '16 GiB' (default: all).")
    p.add_argument("--gpus", help="GPU indices to offer, e.g. '0,1'; 'none' for none "
                   "(default: all that NVML finds).")
    p.add_argument("--workdir", help="Folder for worker credentials, scratch space and logs "
                   "(default ~/.local/share/parallex/agent).")
    p.add_argument("--name", help="Provider name, unique within the lab (default: host name).")
    p.add_argument("--site", help="Site label for locality (default: the lab's site).")
    p.add_argument("--worker-host", help="Address workers listen on and advertise (default: "
                   "the interface that reaches the scheduler).")
    p.add_argument("--worker-uids", metavar="LOW-HIGH",
                   help="Range of unused uids, one per lease that may run at once, e.g. "
                        "20000-20063; each lease's worker runs under its own uid and group, "
                        "its folder readable by that uid alone. Needs root. Required unless "
                        "--insecure-shared-account is given (no default).")
    p.add_argument("--insecure-shared-account", action="store_true",
                   help="Development only: run every worker as this agent's own account, "
                        "where workers can read the provider token and each other's keys "
                        "(default off; `parallex up` uses it only when not run as root).")
    p.add_argument("--release-grace", type=cli_numbers.number(), default=10.0,
                   help="Seconds a released lease's worker gets to hand its data back and exit "
                        "before it is sent SIGTERM (default 10).")
    p.add_argument("--warm-workers", type=int, default=4, metavar="N",
                   help="Worker interpreters kept started, Dask imported, so a CPU lease's "
                        "worker joins in about a tenth of a second instead of a second; never "
                        "more than the CPUs no lease holds. Each costs about 100 MB of memory "
                        "while it waits. 0 turns it off, at most 64 (default 4: one per free "
                        "CPU up to 4).")
    p.add_argument("--metrics-port", type=cli_numbers.port, metavar="PORT",
                   help="Serve Prometheus metrics (workers by state, offering, CPUs leased, "
                        "heartbeat round trip) on this port; 0 picks a free one (default: "
                        "off).")
    p.add_argument("--metrics-address", default="127.0.0.1", metavar="HOST",
                   help="Address the metrics listen on (default 127.0.0.1: the lab's network "
                        "sees no listener; scrape from the machine itself).")
    cli_provide_options(p)
    p.set_defaults(func=cmd_provide)

    u = sub.add_parser("up", help="Start a local federation: a broker and N demo labs.")
    u.add_argument("--data-dir", default="parallex-data",
                   help="Folder for the database, agent folders and demo.env "
                        "(default ./parallex-data).")
    u.add_argument("--providers", type=int, default=2,
                   help="Number of demo labs, one provider agent each (default 2).")
    u.add_argument("--port", type=cli_numbers.port, default=0,
                   help="Broker port; 0 picks a free one (default 0).")
    u.add_argument("--hub-port", type=cli_numbers.port, default=8000,
                   help="JupyterHub's public port; 0 picks a free one (default 8000).")
    u.add_argument("--no-hub", action="store_true",
                   help="Start only the broker and the agents, without JupyterHub and the "
                        "demo identity providers.")
    u.add_argument("--cpus", type=float, default=None,
                   help="CPUs each demo provider offers (default: all of this machine's).")
    u.add_argument("--memory", default=None,
                   help="Memory each demo provider offers (default: machine memory / N).")
    u.add_argument("--worker-uids", default="20000-20127", metavar="LOW-HIGH",
                   help="When run as root: uids for the demo agents' workers, split evenly "
                        "between the labs, one per lease (default 20000-20127). Not as root, "
                        "workers run as your own account (development only).")
    u.set_defaults(func=lambda a: __import__("federation.up", fromlist=["run"]).run(a))

    dash = sub.add_parser("dashboard", help="Serve the Panel dashboards (a JupyterHub service, "
                                            "or standalone with --dev-user).")
    dash.add_argument("--db-url", help="The broker's database URL (default PARALLEX_DB_URL, "
                      "else ~/.local/share/parallex/broker.db).")
    service_url = urlsplit(os.environ.get("JUPYTERHUB_SERVICE_URL", ""))
    dash.add_argument("--port", type=cli_numbers.port, default=service_url.port or 8471,
                      help="TCP port (default: the port of JUPYTERHUB_SERVICE_URL, else 8471).")
    dash.add_argument("--address", default=service_url.hostname or "127.0.0.1",
                      help="Address to listen on (default 127.0.0.1).")
    dash.add_argument("--prefix", default=os.environ.get("JUPYTERHUB_SERVICE_PREFIX", ""),
                      help="URL prefix, e.g. /services/parallex-dashboard/ (default "
                           "JUPYTERHUB_SERVICE_PREFIX; empty: the root).")
    dash.add_argument("--dev-user", help="Development only: show the dashboard as this "
                      "Parallex user (or 'admin') to everyone, without login.")
    dash.add_argument("--schema-wait", type=cli_numbers.number(), default=60.0,
                      help="Seconds to wait for the broker to migrate its database to the "
                           "schema this dashboard reads before giving up with a message "
                           "(default 60); the dashboard never migrates it itself.")
    dash.add_argument("--fair-share-half-life",
                      type=cli_numbers.number(above=True, unit="hours"),
                      default=DEFAULT_HALF_LIFE / broker_settings.HOUR,
                      help="Hours after which past usage counts half for fair share, as given "
                           f"to the broker (default {DEFAULT_HALF_LIFE / broker_settings.HOUR:g}).")
    dash.set_defaults(func=cmd_dashboard)

    d = sub.add_parser("db", help="Database schema: show the revision or upgrade it; prune "
                       "old usage records.")
    d.add_argument("db_command", choices=["current", "upgrade", "prune"],
                   help="current: show the revision; upgrade: apply pending migrations; "
                        "prune: delete usage records of leases that ended more than "
                        "--keep-days ago (each lease's totals and the daily totals are kept) "
                        "and capacity samples as old.")
    d.add_argument("--keep-days", type=int, default=None,
                   help="prune: days of usage records to keep, counted back from today's "
                        "UTC midnight (required; 31 to 36500).")
    d.add_argument("--batch", type=int, default=2000,
                   help="prune: leases (and capacity samples) per transaction, 1 to 100000 "
                        "(default 2000).")
    d.add_argument("--dry-run", action="store_true",
                   help="prune: count what would go, delete nothing.")
    d.add_argument("--db-url", help="SQLAlchemy database URL; default: PARALLEX_DB_URL, else "
                   "~/.local/share/parallex/broker.db.")
    d.set_defaults(func=cmd_db)

    a = sub.add_parser("admin", help="Administer labs and tokens through the broker API.")
    a.add_argument("--broker", help="Broker URL (default PARALLEX_BROKER_URL).")
    a.add_argument("--token", help="Admin token (default PARALLEX_ADMIN_TOKEN, else "
                                   "PARALLEX_TOKEN).")
    a.add_argument("--json", action="store_true", help="Print the answer as JSON.")
    asub = a.add_subparsers(dest="admin_cmd", required=True)
    lab = asub.add_parser("lab", help="Create or list labs.")
    labsub = lab.add_subparsers(dest="lab_cmd", required=True)
    lc = labsub.add_parser("create", help="Create a lab.")
    lc.add_argument("name", help="Lab name: letters, digits, '.', '_' and '-'.")
    lc.add_argument("--site", help="Site label for locality (default: the lab name).")
    lc.add_argument("--institution", help="The lab's institution (created if new).")
    ls = labsub.add_parser("set", help="Change a lab's share, credit limit or quotas.")
    ls.add_argument("name", help="Lab name.")
    ls.add_argument("--clear-quotas", action="store_true", help="Remove the CPU/GPU quotas.")
    for lab_parser in (lc, ls):
        cli_books.add_policy_options(lab_parser)
    labsub.add_parser("list", help="List labs.")
    mem = asub.add_parser("member", help="Lab memberships.")
    memsub = mem.add_subparsers(dest="member_cmd", required=True)
    ma = memsub.add_parser("add", help="Add a user to a lab, or change their role/quotas.")
    ma.add_argument("--lab", required=True, help="The lab.")
    ma.add_argument("--user", required=True, help="User name (created if new).")
    ma.add_argument("--role", choices=["member", "pi", "admin"], default="member",
                    help="Role in the lab (default member).")
    ma.add_argument("--max-cpus", type=float, help="Most CPUs this user may hold at once "
                                                    "(default: no per-user limit).")
    ma.add_argument("--max-gpus", type=int, help="Most GPUs this user may hold at once "
                                                  "(default: no per-user limit).")
    ut = asub.add_parser("user-token", help="Issue a token for a user (created if new).")
    ut.add_argument("--lab", required=True, help="The user's lab.")
    ut.add_argument("--user", required=True, help="User name.")
    pt = asub.add_parser("provider-token", help="Issue a token for a lab's provider agents.")
    pt.add_argument("--lab", required=True, help="The lab whose machines use it.")
    rv = asub.add_parser("revoke", help="Revoke a token by its id (tok_...).")
    rv.add_argument("token_id", help="Token id as printed when it was issued.")
    a.set_defaults(func=cmd_admin)
    cli_books.add_parsers(sub, asub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `parallex` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except errors.ParallexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
