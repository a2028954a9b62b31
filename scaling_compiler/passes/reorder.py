"""Reorder pass: each rewritable site attends over its video tokens along a space-filling curve.

On a copy of the graph, the q, k, v (and key-padding mask) of every rewritable site whose token
grid is known are gathered along the sequence by the site's permutation
(`policies.token_order.sequence_order`: video tokens reordered, text tokens of joint attention
in place), and the attention output is gathered back by the inverse permutation, so that each
128-token block is a compact box of the video. Attention is permutation-equivariant, so the
graph computes the same function; only the block masks see the new order. The permutations
are buffers of the copied GraphModule (get_attr constants): the graph's inputs do not change,
so calibration runs it as it is, and inductor fuses each gather into a neighbouring kernel.

The returned sites point at the copy's nodes, with `q_node`, `k_node`, `v_node` and
`mask_node` at the gathered tensors: WEST calibration and DFSAttn scoring see the tokens in the
new order, and every mask built from them is in that order.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Collection

import torch
import torch.fx

from ..policies.token_order import TokenOrder, inverse_permutation, sequence_order
from ..sites import GraphRecord, Pattern, Site

log = logging.getLogger(__name__)

_SEQ_DIM = 2  # q, k, v and the attention output are (B, H, S, D)
_MASK_SEQ_DIM = 3  # a key-padding attn_mask is (B, 1, 1, Sk)
_MAX_CHAIN_NODES = 64  # a hand-written softmax(q @ k^T * c) @ v chain is a handful of nodes
_QUERY_PADDING_DIM = 2  # a separable mask's query padding is (B, 1, Sq, 1)
_NODE_FIELDS = ("node", "q_node", "k_node", "v_node", "mask_node", "query_padding_node")


def reorder(graph: GraphRecord) -> None:
    """The reorder pass: every rewritable site with a token grid sees its tokens in the configured order."""
    graph.gm, graph.sites = reorder_sites(graph.gm, graph.sites, graph.config.token_order)


def reorder_sites(
    gm: torch.fx.GraphModule, sites: list[Site], order: TokenOrder | str, names: Collection[str] | None = None
) -> tuple[torch.fx.GraphModule, list[Site]]:
    """A copy of `gm` whose rewritable sites with a token grid (those in `names`, if given) see their
    tokens in `order`, and the sites pointing at the copy's nodes. Raster order (or no such site)
    returns both unchanged."""
    order = TokenOrder(order)
    movable = {site.name for site in sites if site.rewritable and site.token_grid is not None
               and (names is None or site.name in names)}
    if order is TokenOrder.RASTER or not movable:
        return gm, sites
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    reordered = torch.fx.GraphModule(gm, graph)
    first_op = next(node for node in graph.nodes if node.op != "placeholder")
    permutations: dict[tuple, tuple[torch.fx.Node, torch.fx.Node]] = {}
    result = []
    for site in sites:
        moved = dataclasses.replace(site, **{f: _copied(getattr(site, f), copies) for f in _NODE_FIELDS})
        if site.name in movable:
            key = (site.q_len, site.token_grid, site.text_spans, site.device)
            if key not in permutations:
                permutations[key] = _add_permutation(reordered, first_op, len(permutations), key, order)
            moved = _reorder(graph, moved, *permutations[key], order)
        result.append(moved)
    graph.lint()
    reordered.recompile()
    log.debug("token order %s around %d sites (%d permutations)", order.value, len(movable), len(permutations))
    return reordered, result


def _copied(node, copies: dict[torch.fx.Node, torch.fx.Node]):
    return copies[node] if isinstance(node, torch.fx.Node) else node


def _add_permutation(gm: torch.fx.GraphModule, first_op: torch.fx.Node, index: int, key: tuple, order: TokenOrder
                     ) -> tuple[torch.fx.Node, torch.fx.Node]:
    """get_attr nodes of the permutation of `key` = (length, grid, text spans, device) and its inverse."""
    length, grid, text_spans, device = key
    perm = sequence_order(length, grid, text_spans, order)
    nodes = []
    for name, tensor in ((f"scalingattn_order_{index}", perm), (f"scalingattn_order_{index}_inverse",
                                                                inverse_permutation(perm))):
        gm.register_buffer(name, tensor.to(device))
        with gm.graph.inserting_before(first_op):
            nodes.append(gm.graph.get_attr(name))
    return nodes[0], nodes[1]


def _reorder(graph: torch.fx.Graph, site: Site, perm: torch.fx.Node, inverse: torch.fx.Node,
             order: TokenOrder) -> Site:
    """Gather the site's inputs by `perm` where the attention reads them, and its output back by `inverse`."""
    node = site.node
    sources = {site.q_node: _SEQ_DIM, site.k_node: _SEQ_DIM, site.v_node: _SEQ_DIM}
    if site.key_padding:
        sources[site.mask_node] = _MASK_SEQ_DIM
    if site.query_padding_node is not None:
        sources[site.query_padding_node] = _QUERY_PADDING_DIM
    readers = [node] if site.pattern is Pattern.SDPA else _chain(node, set(sources))
    position = {n: i for i, n in enumerate(graph.nodes)}
    gathered = {}
    for source, dim in sources.items():
        users = [reader for reader in readers if source in reader.all_input_nodes]
        # padding vectors of a separable mask are read by the rewritten op only: gathered before the site
        with graph.inserting_before(min(users, key=position.__getitem__) if users else node):
            gathered[source] = _gather(graph, source, dim, perm, node)
        for reader in users:
            reader.replace_input_with(source, gathered[source])
    with graph.inserting_after(node):
        output = _gather(graph, node, _SEQ_DIM, inverse, node)
    node.replace_all_uses_with(output, delete_user_cb=lambda user: user is not output)
    return dataclasses.replace(
        site, q_node=gathered[site.q_node], k_node=gathered[site.k_node], v_node=gathered[site.v_node],
        mask_node=gathered.get(site.mask_node, site.mask_node),
        query_padding_node=gathered.get(site.query_padding_node, site.query_padding_node), token_order=order.value,
    )


def _gather(graph: torch.fx.Graph, source: torch.fx.Node, dim: int, index: torch.fx.Node, site_node: torch.fx.Node
            ) -> torch.fx.Node:
    gather = graph.call_function(torch.index_select, (source, dim, index))
    gather.meta.update({k: v for k, v in site_node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return gather


def _chain(node: torch.fx.Node, sources: set[torch.fx.Node]) -> list[torch.fx.Node]:
    """The nodes of a hand-written attention from its q, k, v (`sources`) to its output `node`."""
    seen, queue = {node}, deque([node])
    while queue:
        current = queue.popleft()
        for parent in current.all_input_nodes:
            if parent in seen or parent in sources or parent.op in ("placeholder", "get_attr"):
                continue
            if len(seen) >= _MAX_CHAIN_NODES:
                raise RuntimeError(f"attention chain ending at {node.name} is longer than {_MAX_CHAIN_NODES} nodes")
            seen.add(parent)
            queue.append(parent)
    return list(seen)
