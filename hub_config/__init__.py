"""JupyterHub configuration and the institutional OpenID Connect authenticator — issue 4."""
