"""Context parallelism (diffusers' `enable_parallelism(ContextParallelConfig(...))`) around a site.

Under Ulysses, diffusers' templated attention exchanges q, k and v with one all-to-all each
(`_c10d_functional.all_to_all_single`, traced into the graph): every rank of the Ulysses group
then attends over the whole sequence with H/N heads, rank r holding heads [r*H/N, (r+1)*H/N) of
the model's order. Detection finds that all-to-all above the site's q (through the views and
copies diffusers puts around it) and records the slice (`UlyssesSlice`), so that planning gives
the rank the masks of its heads in the whole model's plan (policies/west_fast/parallel.py).

Ring attention (`ring_degree > 1`) passes key/value blocks around with all-gathers and merges
partial results through the op's log-sum-exp; a site whose k comes from an all-gather stays dense.

Collectives: `all_gather_heads` and `agree` are called by every rank of the group in the same
order (planning is deterministic given the graph, which every rank has alike), so they cannot
deadlock as long as every rank compiles the same graphs.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

RING_REASON = ("ring attention (ring_degree > 1): the sparse op would need to merge partial results "
               "through its log-sum-exp inside diffusers' ring template; kept dense")

# ops that only move a tensor's elements (or wait on a collective) between an all-to-all and the site
# (ring attention: k is a slice of a chunk of the all-gathered key/value buffer)
_PASS_THROUGH_METHODS = {"permute", "contiguous", "flatten", "reshape", "view", "transpose", "type_as", "to",
                         "chunk", "reshape_as"}
_MAX_HOPS = 16


@dataclasses.dataclass(frozen=True)
class UlyssesSlice:
    """Which of the model's heads a rank's site holds after the Ulysses all-to-all."""

    group_name: str  # the process group of the all-to-all, as the graph names it
    rank: int  # rank within the Ulysses group
    world: int  # Ulysses degree
    heads: tuple[int, ...]  # the model's heads this rank attends over, in the site's head order
    # graph internals (`permute_heads`): each of q, k, v as (B, S/N, H, D) before its all-to-all, with the
    # user on the way to it; the output as (B, S/N, H, D) after the all-to-all back
    heads_in: tuple[tuple[torch.fx.Node, torch.fx.Node], ...] = dataclasses.field(default=(), repr=False, compare=False)
    head_out: torch.fx.Node | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def total_heads(self) -> int:
        return len(self.heads) * self.world

    def group(self) -> dist.ProcessGroup:
        return _resolve_group(self.group_name)


def find_ulysses(site_node: torch.fx.Node, qkv: tuple[torch.fx.Node, ...], local_heads: int) -> UlyssesSlice | None:
    """The Ulysses slice of a site whose q comes from an all-to-all; None otherwise."""
    exchange = _collective_above(qkv[0], "all_to_all_single")
    if exchange is None:
        return None
    name = exchange.args[3] if len(exchange.args) > 3 else exchange.kwargs.get("group_name")
    group = _resolve_group(str(name))
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    first, total = rank * local_heads, local_heads * world
    heads_in = tuple(_head_major_above(_collective_above(x, "all_to_all_single"), total) for x in qkv)
    head_out = _head_major_below(site_node, total)
    if any(h is None for h in heads_in) or head_out is None:
        heads_in, head_out = (), None  # the heads cannot be permuted at this site
    return UlyssesSlice(str(name), rank, world, tuple(range(first, first + local_heads)), heads_in, head_out)


def _head_major_above(exchange: torch.fx.Node | None, total_heads: int) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the (B, S/N, H, D) tensor above the all-to-all, its user on the way there)."""
    user, node = exchange, exchange.args[0] if exchange is not None else None
    for _ in range(_MAX_HOPS):
        if not isinstance(node, torch.fx.Node):
            return None
        if _is_head_major(node, total_heads):
            return node, user
        if not (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS):
            return None
        user, node = node, node.args[0]
    return None


