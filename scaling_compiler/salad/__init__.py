"""SALAD: a gated linear-attention branch beside each sparse attention site (option `linear_branch`).

`branch.py`: the branch (`LinearBranch`: `O = O_sparse + g * Proj(O_linear)` on the site's q, k, v)
and `LinearBranches`, the backend's container of them (one per site, a `torch.nn.Module` to hand to
an optimizer and to save as safetensors). The pass that attaches them to the planned sites is
`passes/linear_branch.py`.
"""
from .branch import LinearBranch, LinearBranches, LinearBranchMismatch, linear_attention, read_metadata

__all__ = ["LinearBranch", "LinearBranches", "LinearBranchMismatch", "linear_attention", "read_metadata"]
