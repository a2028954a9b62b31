"""The linear-attention branch of SALAD and its per-model container.

Per site, beside the sparse attention and on the same q, k, v (B, H, S, D):

    O = O_sparse + g * Proj(O_linear)
    O_linear = phi_q(q) (phi_k(k)^T v) / (phi_q(q) . sum_j phi_k(k_j))         (per head, O(S D^2))
    phi_q(q) = ReLU(q A_h),  phi_k(k) = ReLU(k B_h)                              (A_h, B_h: D x D per head)
    g = sigmoid(w . mean_tokens(q) + b)                                          (a scalar per sample)

`Proj` is a (H*D x H*D) linear over each token's heads, zero-initialised: a fresh branch adds
exactly zero, so a freshly compiled model equals the sparse-only one. The feature maps A_h, B_h
(separate for queries and keys, as the model's own W_q and W_k are) start at the identity, so a
fresh branch's features are ReLU(q), ReLU(k); tuning them lets each head choose the directions
its ReLU cuts (a learnable feature map, as Hedgehog's; at 5x32x32 tuning they lowered the held-out
distillation loss by 10% at equal data). Linear attention is permutation-equivariant over tokens
and the gate pools over them, so the branch is the same in any token order (it runs after the
reorder pass's gathers). Parameters are float32; the branch computes in the activations' dtype
(bf16 on the GPU: its matmuls run on the tensor cores).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EPS = 1e-6  # the ReLU normaliser can be 0 (a query with no positive feature)
FEATURE_MAPS = ("q_map", "k_map")  # the per-head feature maps; files written before them have neither
BRANCHES_KEY = "scalingattn_linear_branches"  # header metadata: site key -> [heads, head_dim]


class LinearBranchMismatch(ValueError):
    """Tuned branch weights that do not fit the compiled model (site names or shapes)."""


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """ReLU linear attention per (batch, head): (B, H, S, D) -> (B, H, S, D), never S x S.

    `key_padding` bool (B or 1, S): False drops that key (as the sparse op does). The (D x D) state
    and the key sum are means over the keys (the ratio is the same; fp16 cannot overflow at tens of
    thousands of tokens), computed by matmuls in the inputs' dtype, which accumulate in float32
    (tensor cores on the GPU: in float32 the branch took 28% of a Wan2.1-1.3B step on an H200); the
    key sum is reduced in float32 and the division done in float32.
    """
    tokens = k.shape[2]
    phi_q = torch.relu(q)
    phi_k = torch.relu(k) * (1.0 / tokens)
    if key_padding is not None:
        phi_k = phi_k * key_padding[:, None, :, None].to(phi_k.dtype)
    state = phi_k.transpose(-1, -2) @ v.to(phi_k.dtype)  # (B, H, D, Dv)
    key_mean = phi_k.sum(2, dtype=torch.float32)  # (B, H, D)
    numerator = phi_q @ state  # (B, H, S, Dv)
    # a reduction, not a matmul: inductor fuses it with the ReLU and never stores phi(q) in float32
    denominator = (phi_q.float() * key_mean[:, :, None, :]).sum(-1, keepdim=True)  # (B, H, S, 1)
    return (numerator.float() / (denominator + EPS / tokens)).to(v.dtype)


def identity_maps(heads: int, head_dim: int) -> torch.Tensor:
    """(heads, head_dim, head_dim) identity matrices: feature maps that leave q and k as they are."""
    return torch.eye(head_dim).expand(heads, head_dim, head_dim).clone()


class LinearBranch(nn.Module):
    """One site's branch: identity-initialised per-head feature maps of q and k, a zero-initialised
    projection of the linear-attention output, and a gate."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.gate = nn.Linear(width, 1)
        self.q_map = nn.Parameter(identity_maps(heads, head_dim))  # (H, D, D): features ReLU(q A_h)
        self.k_map = nn.Parameter(identity_maps(heads, head_dim))  # (H, D, D): features ReLU(k B_h)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse_out: torch.Tensor,
                key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """`sparse_out` (B, H, S, D) plus the gated, projected linear attention of q, k, v."""
        B, H, S, D = q.shape
        dtype = sparse_out.dtype
        mapped_q, mapped_k = q @ self.q_map.to(q.dtype), k @ self.k_map.to(k.dtype)  # (B, H, S, D) @ (H, D, D)
        tokens = linear_attention(mapped_q, mapped_k, v, key_padding).transpose(1, 2).reshape(B, S, H * D)
        projected = nn.functional.linear(tokens, self.proj.weight.to(dtype), self.proj.bias.to(dtype))
        pooled = q.mean(2).reshape(B, H * D)  # (B, H*D): the gate's view of this sample
        gate = torch.sigmoid(nn.functional.linear(pooled.float(), self.gate.weight, self.gate.bias)).to(dtype)
        extra = (gate[:, :, None] * projected).reshape(B, S, H, D).transpose(1, 2)
        return sparse_out + extra


