"""The exceptions a Parallex user can meet, as one small hierarchy.

    ParallexError
    ├── BrokerUnreachable       the broker did not answer (network, wrong URL, broker down)
    ├── TokenRefused            401: the token is unknown, revoked or malformed
    ├── PermissionDenied        403: the token is valid but may not do this
    │   └── QuotaExceeded       the lab's or user's concurrent CPU/GPU quota is full
    ├── NotFound                404: the cluster, lease or lab does not exist
    ├── RequestRejected         4xx: the request was malformed; the message says what to fix
    │   ├── NoProviderFits      no provider in the federation could ever host the asked worker
    │   ├── CreditLimitExceeded 402: the lab's balance is below minus its credit limit
    │   └── EnvironmentRefused  no provider can build or run the cluster's software environment
    ├── LeaseStartTimeout       leases were granted but their workers did not start in time
    ├── BrokerError             5xx or an unexpected answer from the broker
    └── DatabaseUnavailable     a server command could not open its database (bad URL, server
                                down, login refused)
"""

from __future__ import annotations


class ParallexError(Exception):
    """Base class of every error Parallex raises on purpose."""


class BrokerUnreachable(ParallexError):
    """The broker could not be reached at the configured URL."""


class TokenRefused(ParallexError):
    """The broker refused the token (HTTP 401)."""


class PermissionDenied(ParallexError):
    """The token is valid but does not allow this action (HTTP 403)."""


class QuotaExceeded(PermissionDenied):
    """The lab or the user already holds as many CPUs or GPUs as their quota allows."""


class NotFound(ParallexError):
    """The named object does not exist (HTTP 404)."""


class RequestRejected(ParallexError):
    """The broker rejected the request as malformed or impossible (HTTP 4xx)."""

    def __init__(self, message: str, status_code: int = 400, code: str = "bad-request"):
        super().__init__(message)
        self.status_code = status_code
        self.code = code

    def __reduce__(self):
        # Crosses from the scheduler process to the user's with its status and code.
        return (type(self), (str(self), self.status_code, self.code))


class NoProviderFits(RequestRejected):
    """No provider in the federation has enough capacity for one worker of the asked size."""


class CreditLimitExceeded(RequestRejected):
    """The lab's balance is below minus its credit limit; running workers keep running."""


class EnvironmentRefused(RequestRejected):
    """No provider the cluster may use can build or run its software environment (a package
    missing from a lab's index, another Python version, a fixed agent's other Dask); the
    message names the package or versions and the lab. Nothing was billed."""


class LeaseStartTimeout(ParallexError, TimeoutError):
    """Workers were asked for but did not connect within the lease start timeout (also a
    ``TimeoutError``, as Dask's own start timeouts are)."""


class BrokerError(ParallexError):
    """The broker failed (HTTP 5xx) or answered something this client does not understand."""


class DatabaseUnavailable(ParallexError):
    """The broker, the dashboards or `parallex db` could not open the database they were given."""
