"""Parallex federation: the broker, provider agents and the FederatedCluster users work with."""

from typing import TYPE_CHECKING

from .errors import (
    BrokerError,
    BrokerUnreachable,
    CreditLimitExceeded,
    LeaseStartTimeout,
    NoProviderFits,
    NotFound,
    ParallexError,
    PermissionDenied,
    QuotaExceeded,
    RequestRejected,
    TokenRefused,
)

__all__ = [
    "BrokerError",
    "BrokerUnreachable",
    "CreditLimitExceeded",
    "FederatedCluster",
    "LeaseStartTimeout",
    "NoProviderFits",
    "NotFound",
    "ParallexError",
    "PermissionDenied",
    "QuotaExceeded",
    "RequestRejected",
    "TokenRefused",
]

if TYPE_CHECKING:
    from .cluster import FederatedCluster


def __getattr__(name: str):
    # FederatedCluster pulls in dask and distributed (~0.4 s, and federation.config loads the
    # parallex.yaml defaults into dask.config); importing it on first use keeps light users of
    # the package (the kernel's start, the CLI's help) fast.
    if name == "FederatedCluster":
        from .cluster import FederatedCluster

        return FederatedCluster
    raise AttributeError(f"module 'federation' has no attribute {name!r}")