def module_key(site_name: str) -> str:
    """A site's name as a ModuleDict key (no dots): "blocks.0.attn1" -> "blocks__0__attn1"."""
    return site_name.replace(".", "__")


class LinearBranches(nn.Module):
    """The branches of every site a backend compiled, by site name.

    Hand `.parameters()` to an optimizer; `save(path)` writes them as safetensors (with each site's
    name and shape), and the option `linear_branch_weights=path` loads them into a later compile.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites = nn.ModuleDict()

    def branch_for(self, site_name: str, heads: int, head_dim: int, device: torch.device,
                   weights: "BranchWeights | None") -> tuple[str, LinearBranch]:
        """The site's branch (created on first use, with `weights` loaded if given) and its key."""
        key = module_key(site_name)
        if key in self.sites:
            branch = self.sites[key]
            if (branch.heads, branch.head_dim) != (heads, head_dim):
                raise LinearBranchMismatch(f"site {site_name!r} was compiled with {branch.heads} heads of "
                                           f"{branch.head_dim}, now {heads} heads of {head_dim}")
            return key, branch
        branch = LinearBranch(heads, head_dim).to(device)
        if weights is not None:
            weights.load_into(site_name, key, branch)
        self.sites[key] = branch
        return key, branch

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write every branch's parameters to a safetensors file; `metadata` (string values, e.g. the
        density tuned at) goes into its header beside the branches' shapes (`read_metadata`)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {name: p.detach().float().cpu().contiguous() for name, p in self.state_dict().items()}
        shapes = {key: [b.heads, b.head_dim] for key, b in self.sites.items()}
        header = dict(metadata or {})
        if BRANCHES_KEY in header:
            raise ValueError(f"metadata key {BRANCHES_KEY!r} is the branches' own")
        save_file(tensors, str(path), metadata=header | {BRANCHES_KEY: json.dumps(shapes)})
        return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a branch file written by `LinearBranches.save` (tensors not loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


class BranchWeights:
    """Tuned branch weights read from a safetensors file (option `linear_branch_weights`)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"option 'linear_branch_weights': no file {str(self.path)!r}")
        with safe_open(str(self.path), framework="pt") as f:
            metadata = f.metadata() or {}
            if BRANCHES_KEY not in metadata:
                raise LinearBranchMismatch(f"{self.path} holds no linear branches (not written by LinearBranches.save)")
            self.shapes = {k: tuple(v) for k, v in json.loads(metadata[BRANCHES_KEY]).items()}
            self.tensors = {name: f.get_tensor(name) for name in f.keys()}

    def load_into(self, site_name: str, key: str, branch: LinearBranch) -> None:
        if key not in self.shapes:
            raise LinearBranchMismatch(f"{self.path} has no branch for site {site_name!r} "
                                       f"(it has {sorted(self.shapes)})")
        if self.shapes[key] != (branch.heads, branch.head_dim):
            heads, head_dim = self.shapes[key]
            raise LinearBranchMismatch(f"{self.path}: site {site_name!r} was tuned with {heads} heads of {head_dim}, "
                                       f"the model has {branch.heads} heads of {branch.head_dim}")
        prefix = f"sites.{key}."
        state = {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}
        if state and not any(name in state for name in FEATURE_MAPS):
            # written before the branch had feature maps: its features were ReLU(q), ReLU(k), which
            # identity maps reproduce exactly
            log.info("%s: site %r has no feature maps (an older branch file): identity maps", self.path, site_name)
            state |= {name: identity_maps(branch.heads, branch.head_dim) for name in FEATURE_MAPS}
        branch.load_state_dict(state)  # strict: a missing or extra tensor is an error naming it
        log.info("linear branch of %s loaded from %s", site_name, self.path)
