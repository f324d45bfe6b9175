"""The federation broker: a FastAPI app that places leases and never runs user code."""

#: Where the broker's API lives under its URL.
API_PREFIX = "/api/v1"
