"""Install the "Parallex" kernelspec: python -m parallex_kernel install [--user | --sys-prefix]."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

KERNEL_NAME = "parallex"


def spec() -> dict:
    return {"argv": [sys.executable, "-m", "parallex_kernel", "-f", "{connection_file}"],
            "display_name": "Parallex", "language": "python",
            "metadata": {"debugger": False}}


def install(user: bool = False, prefix: str | None = None) -> str:
    """Write the kernelspec; returns the folder it went to."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(spec(), indent=1))
        return KernelSpecManager().install_kernel_spec(tmp, KERNEL_NAME, user=user,
                                                       prefix=prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallex_kernel install",
                                     description="Install the Parallex kernelspec.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="Into the user's Jupyter folder.")
    where.add_argument("--sys-prefix", action="store_true",
                       help="Into this Python environment (sys.prefix); the default.")
    where.add_argument("--prefix", help="Into this prefix.")
    args = parser.parse_args(argv)
    prefix = args.prefix or (None if args.user else sys.prefix)
    print(f"Installed the Parallex kernel in {install(user=args.user, prefix=prefix)}")
    return 0
