"""Client-side configuration: the commented parallex.yaml defaults loaded into dask.config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

_DEFAULTS_FILE = Path(__file__).with_name("parallex.yaml")

with _DEFAULTS_FILE.open() as _f:
    _defaults = yaml.safe_load(_f)

dask.config.update_defaults(_defaults)
dask.config.ensure_file(source=str(_DEFAULTS_FILE))


def get(key: str, default: Any = None) -> Any:
    """Return ``parallex.<key>`` from dask config (environment variables already applied)."""
    return dask.config.get(f"parallex.{key}", default=default)


def broker_url(explicit: str | None = None) -> str | None:
    """The broker URL: argument, then PARALLEX_BROKER_URL, then dask config."""
    return explicit or os.environ.get("PARALLEX_BROKER_URL") or get("broker-url")


def token(explicit: str | None = None) -> str | None:
    """The API token: argument, then PARALLEX_TOKEN, then dask config, then the JupyterHub
    server's own token (a hub gives it the broker's scope), so code in a user's server — a
    notebook, or dask-labextension's "new cluster" button — needs no token of its own."""
    return (explicit or os.environ.get("PARALLEX_TOKEN") or get("token")
            or os.environ.get("JUPYTERHUB_API_TOKEN"))
