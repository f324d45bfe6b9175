"""%%remote: run a cell on a pool worker in a namespace that persists between cells.

The namespace is a Dask actor on a worker the kernel holds in its own group (adaptive scaling
leaves it alone). The variables the cell reads are sent along; those it assigns come back;
what it prints is collected on the worker and drained by the kernel every 0.1 s while the cell
runs, so output appears as it is produced.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import threading
import time
import traceback
from collections import deque
from typing import Any

import cloudpickle

# IPython's own bookkeeping names: never sent, never brought back.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___", "_ih", "_oh",
                  "_dh", "_i", "_ii", "_iii"}


class RemoteCellError(RuntimeError):
    """The cell raised on the worker; the message holds the remote traceback."""


def names_in(code: str) -> tuple[set[str], set[str]]:
    """(names the cell reads, names it assigns or changes by item or attribute assignment)."""
    tree = ast.parse(code)
    reads, writes = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (reads if isinstance(node.ctx, ast.Load) else writes).add(node.id)
        elif isinstance(node, ast.Subscript | ast.Attribute) and isinstance(
                node.ctx, ast.Store | ast.Del):
            # model['runs'] = 1 or model.runs = 1 changes model: bring model back too.
            base = node.value
            while isinstance(base, ast.Subscript | ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name):
                writes.add(base.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            reads.add(node.target.id)  # x += 1 needs x first
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            writes.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                writes.add((alias.asname or alias.name).split(".")[0])
    # Names bound inside functions and comprehensions are local to them; a top-level binding
    # of the same name is still found above, so over-collecting here is harmless.
    return reads, writes


class _Stream(io.TextIOBase):
    def __init__(self, sink: RemoteNamespace, name: str):
        self.sink, self.name = sink, name

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.sink._emit(self.name, text)
        return len(text)


class RemoteNamespace:
    """Lives on a worker as a Dask actor: a module-like namespace cells execute in."""

    def __init__(self):
        self.namespace: dict[str, Any] = {"__name__": "__remote__"}
        self._output: deque[tuple[str, str]] = deque()
        self._lock = threading.Lock()

    def _emit(self, stream: str, text: str) -> None:
        with self._lock:
            self._output.append((stream, text))

    def run(self, code: str, inputs: dict[str, Any], wanted: list[str]) -> dict:
        """Execute ``code`` with ``inputs`` bound; returns the values of ``wanted`` names."""
        self.namespace.update(inputs)
        out, err = _Stream(self, "stdout"), _Stream(self, "stderr")
        # Process-wide redirection: prints of other tasks on this worker while the cell runs
        # land in the cell's output too.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, "<remote cell>", "exec"), self.namespace)  # noqa: S102
            except BaseException:
                return {"error": traceback.format_exc(), "values": {}, "skipped": {}}
        values, skipped = {}, {}
        for name in wanted:
            if name not in self.namespace:
                continue
            try:
                cloudpickle.dumps(self.namespace[name])
            except Exception as exc:  # stays on the worker; the kernel says so
                skipped[name] = f"{exc.__class__.__name__}: {exc}"
                continue
            values[name] = self.namespace[name]
        return {"error": None, "values": values, "skipped": skipped}

    async def drain(self) -> list[tuple[str, str]]:
        """Output written since the last drain (runs on the worker's event loop, so it answers
        while ``run`` is busy in the actor thread)."""
        with self._lock:
            items = list(self._output)
            self._output.clear()
        return items

    def variables(self) -> list[str]:
        return sorted(k for k in self.namespace if not k.startswith("__"))


def run_cell(actor: Any, code: str, user_ns: dict[str, Any], write_out, write_err,
             poll: float = 0.1) -> dict:
    """Run ``code`` on ``actor``: send what it reads, stream its output, bring back what it
    assigns into ``user_ns``. Raises RemoteCellError with the remote traceback."""
    reads, writes = names_in(code)
    inputs = {name: user_ns[name] for name in reads - _IPYTHON_NAMES
              if name in user_ns and not name.startswith("_")
              and not hasattr(builtins, name)}
    future = actor.run(code, inputs, sorted(writes - _IPYTHON_NAMES))

    def flush() -> None:
        for stream, text in actor.drain().result():
            (write_out if stream == "stdout" else write_err)(text)

    while not future.done():
        flush()
        time.sleep(poll)  # output polling for the person watching, not synchronisation
    answer = future.result()
    flush()
    if answer["error"]:
        raise RemoteCellError("the cell failed on the worker:\n" + answer["error"])
    user_ns.update(answer["values"])
    for name, why in answer["skipped"].items():
        write_err(f"{name} stays on the worker: it cannot be sent back ({why})\n")
    return answer
