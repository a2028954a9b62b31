"""Benchmarks of the attention policies: WEST, the FAST fit, DFSAttn."""