def _head_major_below(site_node: torch.fx.Node, total_heads: int) -> torch.fx.Node | None:
    """The site's output as (B, S/N, H, D) after the all-to-all back."""
    node, exchanged = site_node, False
    for _ in range(2 * _MAX_HOPS):
        if exchanged and _is_head_major(node, total_heads):
            return node
        if len(node.users) != 1:
            return None
        node = next(iter(node.users))
        exchanged = exchanged or str(node.target).startswith("_c10d_functional.all_to_all_single")
    return None


def _is_head_major(node: torch.fx.Node, total_heads: int) -> bool:
    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] == total_heads


def permute_heads(graph: torch.fx.Graph, ulysses: UlyssesSlice, order: tuple[int, ...]) -> UlyssesSlice:
    """Reorder the model's heads around the site's all-to-alls: q, k, v take heads in `order` before
    they are exchanged (so rank r receives heads order[r*H/N:(r+1)*H/N]), the output is put back in
    the model's order after it is exchanged back. The model computes the same function; every rank
    must apply the same order. Returns the slice this rank then holds."""
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    for node, user in ulysses.heads_in:
        user.replace_input_with(node, _gather_heads(graph, node, order))
    out = ulysses.head_out
    restored = _gather_heads(graph, out, inverse)
    for user in [u for u in out.users if u not in restored.args[0]]:
        user.replace_input_with(out, restored)
    per_rank = len(ulysses.heads)
    mine = order[ulysses.rank * per_rank:(ulysses.rank + 1) * per_rank]
    return dataclasses.replace(ulysses, heads=tuple(mine))


def _gather_heads(graph: torch.fx.Graph, node: torch.fx.Node, order: tuple[int, ...]) -> torch.fx.Node:
    """`torch.cat` of narrow slices of `node`'s head dim (2) in `order` (runs of consecutive heads together)."""
    runs: list[list[int]] = []
    for head in order:
        if runs and head == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([head, 1])
    anchor, parts = node, []
    for start, length in runs:
        with graph.inserting_after(anchor):
            anchor = graph.call_method("narrow", (node, 2, start, length))
        parts.append(anchor)
    with graph.inserting_after(anchor):
        joined = graph.call_function(torch.cat, (parts, 2))
    joined.meta["example_value"] = node.meta.get("example_value")
    return joined


def is_ring(k: torch.fx.Node) -> bool:
    """Whether the site's k comes from an all-gather (ring attention's key/value rotation)."""
    return _collective_above(k, "all_gather_into_tensor") is not None


def _collective_above(node: Any, name: str) -> torch.fx.Node | None:
    """The functional collective `name` a few element-moving ops above `node`, or None."""
    for _ in range(_MAX_HOPS):
        if not isinstance(node, torch.fx.Node):
            return None
        target = str(node.target)
        if node.op == "call_function" and target.startswith("_c10d_functional."):
            if target.startswith(f"_c10d_functional.{name}"):
                return node
            if not target.startswith("_c10d_functional.wait_tensor"):
                return None
        elif not (node.op == "call_method" and node.target in _PASS_THROUGH_METHODS
                  or node.op == "call_function" and node.target is operator.getitem):
            return None
        node = node.args[0] if node.args else None
    return None


def _resolve_group(name: str) -> dist.ProcessGroup:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


# ---------------------------------------------------------------------------------------
# Collectives of planning (every rank of the group calls them, in the same order)
# ---------------------------------------------------------------------------------------


def all_gather_heads(tensor: torch.Tensor, ulysses: UlyssesSlice, device: torch.device) -> torch.Tensor:
    """(H/N, ...) per rank -> (H, ...) in the model's head order (group rank order), on the host."""
    local = tensor.to(device).contiguous()
    parts = [torch.empty_like(local) for _ in range(ulysses.world)]
    dist.all_gather(parts, local, group=ulysses.group())
    return torch.cat(parts).cpu()


def agree(flag: bool, ulysses: UlyssesSlice, device: torch.device) -> bool:
    """True where `flag` holds on every rank of the group (so all ranks take the same branch)."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=ulysses.group())
    return bool(value.item())
