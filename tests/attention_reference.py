"""Eager reference for a compiled model: the same forward with each sparse site's mask applied.

`masked_sites(report)` is a TorchFunctionMode that walks the model's attention calls in
execution order (the order of `report.sites`) and, for sites the backend made sparse, runs
float64 attention restricted to the site's kept blocks (and its key-padding mask) instead.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, unpack_block_mask
from scaling_compiler.policies.token_order import inverse_permutation, sequence_order


def token_mask(words: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """bool (H, Sq, Sk) from packed words (H, Nq, W)."""
    blocks = unpack_block_mask(words.cpu(), -(-kv_len // BLOCK_SIZE))
    return blocks.repeat_interleave(BLOCK_SIZE, 1).repeat_interleave(BLOCK_SIZE, 2)[:, :q_len, :kv_len]


def model_order_mask(words: torch.Tensor, site) -> torch.Tensor:
    """bool (..., S, S) token mask in the model's token order from packed words (..., Nq, W) in the
    site's (a reordered site's masks are in its curve order)."""
    seq = site.shape[2]
    blocks = unpack_block_mask(words.cpu(), num_blocks(seq))
    tokens = blocks.repeat_interleave(BLOCK_SIZE, -2).repeat_interleave(BLOCK_SIZE, -1)[..., :seq, :seq]
    inverse = inverse_permutation(sequence_order(seq, site.token_grid, site.text_spans, site.token_order))
    return tokens[..., inverse, :][..., inverse]  # the model's token i sits at position inverse[i]


class masked_sites(TorchFunctionMode):
    def __init__(self, report, timestep=None, token_masks=None):
        """`timestep`: the model's timestep input (picks the step's masks; None: the first step).
        `token_masks`: bool (B or 1, H, Sq, Sk) per sparse site, in the model's token order, instead
        of the report's masks (DFSAttn's run-time masks, masks of a reordered site)."""
        super().__init__()
        self.sites, self.calls = report.sites, 0
        self.masks = report.masks_at(timestep) if token_masks is None else {}
        self.token_masks = token_masks or {}

    def _next_site(self):
        site = self.sites[self.calls]
        self.calls += 1
        return site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            site = self._next_site()
            if site.status == "sparse":
                bound = dict(zip(("query", "key", "value", "attn_mask"), args)) | kwargs
                return self._sparse(site, bound["query"], bound["key"], bound["value"],
                                    bound.get("attn_mask"), bound.get("scale"))
        if func in (torch.softmax, F.softmax, torch.Tensor.softmax):
            site = self._next_site()
            if site.status == "sparse":
                scores = args[0]
                allowed = self._allowed(site, scores.shape[-2], scores.shape[-1])
                return func(scores.masked_fill(~allowed, float("-inf")), *args[1:], **kwargs)
        return func(*args, **kwargs)

    def _allowed(self, site, q_len, kv_len):
        if site.name in self.token_masks:
            return self.token_masks[site.name]
        return token_mask(self.masks[site.name], q_len, kv_len)

    def _sparse(self, site, q, k, v, attn_mask, scale):
        allowed = self._allowed(site, q.shape[-2], k.shape[-2])
        if attn_mask is not None:  # the key-padding (or separable padding) mask the backend honours
            valid = attn_mask if attn_mask.dtype == torch.bool else ~torch.isneginf(attn_mask)  # additive 0/-inf
            allowed = allowed & valid.cpu()
        out = F.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=allowed.to(q.device), scale=scale
        )
        return out.to(q.dtype)


class AllReports:
    """The sites and masks of every graph a backend compiled, in execution order (the model breaks
    into several graphs; `masked_sites` walks the attention calls of the whole forward)."""

    def __init__(self, reports):
        self.sites = [site for report in reports for site in report.sites]
        self._reports = reports

    def masks_at(self, timestep):
        masks = {}
        for report in self._reports:
            masks.update(report.masks_at(timestep))
        return masks


class NumberedReports(AllReports):
    """AllReports whose site names carry their graph's index: the compiles of one dynamo graph for
    several blocks (repeated blocks, cache hooks: per_weights.py) name their sites alike."""

    def __init__(self, reports):
        super().__init__(reports)
        self.sites = [dataclasses.replace(s, name=f"{r.graph_index}:{s.name}") for r in reports for s in r.sites]

    def masks_at(self, timestep):
        return {f"{r.graph_index}:{name}": m for r in self._reports for name, m in r.masks_at(timestep).items()}
