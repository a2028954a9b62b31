"""Rewrite pass: replace each planned attention site by the op its plan emits.

Works on a copy of the graph (dynamo's own GraphModule must not gain inputs in place). A plan
emits its op call through a `Rewriter`, which can append extra placeholders after the original
inputs (packed masks, step tables: `GraphRecord.extra_inputs`, passed after the original
arguments at every call) and hands out the model's timestep node. The site's softmax chain (or
SDPA call) is then erased.

With option `attention_dtype="fp8"` the pass first decides, per site, whether its plan emits the FP8
op (`site.runs_fp8`) or keeps the site's dtype, and records why not (`site.fp8_reason`): the FP8 op
has no backward, its kernel takes fp16/bf16 with head dim 64 or 128 only, and a plan may refuse
(`SitePlan.fp8_refusal`: no FP8 path, or the cost model's FP8 rows predict no gain). Planning has
already run, so which sites are sparse, decided on the 16-bit kernel's rows, is the same with FP8 or
without.
"""
from __future__ import annotations

import torch
import torch.fx

from ..kernels.dispatch import fp8_unsupported_reason
from ..sites import FP8, GraphRecord, Site
from .dynamo_metadata import keep_dynamo_metadata


class Rewriter:
    """The copied graph being rewritten, and the tensors its new placeholders stand for."""

    def __init__(self, graph: torch.fx.Graph, timestep: torch.fx.Node | None) -> None:
        self.graph = graph
        self.timestep = timestep  # the model's timestep placeholder, if the graph has one
        self.extra_inputs: list[torch.Tensor] = []
        self.extra_placeholders: list[torch.fx.Node] = []  # one per extra input, in order
        self.modules: dict[str, torch.nn.Module] = {}  # submodules the new call_module nodes call
        self._anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
        self._shared: dict[str, torch.fx.Node] = {}

    def add_input(self, tensor: torch.Tensor, name: str | None = None) -> torch.fx.Node:
        """A new placeholder, after the others, fed `tensor` at every call. A named input is added once
        and shared by every site that asks for the same name."""
        if name is not None and name in self._shared:
            return self._shared[name]
        with self.graph.inserting_after(self._anchor):
            self._anchor = self.graph.placeholder(name or f"scalingattn_{len(self.extra_inputs)}")
        self.extra_inputs.append(tensor)
        self.extra_placeholders.append(self._anchor)
        if name is not None:
            self._shared[name] = self._anchor
        return self._anchor


    def add_module(self, name: str, module: torch.nn.Module) -> str:
        """Register `module` as a submodule of the rewritten graph module; returns the target name for
        `graph.call_module` (its parameters become the compiled graph's, e.g. trainable)."""
        self.modules[name] = module
        return name


def rewrite(graph: GraphRecord) -> None:
    """The rewrite pass: sites with a plan call their op; `graph.gm` becomes the rewritten copy."""
    if graph.config.attention_dtype == FP8:
        for site in graph.sites:
            site.fp8_reason = _fp8_refusal(site)
            site.runs_fp8 = site.fp8_reason is None
    planned = [site for site in graph.sites if site.plan is not None]
    if not planned:
        return
    copy = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    copy.output(copy.graph_copy(graph.gm.graph, copies))
    placeholders = [n for n in copy.nodes if n.op == "placeholder"]
    rewriter = Rewriter(copy, placeholders[graph.timestep.position] if graph.timestep else None)
    for site in planned:
        _replace_site(rewriter, site, copies)
    copy.lint()
    for name, module in rewriter.modules.items():
        graph.gm.add_submodule(name, module)
    rewritten = torch.fx.GraphModule(graph.gm, copy)
    keep_dynamo_metadata(graph.gm, rewritten, copies, rewriter.extra_placeholders)
    graph.gm = rewritten
    graph.extra_inputs = rewriter.extra_inputs


def _fp8_refusal(site: Site) -> str | None:
    """Why `site` cannot run the FP8 op (None: it can), from its plan and its fake example values."""
    if site.plan is None:
        return "dense site: SDPA in its own dtype"
    if site.requires_grad:
        return "inputs require grad (the FP8 op has no backward)"
    refusal = site.plan.fp8_refusal()
    if refusal is not None:
        return refusal
    q, k, v = (_example_value(node) for node in (site.q_node, site.k_node, site.v_node))
    key_padding = _example_value(site.mask_node).reshape(-1, site.kv_len) if site.key_padding else None
    return fp8_unsupported_reason(q, k, v, key_padding)


def _example_value(node: torch.fx.Node) -> torch.Tensor:
    """The node's fake value; a gather the reorder pass added has none, so its source's (the same shape,
    dtype and device: all the FP8 rules read)."""
    while "val" not in node.meta and "example_value" not in node.meta and node.target is torch.index_select:
        node = node.args[0]
    return node.meta.get("val", node.meta.get("example_value"))


def _replace_site(rewriter: Rewriter, site: Site, copies: dict) -> None:
    graph = rewriter.graph
    node = copies[site.node]
    q, k, v = copies[site.q_node], copies[site.k_node], copies[site.v_node]
    with graph.inserting_before(node):
        key_padding = None
        if site.key_padding:
            key_padding = graph.call_method("reshape", (copies[site.mask_node], -1, site.kv_len))
        replacement = site.plan.emit(rewriter, site, q, k, v, key_padding)
        if site.query_padding_node is not None:
            # rows of padded queries: eager SDPA (torch 2.13, bool or 0/-inf mask) returns zeros for
            # a fully masked row, not NaN; `where` keeps the op's dtype and shape
            replacement = graph.call_function(torch.where, (copies[site.query_padding_node], replacement, 0.0))
    replacement.meta.update({k_: v_ for k_, v_ in node.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(replacement)
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
