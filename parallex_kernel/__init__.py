"""The Parallex Jupyter kernel (an ipykernel subclass and its magics) — built in issue 4, as a
thin layer over federation.FederatedCluster."""
