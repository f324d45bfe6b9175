"""Which names a %%remote cell sends and brings back."""

from parallex_kernel.remote import names_in


def test_reads_and_writes_of_a_cell():
    reads, writes = names_in(
        "import numpy as np\n"
        "from os import path\n"
        "total = sum(values) + offset\n"
        "model['runs'] = 1\n"
        "cfg.opts.level = 2\n"
        "def fit(x):\n    return x * scale\n"
        "class Box:\n    pass\n"
        "for i in range(n):\n    total += i\n")
    assert {"values", "offset", "model", "cfg", "scale", "n", "total"} <= reads
    assert writes >= {"np", "path", "total", "model", "cfg", "fit", "Box", "i"}
    assert "values" not in writes and "scale" not in writes
