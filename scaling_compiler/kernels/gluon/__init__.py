"""Kernels in Gluon (``triton.experimental.gluon``), Triton's lower-level language, for what ``tl``
cannot express: warp-specialised partitions, asynchronous wgmma groups and TMA reductions.

- ``block_sparse_attention.py``: the forward, FA3-style; ``kernels/dispatch.py`` runs its FP8 path
  (with V's keys permuted so that P needs no shuffle) as the FP8 op on Hopper where
  ``fp8_unsupported_reason`` allows; its 16-bit path is timed against the ``tl`` forward, which the package runs.
- ``block_sparse_attention_bwd.py``: the one-pass backward on Hopper (sm_90), dq by TMA reductions;
  ``kernels/dispatch.py`` runs it instead of the ``tl`` backward where ``unsupported_reason`` allows.
- ``tma.py``: TMA views and descriptors of the ``(B, H, S, D)`` operands.

Gluon compiles only for a GPU (no interpreter): CI compiles these kernels for sm_90 on the CPU
(``tests/benchmarks/test_gluon_dry_runs.py``); their GPU tests (``tests/kernels/test_gluon_forward.py``,
``tests/kernels/test_gluon_backward.py``) run on a Hopper GPU.
"""
