"""qnalo's hot ops (installed as qnalo.kernels). One module per op: a plain-NumPy reference (`*_ref`)
beside each Numba kernel, both with the same signature."""
