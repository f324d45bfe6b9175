"""Where the kernel's Dask and Parallex logging goes: a file, not the notebook.

A notebook cell's output should hold what the user printed and what they must act on. Without
this every worker registration and shuffle notice (the client's and the cluster's, whose
scheduler process appends to the same file) would land in red under the cell. INFO and above
go to ``$PARALLEX_LOG_DIR/kernel-<pid>.log`` (default ``~/.parallex/logs``); only errors of
Parallex itself still reach the cell.
`%parallex log` shows the file's tail.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

#: Loggers whose records go to the kernel's log file instead of the cell.
QUIET_LOGGERS = ("distributed", "parallex", "federation", "bokeh", "tornado")


def log_path() -> Path:
    """This kernel's log file."""
    folder = Path(os.environ.get("PARALLEX_LOG_DIR") or Path.home() / ".parallex" / "logs")
    return folder / f"kernel-{os.getpid()}.log"


def send_logging_to_file() -> Path:
    """Route the Dask and Parallex loggers to this kernel's log file (call after importing
    distributed, which installs its own stderr handler on import)."""
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    to_file.setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.addHandler(to_file)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    # Errors of Parallex itself are still the user's business.
    shout = logging.StreamHandler()
    shout.setLevel(logging.ERROR)
    shout.setFormatter(logging.Formatter("Parallex: %(message)s"))
    logging.getLogger("parallex").addHandler(shout)
    return path


def tail(lines: int = 40) -> str:
    """The last ``lines`` lines of this kernel's log file, or a sentence when there is none."""
    path = log_path()
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines)).rstrip("\n")
    except FileNotFoundError:
        return f"(no log yet: {path})"
