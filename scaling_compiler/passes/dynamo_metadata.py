"""Dynamo's metadata on a graph module a pass rebuilt, so AOTAutograd still knows which inputs are static.

AOTAutograd tells inductor which inputs keep their address from call to call (the weights) only for a
graph it recognises as dynamo's: a compile id in `meta`, `_param_name_to_source`, and a
`_dynamo_source` on every placeholder (torch's note "Assumption on Dynamo Metadata"). A fresh
GraphModule has none of them, so CUDA graphs (`mode="reduce-overhead"`) copied every weight into their
pool on every replay. The rewrite (masks, step tables) and the flatten pass (weights' inner tensors)
add placeholders; these are marked static as dynamo marks `mark_static_address` tensors: the same
tensors reach every call.
"""
from __future__ import annotations

import torch
import torch.fx


def keep_dynamo_metadata(dynamo_gm: torch.fx.GraphModule, rebuilt: torch.fx.GraphModule,
                         copies: dict[torch.fx.Node, torch.fx.Node], new_placeholders: list[torch.fx.Node]) -> None:
    """Carry `dynamo_gm`'s metadata over to `rebuilt` (its placeholders' copies by `copies`; a placeholder
    without a copy was removed) and mark `new_placeholders` static. A graph that gained parameters dynamo
    never saw (SALAD's branches) has no sources for them and keeps the defaults."""
    if "dynamo_compile_id" not in dynamo_gm.meta or not hasattr(dynamo_gm, "_param_name_to_source"):
        return
    sources = dynamo_gm._param_name_to_source
    tensors = [*rebuilt.named_parameters(remove_duplicate=False), *rebuilt.named_buffers(remove_duplicate=False)]
    placeholders = [node for node in dynamo_gm.graph.nodes if node.op == "placeholder"]
    if any(name not in sources for name, _ in tensors) or not all(hasattr(n, "_dynamo_source") for n in placeholders):
        return
    rebuilt.meta.update(dynamo_gm.meta)
    rebuilt._param_name_to_source = sources
    for node in placeholders:
        if node in copies:
            copies[node]._dynamo_source = node._dynamo_source
    for node in new_placeholders:
        node._dynamo_source = None
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
