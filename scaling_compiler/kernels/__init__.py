"""Block-sparse attention kernels, behind one seam.

- `bitmask.py`: the mask format (128x128 blocks, bit-packed rows), pack/unpack, FlexAttention conversion.
- `reference.py`: pure-torch references (float64 dense; the block-wise path that runs on CPU).
- `block_mass.py`: WEST's calibration reduction (torch path; the Triton kernel on CUDA).
- `dispatch.py`: which implementation runs given tensors, or why none can; runs it.
- `triton/`: the Triton implementation (forward, mask decode, configs, block mass); a backward
  kernel goes there too (`triton/block_sparse_attention_bwd.py`).

Nothing here imports the compiler passes or policies.
"""
