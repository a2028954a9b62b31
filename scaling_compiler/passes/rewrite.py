"""Rewrite pass: replace each planned attention site by the block-sparse custom op.

The packed masks enter the graph as extra placeholders appended after the original inputs,
on a copy of the graph (dynamo's own GraphModule must not gain inputs in place). The caller
passes the returned tensors after the original arguments at every call. A site whose
masks vary by step gets its masks at every density plus the per-step choice, and the graph
picks the step's masks from the timestep input (`ops.step_masks`).

With the DFSAttn policy (`rewrite_graph_dfs`) the sites call the DFSAttn op instead, which takes
the timestep input and an int naming the site's run-time state; the graph gains no input.
"""
from __future__ import annotations

import torch
import torch.fx

from .. import ops  # noqa: F401  (registers torch.ops.scaling_compiler)
from ..sites import AttentionSite
from .tune import SitePlan

_OP = torch.ops.scaling_compiler.block_sparse_attention.default
_DFS_OP = torch.ops.scaling_compiler.dfs_attention.default
_STEP_MASKS_OP = torch.ops.scaling_compiler.step_masks.default


def rewrite_graph(
    gm: torch.fx.GraphModule,
    sites: list[AttentionSite],
    plans: dict[str, SitePlan],
    timestep_input: int | None = None,
    timesteps: torch.Tensor | None = None,
) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Copy of `gm` in which the sites in `plans` call the sparse op, and its extra inputs.

    `timestep_input` is the position of the model's timestep among the graph inputs, and
    `timesteps` (steps,) the timestep of each schedule step; both are needed when a plan
    varies by step.
    """
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    output = graph.graph_copy(gm.graph, copies)
    graph.output(output)

    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    timestep = inputs[timestep_input] if timestep_input is not None else None
    extra: list[torch.Tensor] = []
    anchor = inputs[-1]
    step_times = None  # placeholder of `timesteps`, added with the first step-varying site
    for site in sites:
        plan = plans.get(site.name)
        if plan is None:
            continue
        words = plan.words.to(site.device)  # (L, H, Nq, W)
        if plan.static:  # one step: each head's own level
            tensors = [words[plan.level_index[0].to(site.device), torch.arange(site.heads, device=site.device)]]
        else:
            tensors = [words, plan.level_index.to(site.device)]
        placeholders = []
        for tensor in tensors:
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(f"scalingattn_{len(extra)}")
            placeholders.append(anchor)
            extra.append(tensor)
        if plan.static:
            mask = placeholders[0]
        else:
            if timestep is None or timesteps is None:
                raise ValueError(f"site {site.name}: masks vary by step but the graph has no timestep input")
            if step_times is None:
                with graph.inserting_after(anchor):
                    anchor = step_times = graph.placeholder("scalingattn_timesteps")
                extra.append(timesteps.to(site.device))
            with graph.inserting_before(copies[site.node]):
                mask = graph.call_function(_STEP_MASKS_OP, (*placeholders, timestep, step_times))
        _replace_site(graph, site, copies, _OP, (mask,))

    graph.lint()
    return torch.fx.GraphModule(gm, graph), extra


def rewrite_graph_dfs(
    gm: torch.fx.GraphModule, sites: list[AttentionSite], site_ids: dict[str, int], timestep_input: int
) -> torch.fx.GraphModule:
    """Copy of `gm` in which the sites in `site_ids` call the DFSAttn op with their id."""
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    timestep = [n for n in graph.nodes if n.op == "placeholder"][timestep_input]
    for site in sites:
        if site.name in site_ids:
            _replace_site(graph, site, copies, _DFS_OP, (timestep, site_ids[site.name]))
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def _replace_site(graph: torch.fx.Graph, site: AttentionSite, copies: dict, op, args: tuple) -> None:
    """Call `op(q, k, v, *args, scale, key_padding)` in place of the site."""
    node = copies[site.node]
    q, k, v = copies[site.q_node], copies[site.k_node], copies[site.v_node]
    with graph.inserting_before(node):
        key_padding = None
        if site.key_padding:
            key_padding = graph.call_method("reshape", (copies[site.mask_node], -1, site.kv_len))
        sparse = graph.call_function(op, (q, k, v, *args, site.scale, key_padding))
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
