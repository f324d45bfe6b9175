"""The Parallex magics: %parallex (status, scale, adapt, stop) and %%remote."""

from __future__ import annotations

import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from federation import errors

from . import logs
from .pool import Pool
from .remote import RemoteCellError, RemoteNamespace, run_cell

USAGE = """\
%parallex                      workers by lab, CPUs and GPUs, cost so far, your lab's balance
%parallex scale N [--gpus K]   hold N workers (stops adaptive scaling)
%parallex adapt MIN MAX        scale between MIN and MAX workers with the work
%parallex stop                 give every worker back; dask then runs in this kernel
%parallex log [N]              the last N lines (40) of this kernel's Dask and Parallex log
%%remote [--gpus K] [--cpus N] [--memory SIZE]
                               run the cell on a pool worker in a namespace that persists"""


@magics_class
class ParallexMagics(Magics):
    """Magics bound to the kernel's Pool."""

    def __init__(self, shell, pool: Pool):
        super().__init__(shell)
        self.pool = pool
        self._namespaces: dict[str, object] = {}

    # ---- %parallex ---------------------------------------------------------------------

    @line_magic
    def parallex(self, line: str) -> None:
        """Show the pool, or: scale N [--gpus K] | adapt MIN MAX | stop | help."""
        words = shlex.split(line)
        command = words[0] if words else "status"
        try:
            if command == "status":
                self._show_status()
            elif command == "scale":
                self._scale(words[1:])
            elif command == "adapt":
                self._adapt(words[1:])
            elif command == "stop":
                self._namespaces.clear()
                self.pool.stop()
                print("Parallex: every worker was given back; dask now runs in this kernel.")
            elif command == "log":
                count = int(words[1]) if len(words) > 1 else 40
                if not 1 <= count <= 100_000:
                    raise ValueError(f"%parallex log N takes 1 to 100000 lines; got {count}")
                print(logs.tail(count))
            elif command in ("help", "-h", "--help"):
                print(USAGE)
            else:
                print(f"Parallex: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        except (errors.ParallexError, ValueError) as exc:
            print(f"Parallex: {exc}", file=sys.stderr)

    def _cluster(self):
        self.pool.start()
        if not self.pool.ready.wait(120) or self.pool.cluster is None:
            raise errors.ParallexError(f"not connected to the pool: {self.pool.problem}; dask "
                                       "runs in this kernel")
        return self.pool.cluster

    def _show_status(self) -> None:
        self.pool.start()
        self.pool.ready.wait(30)
        st = self.pool.status()
        if st["state"] != "ready":
            print(f"Parallex: {st['state']} — {st['problem'] or 'connecting…'}")
            return
        labs = ", ".join(f"{lab}: {n}" for lab, n in sorted(st["workers_by_lab"].items()))
        print(f"Parallex — {st['user']} ({st['lab']})")
        print(f"  workers: {sum(st['workers_by_lab'].values())} ({labs or 'none yet'})"
              f", pending {st['pending']}, adaptive {st['adapt'][0]}–{st['adapt'][1]}")
        print(f"  holding: {st['cpus']:g} CPUs, {st['gpus']} GPUs")
        for reason, n in sorted(st.get("waiting", {}).items()):
            print(f"  {n} pending: {reason}")
        for line in st.get("starting", []):
            print(f"  starting: {line}")
        cluster = self.pool.cluster
        where = [f"{kind} {', '.join(names)}" for kind, names in
                 (("labs", cluster.labs), ("sites", cluster.sites)) if names]
        if where:
            print(f"  restricted to {'; '.join(where)} (parallex.labs / parallex.sites)")
        if "cost_pcu" in st:
            print(f"  cost so far: {float(st['cost_pcu']):.4f} PCU "
                  f"(now {st['pcu_per_hour']:.3g} PCU/h); lab balance "
                  f"{float(st['balance']):,.2f} PCU")
        if st.get("books_error"):
            print(f"  books: {st['books_error']}")
        if st.get("scale_error"):
            print(f"  last scale-up refused: {st['scale_error']}")
        if st.get("round_trips"):
            print(f"  {st['round_trips']}")
        if st.get("dashboard"):
            print(f"  dashboard: {st['dashboard']}")

    def _scale(self, args: list[str]) -> None:
        gpus = 0
        if "--gpus" in args:
            i = args.index("--gpus")
            gpus = int(args[i + 1])
            args = args[:i] + args[i + 2:]
        if len(args) != 1 or not args[0].isdigit():
            raise ValueError("usage: %parallex scale N [--gpus K]")
        cluster = self._cluster()
        if cluster._adaptive is not None:
            cluster._adaptive.stop()
        self.pool.adapt_range = (int(args[0]), int(args[0]))
        cluster.scale(int(args[0]), gpus=gpus)
        print(f"Parallex: asked for {args[0]} workers" + (f" with {gpus} GPUs each" if gpus
                                                          else ""))

    def _adapt(self, args: list[str]) -> None:
        if len(args) != 2 or not all(a.isdigit() for a in args) or int(args[0]) > int(args[1]):
            raise ValueError("usage: %parallex adapt MIN MAX (whole numbers, MIN <= MAX)")
        cluster = self._cluster()
        cluster.adapt(minimum=int(args[0]), maximum=int(args[1]))
        self.pool.adapt_range = (int(args[0]), int(args[1]))
        print(f"Parallex: adaptive scaling between {args[0]} and {args[1]} workers")

    # ---- %%remote ----------------------------------------------------------------------

    @magic_arguments()
    @argument("--gpus", type=int, default=0, help="GPUs of the remote worker.")
    @argument("--cpus", type=float, default=None, help="CPUs of the remote worker.")
    @argument("--memory", default=None, help="Memory of the remote worker, e.g. '8 GiB'.")
    @cell_magic
    def remote(self, line: str, cell: str) -> None:
        """Run the cell on a pool worker; variables it reads go there, ones it assigns come
        back; a namespace per worker size persists between cells."""
        try:
            args = parse_argstring(self.remote, line)
            from federation.sizes import format_bytes, parse_memory

            # IPython's argument splitting keeps quotes: --memory '8 GiB' arrives quoted.
            memory = parse_memory(args.memory.strip("'\"")) if args.memory else None
            key = f"remote-{args.cpus or 'd'}cpu-{format_bytes(memory) if memory else 'd'}" \
                  f"-{args.gpus}gpu".replace(" ", "")
            actor = self._namespaces.get(key)
            if actor is None:
                cluster = self._cluster()
                address = cluster.hold(key, cpus=args.cpus, memory=memory, gpus=args.gpus)
                future = self.pool.client.submit(RemoteNamespace, actor=True,
                                                 workers=[address], key=key,
                                                 allow_other_workers=False)
                actor = self._namespaces[key] = future.result()
            run_cell(actor, cell, self.shell.user_ns, sys.stdout.write, sys.stderr.write)
        except RemoteCellError as exc:
            print(str(exc), file=sys.stderr)
            # An error status, so "run all" stops here as it would on a local failure.
            raise UsageError("the cell failed on the worker (its traceback is above)") from None
        except (errors.ParallexError, ValueError) as exc:
            raise UsageError(f"Parallex: {exc}") from None
