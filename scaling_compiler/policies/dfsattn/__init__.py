"""The dfsattn policy (DFSAttn): block masks scored at run time from q and k, cached over steps."""
