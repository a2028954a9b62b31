"""Detection pass: find every attention call in a dynamo FX graph and describe it.

Works on the graph dynamo hands a backend (torch-level ops, parameters as placeholders,
fake `example_value`s in node.meta), so it sees `F.scaled_dot_product_attention` calls
before AOT lowers them to device-specific aten ops, and hand-written
`softmax(q @ k^T * scale) @ v` chains.

For each site it decides self / joint / cross attention from where q and k come from:
the inputs of the nearest `linear` projections upstream of each. It also infers the video
token grid from the patch embedding (conv3d, or conv2d over frames) and, for joint
text+video attention, the text token spans from the concatenation that builds q. And it finds the model's timestep input
(`inputs.find_timestep`), which step-aware plans read at run time.
"""
from __future__ import annotations

import logging
import math
import operator
import re
from collections import Counter, deque
from typing import Any, Callable, Iterable

import torch
import torch.fx
import torch.nn.functional as F

from ..kernels.dispatch import unsupported_reason
from ..sites import GraphRecord, Pattern, Site, SiteKind
from .inputs import find_timestep
from .masks import add_padding_nodes, separable_mask
from .ulysses import RING_REASON, find_ulysses, is_ring

log = logging.getLogger(__name__)

_SDPA = torch._C._nn.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_LINEAR = {torch._C._nn.linear, F.linear}
_SOFTMAX = ({torch.softmax, F.softmax}, {"softmax"})  # (functions, method names)
_MATMUL = ({operator.matmul, torch.matmul}, {"matmul"})
_CAST_METHODS = {"float", "to", "type_as", "half", "bfloat16"}
_CONV_VIDEO = {torch.conv3d, F.conv3d}
_CONV_IMAGE = {torch.conv2d, F.conv2d}
_MAX_BACKWARD_NODES = 400  # bound on the upstream search from q/k (a few layers of ops)


def detect(graph: GraphRecord) -> None:
    """The detection pass: the graph's attention sites and its timestep input."""
    graph.sites = detect_sites(graph.gm, graph.config.token_grid)
    graph.timestep = find_timestep(graph.gm, graph.example_inputs, graph.config.timestep_max)
    graph.subgraph_attention = subgraph_attention_calls(graph.gm)


def subgraph_attention_calls(gm: torch.fx.GraphModule) -> int:
    """SDPA calls inside the graph's subgraphs (the bodies of higher-order ops, such as the regions of
    activation checkpointing: `enable_gradient_checkpointing()`), which the passes do not rewrite."""
    return sum(_is_call(node, ({_SDPA}, ())) for name, module in gm.named_modules()
               if name and isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes)


def detect_sites(gm: torch.fx.GraphModule, token_grid: tuple[int, int, int] | None = None) -> list[Site]:
    """All attention sites of `gm` in graph (= execution) order."""
    grids = [(token_grid, "option")] if token_grid else _patch_embedding_grids(gm)
    sites: list[Site] = []
    for node in gm.graph.nodes:
        site = _sdpa_site(node) if _is_call(node, ({_SDPA}, ())) else _softmax_site(node)
        if site is None:
            continue
        _classify(site, grids)
        site.dense_reason = _dense_reason(site)
        _context_parallel(site)
        if site.query_padding and site.rewritable:  # the op gets the mask's padding vectors
            site.mask_node, site.query_padding_node = add_padding_nodes(
                gm.graph, site.mask_node, site.q_len, site.kv_len)
        sites.append(site)
    _make_names_unique(sites)
    if token_grid and sites and not any(site.grid_source == "option" for site in sites):
        log.warning("scalingattn: option 'token_grid' %s (%d tokens) matches no attention site's video length "
                    "(%s): those sites stay dense", token_grid, math.prod(token_grid),
                    sorted({site.q_len for site in sites if site.kind is not SiteKind.CROSS}))
    log.debug("detected %d attention sites: %s", len(sites), [s.name for s in sites])
    return sites


