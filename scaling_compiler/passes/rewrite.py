"""Rewrite pass: replace each rewritable attention site by the block-sparse custom op.

The packed masks enter the graph as extra placeholders appended after the original inputs,
on a copy of the graph (dynamo's own GraphModule must not gain inputs in place). The caller
passes the mask tensors after the original arguments at every call.
"""
from __future__ import annotations

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.scaling_compiler)
from ..sites import AttentionSite

_OP = torch.ops.scaling_compiler.block_sparse_attention.default


def rewrite_graph(
    gm: torch.fx.GraphModule, sites: list[AttentionSite], mask_names: list[str]
) -> torch.fx.GraphModule:
    """Copy of `gm` in which the sites named in `mask_names` call the sparse op.

    The copy takes one extra input per name, in that order: the site's packed mask.
    """
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, copies)
    graph.output(output)

    by_name = {site.name: site for site in sites}
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last_input):
        mask_inputs = [graph.placeholder(f"scalingattn_mask_{i}") for i in range(len(mask_names))]
    mask_inputs.reverse()  # inserting_after stacks them in reverse order
    for placeholder, name in zip(mask_inputs, mask_names):
        _replace_site(graph, by_name[name], copies, placeholder)

    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _replace_site(graph: torch.fx.Graph, site: AttentionSite, copies: dict, mask: torch.fx.Node) -> None:
    node = copies[site.node]
    q, k, v = copies[site.q_node], copies[site.k_node], copies[site.v_node]
    with graph.inserting_before(node):
        key_padding = None
        if site.key_padding:
            key_padding = graph.call_method("reshape", (copies[site.mask_node], -1, site.kv_len))
        sparse = graph.call_function(_OP, (q, k, v, mask, site.scale, key_padding))
    sparse.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(sparse)
    _erase_dead_chain(graph, node, stop_at={q, k, v})


def _erase_dead_chain(graph: torch.fx.Graph, node: torch.fx.Node, stop_at: set[torch.fx.Node]) -> None:
    """Erase `node` and then each input that it left without users (the softmax chain).

    Only the replaced computation is removed; a global dead-code pass could drop
    side-effecting nodes that dynamo keeps.
    """
    pending = [node]
    while pending:
        current = pending.pop()
        removable = current.op in ("call_function", "call_method") and not current.is_impure()
        if current.users or not removable or current in stop_at:
            continue
        inputs = current.all_input_nodes
        graph.erase_node(current)
        pending.extend(inputs)
