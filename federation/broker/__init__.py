"""The federation broker: a FastAPI app that places leases and never runs user code."""