# ---------------------------------------------------------------------------------------
# Finding the calls
# ---------------------------------------------------------------------------------------


def _sdpa_site(node: torch.fx.Node) -> Site | None:
    bound = dict(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    scale = bound.get("scale")
    dropout_p = bound.get("dropout_p", 0.0)
    site = _new_site(node, Pattern.SDPA, q, k, v, scale=scale)
    if site is None:
        return None
    site.mask_node = mask if isinstance(mask, torch.fx.Node) else None
    site.attn_mask, site.key_padding, site.query_padding = _describe_mask(mask, site)
    site.is_causal = bool(bound.get("is_causal", False))  # a traced (non-constant) flag counts as causal
    site.dropout_p = float(dropout_p) if isinstance(dropout_p, (int, float)) else float("nan")
    return site


def _softmax_site(node: torch.fx.Node) -> Site | None:
    """Match `out = matmul(softmax(matmul(q, k^T) * c, dim=-1), v)` ending at `node`."""
    if not _is_call(node, _MATMUL) or len(node.args) != 2:
        return None
    probs, v = node.args
    softmax = _skip_casts(probs)
    if not (isinstance(softmax, torch.fx.Node) and _is_call(softmax, _SOFTMAX)):
        return None
    if _softmax_dim(softmax) not in (-1, 3) or len(softmax.users) != 1 or len(probs.users) != 1:
        return None
    scores, scale_factor = _strip_scale(_skip_casts(softmax.args[0]))
    if not (isinstance(scores, torch.fx.Node) and _is_call(scores, _MATMUL)) or len(scores.users) != 1:
        return None
    q, scale_on_q = _strip_scale(scores.args[0])
    k = _untranspose_last_two(scores.args[1])
    if k is None:
        return None
    constant = scale_factor is not None and scale_on_q is not None
    site = _new_site(node, Pattern.SOFTMAX, q, k, v, scale=scale_factor * scale_on_q if constant else _RUNTIME_SCALE)
    if site is not None:
        site.attn_mask, site.key_padding, site.is_causal, site.dropout_p = None, False, False, 0.0
    return site


_RUNTIME_SCALE = object()  # `_new_site`'s scale when the graph computes it: the site's scale is None (dense)


def _new_site(node, pattern, q, k, v, scale) -> Site | None:
    qv, kv, vv = (_value(x) for x in (q, k, v))
    if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
        return None
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        shape = tuple(qv.shape)
        site = Site(
            name=_module_path(node), pattern=pattern, kind=SiteKind.SELF, batch=0, heads=0, kv_heads=0,
            q_len=0, kv_len=0, head_dim=int(qv.shape[-1]), dtype=qv.dtype, device=qv.device, q_stride=tuple(qv.stride()),
            scale=None, attn_mask=None, key_padding=False, is_causal=False, dropout_p=0.0, token_grid=None,
            grid_source="unknown", text_spans=(), node=node, q_node=q, k_node=k, v_node=v,
        )
        site.dense_reason = f"layout {shape} is not (B, H, S, D)"
        return site
    batch, heads, q_len, head_dim = (int(s) for s in qv.shape)
    resolved_scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    return Site(
        name=_module_path(node), pattern=pattern, kind=SiteKind.SELF, batch=batch, heads=heads,
        kv_heads=int(kv.shape[1]), q_len=q_len, kv_len=int(kv.shape[2]), head_dim=head_dim, dtype=qv.dtype, device=qv.device,
        q_stride=tuple(int(s) for s in qv.stride()),
        scale=float(resolved_scale) if isinstance(resolved_scale, (int, float)) else None,
        attn_mask=None, key_padding=False, is_causal=False, dropout_p=0.0, token_grid=None,
        grid_source="unknown", text_spans=(), node=node, q_node=q, k_node=k, v_node=v,
        requires_grad=any(t.requires_grad for t in (qv, kv, vv)),
    )


def _describe_mask(mask: Any, site: Site) -> tuple[str | None, bool, bool]:
    """(description, key padding, query padding): a boolean (B, 1, 1, Sk) mask is key padding as it
    is; a mask the graph builds as an outer product of per-token validity is key padding plus
    query padding (`masks.separable_mask`); anything else neither."""
    if mask is None:
        return None, False, False
    mv = _value(mask)
    if not isinstance(mv, torch.Tensor):
        return f"attn_mask of type {type(mv).__name__}", False, False
    desc = f"{str(mv.dtype).removeprefix('torch.')} attn_mask {tuple(mv.shape)}"
    is_key_padding = (
        mv.dtype == torch.bool and mv.dim() == 4 and tuple(mv.shape[1:3]) == (1, 1)
        and mv.shape[0] in (1, site.batch) and mv.shape[3] == site.kv_len
    )
    if is_key_padding:
        return desc, True, False
    if site.batch and separable_mask(mask, site.batch, site.q_len, site.kv_len):
        return f"{desc}, separable: key and query padding", True, True
    return desc, False, False


# ---------------------------------------------------------------------------------------
# Self / joint / cross, token grid, text spans
# ---------------------------------------------------------------------------------------


def _classify(site: Site, grids: list[tuple[tuple[int, int, int], str]]) -> None:
    if site.batch == 0:  # bad layout: nothing more to learn
        return
    q_sources, k_sources = _projection_inputs(site.q_node), _projection_inputs(site.k_node)
    same_sequence = q_sources == k_sources if (q_sources or k_sources) else site.q_len == site.kv_len
    if not same_sequence or site.q_len != site.kv_len:
        site.kind = SiteKind.CROSS
        return
    segments = _sequence_segments(site)
    video_len = site.q_len
    if len(segments) > 1:
        grid_lengths = {math.prod(g) for g, _ in grids}
        video = next((i for i, n in enumerate(segments) if n in grid_lengths), None)
        if video is None:
            video = max(range(len(segments)), key=lambda i: segments[i])
        starts = [sum(segments[:i]) for i in range(len(segments))]
        site.text_spans = tuple((starts[i], starts[i] + n) for i, n in enumerate(segments) if i != video)
        site.kind = SiteKind.JOINT
        video_len = segments[video]
    grid = next(((g, src) for g, src in grids if math.prod(g) == video_len), None)
    if grid is not None:
        site.token_grid, site.grid_source = grid
    elif any(src == "option" for _, src in grids):  # the user's grid is not this site's: never guess
        grid = "x".join(map(str, grids[0][0]))
        site.grid_source = f"option token_grid {grid} does not match"
        site.dense_reason = (f"option 'token_grid' {grid} has {math.prod(grids[0][0])} tokens, the site's video "
                             f"sequence {video_len}")
    else:
        site.grid_source = "unknown: treated as 1-D (set option token_grid)"


def _projection_inputs(node: Any) -> frozenset[torch.fx.Node]:
    """Inputs of the nearest `linear` projections upstream of `node` (q or k)."""
    found: set[torch.fx.Node] = set()
    if not isinstance(node, torch.fx.Node):
        return frozenset()
    seen, queue = {node}, deque([node])
    while queue and len(seen) < _MAX_BACKWARD_NODES:
        current = queue.popleft()
        if _is_call(current, (_LINEAR, ())):
            if isinstance(current.args[0], torch.fx.Node):
                found.add(current.args[0])
            continue
        for parent in current.all_input_nodes:
            if parent.op != "placeholder" and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return frozenset(found)


def _sequence_segments(site: Site) -> list[int]:
    """Lengths of the pieces q's token sequence was concatenated from, or [q_len].

    Searches upstream of q, inside q's transformer block, for a `cat` along the sequence
    dimension (text and video streams joined before or after their projections).
    """
    block = _module_path(site.node).rsplit(".", 1)[0]
    seen, queue = {site.q_node}, deque([site.q_node])
    while queue and len(seen) < _MAX_BACKWARD_NODES:
        current = queue.popleft()
        if _is_call(current, ({torch.cat, torch.concat}, ())):
            lengths = _cat_sequence_lengths(current, site)
            if lengths is not None:
                return lengths
        for parent in current.all_input_nodes:
            if parent.op != "placeholder" and parent not in seen and _module_path(parent).startswith(block):
                seen.add(parent)
                queue.append(parent)
    return [site.q_len]


def _cat_sequence_lengths(cat: torch.fx.Node, site: Site) -> list[int] | None:
    pieces = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    out = _value(cat)
    if not isinstance(out, torch.Tensor) or out.dim() < 3 or not isinstance(pieces, (list, tuple)) or len(pieces) < 2:
        return None
    dim = dim % out.dim()
    if dim == 0 or out.shape[dim] != site.q_len or out.shape[0] != site.batch:
        return None
    lengths = [int(_value(p).shape[dim]) for p in pieces if isinstance(_value(p), torch.Tensor)]
    return lengths if len(lengths) == len(pieces) else None


def _patch_embedding_grids(gm: torch.fx.GraphModule) -> list[tuple[tuple[int, int, int], str]]:
    """Candidate (frames, height, width) grids from conv patch embeddings."""
    grids = []
    for node in gm.graph.nodes:
        out = _value(node)
        if not isinstance(out, torch.Tensor):
            continue
        if _is_call(node, (_CONV_VIDEO, ())) and out.dim() == 5:
            grids.append((tuple(int(s) for s in out.shape[2:]), "conv3d patch embedding"))
        elif _is_call(node, (_CONV_IMAGE, ())) and out.dim() == 4:
            batch = _conv_input_batch(node)
            if batch and out.shape[0] % batch == 0:
                frames = int(out.shape[0]) // batch
                grids.append(((frames, int(out.shape[2]), int(out.shape[3])), "conv2d patch embedding over frames"))
    return grids


def _conv_input_batch(conv: torch.fx.Node) -> int | None:
    """Batch size B of a conv2d applied to (B*F, C, H, W) frames: read from the reshape before it."""
    source = conv.args[0]
    while isinstance(source, torch.fx.Node) and source.op != "placeholder":
        value = _value(source)
        parent = source.all_input_nodes[0] if source.all_input_nodes else None
        parent_value = _value(parent) if parent is not None else None
        if isinstance(parent_value, torch.Tensor) and isinstance(value, torch.Tensor) and parent_value.dim() == 5:
            return int(parent_value.shape[0])
        source = parent
    return None


# ---------------------------------------------------------------------------------------
# What keeps a site dense
# ---------------------------------------------------------------------------------------


def _dense_reason(site: Site) -> str | None:
    if site.dense_reason:
        return site.dense_reason
    if site.kind is SiteKind.CROSS:
        return "cross-attention (keys from another sequence)"
    if site.attn_mask is not None and not site.key_padding:
        return (f"{site.attn_mask} (only key-padding masks and separable query x key padding masks "
                "are supported)")
    if site.is_causal:
        return "is_causal=True"
    if not site.dropout_p == 0.0:
        return f"dropout_p={site.dropout_p}"
    if site.kv_heads != site.heads:
        return f"grouped-query attention ({site.heads} query heads, {site.kv_heads} key heads)"
    if site.scale is None:
        return "scale is not a compile-time constant"
    q, k, v = (_value(n) for n in (site.q_node, site.k_node, site.v_node))
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    reason = unsupported_reason(q, k, v, key_padding=site.key_padding)
    if reason is not None and site.key_padding and unsupported_reason(q, k, v) is None:
        return f"{site.attn_mask}: {reason}"  # the inputs are fine: no implementation takes the mask here
    return reason


# ---------------------------------------------------------------------------------------
# FX helpers
# ---------------------------------------------------------------------------------------


def _value(node: Any) -> Any:
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def _is_call(node: Any, targets: tuple[set[Callable], Iterable[str]]) -> bool:
    """Whether `node` calls one of `targets` = (functions, Tensor method names)."""
    functions, methods = targets
    if not isinstance(node, torch.fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _skip_casts(node: Any) -> Any:
    while isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in _CAST_METHODS:
        node = node.args[0]
    return node


def _softmax_dim(node: torch.fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _strip_scale(node: Any) -> tuple[Any, float | None]:
    """Peel `x * c`, `c * x` and `x / c` with scalar c; returns (x, product of factors), the product
    None if a factor is computed at run time (e.g. a float attribute under `dynamic=True`, which dynamo
    makes a graph input): the site is still found, and stays dense for it."""
    factor: float | None = 1.0
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (
        operator.mul, operator.truediv, torch.mul, torch.div
    ):
        a, b = node.args[:2]
        divides = node.target in (operator.truediv, torch.div)
        if _is_scalar(b) and isinstance(a, torch.fx.Node):
            c, node = b, a
        elif _is_scalar(a) and isinstance(b, torch.fx.Node) and not divides:
            c, node = a, b
        else:
            return node, None
        if factor is None or not isinstance(c, (int, float)):
            factor = None
        else:
            factor = factor / c if divides else factor * c
    return node, factor


def _is_scalar(arg: Any) -> bool:
    """A number, or a node holding one (a symbolic float or a 0-d tensor)."""
    if isinstance(arg, (int, float)):
        return True
    value = _value(arg) if isinstance(arg, torch.fx.Node) else None
    return isinstance(value, (torch.SymFloat, torch.SymInt)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def _untranspose_last_two(node: Any) -> torch.fx.Node | None:
    """k from k^T: `k.transpose(-2, -1)`, `torch.transpose(k, 2, 3)`, `k.permute(0, 1, 3, 2)`, `k.mT`."""
    if not isinstance(node, torch.fx.Node):
        return None
    value = _value(node)
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    if node.op == "call_method" and node.target == "transpose" or node.op == "call_function" and node.target is torch.transpose:
        dims = {d % ndim for d in node.args[1:3]}
        return node.args[0] if dims == {ndim - 2, ndim - 1} else None
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        expected = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return node.args[0] if [d % ndim for d in dims] == expected else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


# diffusers' hooks (HookRegistry, e.g. context parallelism's) wrap a module's forward: dynamo then
# spells the path through the wrapper, e.g. L['function_reference'].forward.__self__.__dict__[...]
# ['blocks'].0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1 for blocks.0.attn1
_HOOK_WRAPPER = re.compile(r"(?:L\['function_reference'\]|\.forward\.func\.__closure__\[\d+\]\.cell_contents)"
                           r"\.forward\.__self__")
_MODULE_KEY = re.compile(r"\.__dict__\['_modules'\]\['([^']+)'\]|\['([^']+)'\]|\[(\d+)\]")


def _module_path(node: torch.fx.Node) -> str:
    """'blocks.0.attn1' from the node's nn_module_stack (dynamo spells it L['self']...)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<model>"
    raw = _HOOK_WRAPPER.sub("", list(stack.values())[-1][0])
    raw = raw.replace("L['self']", "", 1) if raw.startswith("L['self']") else raw
    path = _MODULE_KEY.sub(lambda m: "." + next(g for g in m.groups() if g is not None), raw)
    return path.strip(".") or "<model>"


def _context_parallel(site: Site) -> None:
    """Under diffusers' context parallelism: the rank's heads (Ulysses), or dense (ring)."""
    if site.heads and isinstance(site.q_node, torch.fx.Node):
        site.ulysses = find_ulysses(site.node, (site.q_node, site.k_node, site.v_node), site.heads)
    if site.rewritable and is_ring(site.k_node):
        site.dense_reason = RING_REASON


def _make_names_unique(sites: list[Site]) -> None:
    counts = Counter(s.name for s in sites)
    seen: Counter = Counter()
    for site in sites:
        if counts[site.name] > 1:
            seen[site.name] += 1
            site.name = f"{site.name}#{seen[site.name]}"
