"""Sparsity policies other than WEST+FAST: token orders and DFSAttn's run-time block selection."""
