"""Parallex kernels started through jupyter_client, as a notebook server starts them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from parallex_kernel.install import install


@dataclass
class Reply:
    """What one execute request produced."""

    status: str
    stdout: str = ""
    stderr: str = ""
    chunks: list[str] = field(default_factory=list)  # stdout messages, in arrival order
    error: str = ""


def kernel_specs(tmp: Path) -> KernelSpecManager:
    """A spec manager that sees the Parallex kernelspec installed into ``tmp``."""
    install(prefix=str(tmp))
    return KernelSpecManager(kernel_dirs=[str(tmp / "share" / "jupyter" / "kernels")])


@contextlib.contextmanager
def parallex_kernel(tmp: Path, env: dict[str, str]) -> Iterator[tuple[KernelManager, object]]:
    """Start the kernel with ``env`` added to this process's environment; always shut down."""
    km = KernelManager(kernel_name="parallex", kernel_spec_manager=kernel_specs(tmp))
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PARALLEX_") and k != "JUPYTERHUB_API_TOKEN"}
    km.start_kernel(env={**clean, **env})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def run(kc, code: str, timeout: float = 120) -> Reply:
    """Execute ``code`` and collect its output."""
    reply = Reply(status="")

    def hook(msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            if content["name"] == "stdout":
                reply.stdout += content["text"]
                reply.chunks.append(content["text"])
            else:
                reply.stderr += content["text"]
        elif kind == "error":
            reply.error = "\n".join(content["traceback"])

    answer = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    reply.status = answer["content"]["status"]
    return reply
