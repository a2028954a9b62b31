"""Separable attention masks: prove from the FX graph that a mask is key padding times query padding.

Models with padded prompts (HunyuanVideo-1.5, many text-to-video DiTs) pass SDPA a full
(B, 1, Sq, Sk) mask built as the outer product of per-token validity,
`q_valid[:, None, :, None] & k_valid[:, None, None, :]`. Such a mask says nothing about
*which* keys a query attends beyond "valid queries see valid keys", so it is exactly a
key-padding mask (which the sparse op honours) plus query padding (rows whose output is
zero: eager SDPA on torch 2.13 returns zeros, not NaN, for a fully masked row in both the
boolean and the additive -inf form; checked on CPU in fp16/fp32/fp64).

`separable_mask(node, batch, q_len, kv_len)` proves separability structurally: a tensor whose
shape has size 1 along the key (query) dimension, broadcast over the mask, depends on the query
(key) only; `&`, `logical_and` and `*` of such factors, broadcasts (`expand`, `repeat`,
`broadcast_to`), swaps of the last two dims, reshapes that only add or drop unit dims, and casts
to bool keep the structure. Additive masks are the 0/-inf forms built from such a boolean:
`zeros.masked_fill(~m, -inf)`, `torch.where(m, 0, -inf)`, sums of those, float casts. Masks using
another large negative (e.g. `finfo.min`) are not 0/-inf: eager then averages a fully masked row,
which the op cannot reproduce, so they stay dense.

`add_padding_nodes` then inserts, after the mask, the reductions that give the op its vectors:
key padding `(B or 1, 1, 1, Sk)` and query padding `(B or 1, 1, Sq, 1)` (any valid query of the
batch entry / any valid key). For a product `q_valid x k_valid` these reductions are exact,
including the corner cases: an all-invalid query side makes every row zero either way.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx

Sides = frozenset  # subset of {"q", "k"}: the dims a factor's value varies along

_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and", "__rand__"}
_MUL = {operator.mul, torch.mul}
_MUL_METHODS = {"mul", "__mul__", "__rmul__"}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not}
_NOT_METHODS = {"logical_not", "bitwise_not", "__invert__"}
_BROADCASTS = {"expand", "repeat", "expand_as", "broadcast_to"}
_RESHAPES = {"view", "reshape", "unsqueeze", "squeeze", "contiguous", "clone"}
_FLOAT_CASTS = {"float", "half", "bfloat16", "double", "type_as"}
_ZEROS = {torch.zeros, torch.zeros_like}
_MAX_DEPTH = 40


def _value(node: Any) -> Any:
    if isinstance(node, torch.fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def _is(node: Any, functions: set, methods: set) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in functions)
        or (node.op == "call_method" and node.target in methods))


def _swap(sides: Sides) -> Sides:
    return frozenset({"q": "k", "k": "q"}[s] for s in sides)


class _Prover:
    """Structural proof that a mask node is separable (see the module docstring)."""

    def __init__(self, batch: int, q_len: int, kv_len: int) -> None:
        self.batch, self.q_len, self.kv_len = batch, q_len, kv_len

    def _shape(self, node: Any) -> tuple[int, ...] | None:
        value = _value(node)
        return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None

    def leaf(self, node: Any) -> Sides | None:
        """A tensor with a unit dim among the last two: it varies along the other one only.

        Leading dims are checked on the final mask (one batch dim, unit heads dim); here at most one
        of them may be non-unit (a (B, Sq, Sk) product gains its heads dim by `unsqueeze(1)` later)."""
        shape = self._shape(node)
        if shape is None or len(shape) > 4:
            return None
        padded = (1, 1) + shape
        if sum(s != 1 for s in padded[:-2]) > 1:
            return None  # more than a batch dim before (Sq, Sk): it may vary over heads
        rows, cols = padded[-2], padded[-1]
        if rows != 1 and cols != 1:
            return None
        return frozenset(({"q"} if rows != 1 else set()) | ({"k"} if cols != 1 else set()))

    def _through_layout(self, node: torch.fx.Node, depth: int, walk) -> tuple[bool, Sides | None]:
        """A broadcast, a reshape that adds or drops unit dims, or a swap of the last two dims keeps
        which (query, key) pairs a mask allows: (True, the input's sides as `walk` finds them, swapped
        where the op swaps), else (False, None)."""
        args = node.args
        if _is(node, {torch.broadcast_to}, _BROADCASTS) and self._broadcast_of(args[0], node):
            return True, walk(args[0], depth + 1)
        if _is(node, set(), _RESHAPES) and self._unit_reshape_of(args[0], node):
            return True, walk(args[0], depth + 1)
        if self._last_two_swapped(node):
            inner = walk(args[0], depth + 1)
            return True, None if inner is None else _swap(inner)
        return False, None

    def nonzero(self, node: Any, depth: int = 0) -> Sides | None:
        """Sides of a bool/integer node whose nonzero pattern is an AND of one-sided patterns."""
        if depth > _MAX_DEPTH or not isinstance(node, torch.fx.Node):
            return None
        value = _value(node)
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex():
            return None
        sides = self.leaf(node)
        if sides is not None:
            return sides
        args = node.args
        if _is(node, _AND, _AND_METHODS) and len(args) == 2:
            logical = node.target in (torch.logical_and, "logical_and")
            return self._product(args, depth, need_bool=not logical)
        if _is(node, _MUL, _MUL_METHODS) and len(args) == 2:
            return self._product(args, depth, need_bool=False)
        handled, sides = self._through_layout(node, depth, self.nonzero)
        if handled:
            return sides
        source = _value(args[0]) if args else None
        if _is(node, set(), {"bool", "to", "type", "int", "long"}) and isinstance(source, torch.Tensor) \
                and not source.is_floating_point():
            return self.nonzero(args[0], depth + 1)  # bool/int casts keep which entries are nonzero
        return None

    def _product(self, args: tuple, depth: int, need_bool: bool) -> Sides | None:
        sides: set[str] = set()
        for arg in args:
            if arg is True or arg == 1:
                continue
            value = _value(arg)
            if not isinstance(value, torch.Tensor) or (need_bool and value.dtype != torch.bool):
                return None  # `&` of integers is bitwise: not an AND of nonzero patterns
            inner = self.nonzero(arg, depth + 1)
            if inner is None:
                return None
            sides |= inner
        return frozenset(sides)

    def allowed(self, node: Any, depth: int = 0) -> Sides | None:
        """Sides of a float 0/-inf node whose zero (allowed) pattern is separable."""
        if depth > _MAX_DEPTH or not isinstance(node, torch.fx.Node):
            return None
        value = _value(node)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return None
        args = node.args
        if _is(node, {torch.masked_fill}, {"masked_fill", "masked_fill_"}) and len(args) == 3:
            base, where, fill = args
            if not (isinstance(fill, float) and fill == -math.inf):
                return None
            blocked = self._negated(where, depth)
            base_sides = frozenset() if self._zeros(base) else self.allowed(base, depth + 1)
            return None if blocked is None or base_sides is None else blocked | base_sides
        if _is(node, {torch.where}, set()) and len(args) == 3:
            cond, yes, no = args
            if _is_zero(yes) and no == -math.inf:
                return self.nonzero(cond, depth + 1)
            if yes == -math.inf and _is_zero(no):
                return self._negated(cond, depth)
            return None
        if _is(node, {operator.add, torch.add}, {"add", "__add__"}) and len(args) == 2:
            parts = [self.allowed(a, depth + 1) for a in args]
            return None if any(p is None for p in parts) else frozenset().union(*parts)
        if _is(node, set(), _FLOAT_CASTS | {"to", "type"}) and isinstance(_value(args[0]), torch.Tensor):
            if _value(args[0]).is_floating_point():
                return self.allowed(args[0], depth + 1)  # float -> float keeps 0 and -inf
            return None  # bool -> float gives 0/1: not a mask SDPA reads as padding
        handled, sides = self._through_layout(node, depth, self.allowed)
        if handled:
            return sides
        return None

    def _negated(self, node: Any, depth: int) -> Sides | None:
        """Sides of m where `node` (the blocked entries) is ~m / logical_not(m) / m == 0 for a separable
        m, a one-sided boolean, or an OR of those (De Morgan: ~q | ~k blocks outside q & k)."""
        if depth > _MAX_DEPTH or not isinstance(node, torch.fx.Node):
            return None
        value = _value(node)
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and self.leaf(node) is not None:
            return self.leaf(node)  # the complement of a one-sided pattern is one-sided
        if _is(node, {operator.or_, torch.logical_or, torch.bitwise_or}, {"__or__", "logical_or", "bitwise_or"}) \
                and len(node.args) == 2:
            parts = [self._negated(a, depth + 1) for a in node.args]
            return None if any(p is None for p in parts) else frozenset().union(*parts)
        if _is(node, _NOT, _NOT_METHODS):
            return self.nonzero(node.args[0], depth + 1)
        if _is(node, {operator.eq, torch.eq}, {"eq", "__eq__"}) and len(node.args) == 2 and node.args[1] in (0, False):
            return self.nonzero(node.args[0], depth + 1)
        return None

    def _zeros(self, node: Any) -> bool:
        if _is(node, _ZEROS, {"new_zeros", "zero_"}):
            return True
        if _is(node, {torch.full, torch.full_like}, {"new_full"}) and len(node.args) >= 2:
            return _is_zero(node.args[-1] if node.op == "call_function" else node.args[2])
        return False

    def _broadcast_of(self, source: Any, node: torch.fx.Node) -> bool:
        """`node` only broadcasts `source` (no tiling of non-unit dims)."""
        src, out = self._shape(source), self._shape(node)
        if src is None or out is None or len(src) > len(out):
            return False
        return all(s in (1, o) for s, o in zip(src[::-1], out[::-1]))

    def _unit_reshape_of(self, source: Any, node: torch.fx.Node) -> bool:
        """`node` keeps the last two dims of `source` and only adds or drops unit dims before them."""
        src, out = self._shape(source), self._shape(node)
        if src is None or out is None or len(src) < 2 or len(out) < 2:
            return False
        return src[-2:] == out[-2:] and [s for s in src[:-2] if s != 1] == [s for s in out[:-2] if s != 1]

    def _last_two_swapped(self, node: torch.fx.Node) -> bool:
        shape = self._shape(node)
        if shape is None or len(shape) < 2 or not isinstance(node.args[0] if node.args else None, torch.fx.Node):
            return False
        ndim = len(shape)
        if _is(node, {torch.transpose}, {"transpose", "swapaxes", "swapdims"}) and len(node.args) == 3:
            return {d % ndim for d in node.args[1:3] if isinstance(d, int)} == {ndim - 2, ndim - 1}
        if _is(node, {torch.permute}, {"permute"}):
            dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return [d % ndim for d in dims] == list(range(ndim - 2)) + [ndim - 1, ndim - 2]
        return node.op == "call_function" and node.target is getattr and node.args[1] == "mT"


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def separable_mask(mask: torch.fx.Node, batch: int, q_len: int, kv_len: int) -> bool:
    """Whether `mask` (SDPA's attn_mask) is provably key padding times query padding (bool, or 0/-inf)."""
    value = _value(mask)
    if not isinstance(value, torch.Tensor) or value.dim() > 4 or value.dim() < 2:
        return False
    shape = (1,) * (4 - value.dim()) + tuple(int(s) for s in value.shape)
    if shape[0] not in (1, batch) or shape[1] != 1 or shape[2] not in (1, q_len) or shape[3] not in (1, kv_len):
        return False
    prover = _Prover(batch, q_len, kv_len)
    sides = prover.nonzero(mask) if value.dtype == torch.bool else (
        prover.allowed(mask) if value.is_floating_point() else None)
    return sides is not None


def add_padding_nodes(graph: torch.fx.Graph, mask: torch.fx.Node, q_len: int, kv_len: int
                      ) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Insert after `mask` the key padding (B or 1, 1, 1, Sk) and query padding (B or 1, 1, Sq, 1) of a
    separable mask (bool: True = valid). Their values (fake, where the mask's is) go in node.meta."""
    value = _value(mask)
    batch = int(value.shape[0]) if value.dim() == 4 else 1
    with graph.inserting_after(mask):
        valid = mask if value.dtype == torch.bool else graph.call_function(torch.ne, (mask, -math.inf))
    with graph.inserting_after(valid):
        full = graph.call_method("expand", (valid, batch, 1, q_len, kv_len))
    with graph.inserting_after(full):
        key = graph.call_method("any", (full, 2), {"keepdim": True})
    with graph.inserting_after(key):
        query = graph.call_method("any", (full, 3), {"keepdim": True})
    _fill_meta(mask, valid, full, key, query)
    return key, query


def _fill_meta(mask: torch.fx.Node, *nodes: torch.fx.Node) -> None:
    """Example values for the new nodes, computed on the mask's (fake) value."""
    values = {mask: _value(mask)}
    mode = getattr(values[mask], "fake_mode", None)
    context = mode if mode is not None else torch.no_grad()
    with context:
        for node in nodes:
            if node is mask:
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
            values[node] = fn(*args, **kwargs) if node.op == "call_function" else fn(*args[1:], **kwargs)
            node.meta["val"] = values[node]
        for node in nodes:
            for key in ("nn_module_stack", "stack_trace"):
                if key in mask.meta:
                    node.meta[key] = mask.meta[key]
