"""Parallex federation: the broker, provider agents and the FederatedCluster users work with."""

from . import config  # noqa: F401  (loads the parallex.yaml defaults into dask.config)
from .cluster import FederatedCluster
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
