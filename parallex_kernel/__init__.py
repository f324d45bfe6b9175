"""The Parallex Jupyter kernel: an ipykernel subclass whose dask work runs on the pool, with
the %parallex and %%remote magics. Install the kernelspec with
``python -m parallex_kernel install [--user | --sys-prefix]``."""
