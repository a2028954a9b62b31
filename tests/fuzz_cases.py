"""Fuzzed attention modules for the property-based suite (tests/test_fuzz.py, tests/fuzz_count.py).

`configs()` is a hypothesis strategy over SDPA call configurations (batch, heads, lengths, head
dims, dtypes, masks, causal, dropout, scale, GQA, layouts, 3-D inputs, self + cross in one module,
hand-written softmax attention, `dynamic=True`). `run_case(config)` compiles the module at density
1.0 and 0.5 and returns the list of `Failure`s (empty when the backend kept its promise):

- density 1.0: the compiled output equals eager within the dtype's tolerance (`TOLERANCE`);
- density 0.5: dense sites equal eager and sparse sites the masked reference built from the op's
  own masks (`tests/attention_reference.masked_sites`), within the same tolerance;
- at both densities: no site that no kernel supports (independent of the library's own rules:
  `Call.supported`) is reported sparse, and no NaN/inf where eager has none;
- with `grad` (parameters and inputs require grad): the gradients of the parameters and inputs (a
  vector-Jacobian product with a fixed random cotangent) equal the same reference's, with the same
  tolerance rule per gradient tensor.

Where the module draws random numbers while running (dropout with p > 0), only the report and
finiteness are checked: eager and compiled draw different numbers.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel

from tests.attention_reference import masked_sites

PRIMES = [p for p in range(2, 600) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
LENGTHS = [1, 127, 128, 129] + [p for p in PRIMES if p > 100]
HEAD_DIMS = [8, 12, 16, 24, 32, 40, 64, 72, 96, 128, 136, 192, 256]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# |compiled - reference| <= atol * max(1, max|reference|) + rtol * |reference|, per dtype: a few units of the
# dtype's rounding (the op accumulates in float32, eager SDPA and hand-written eager attention may not)
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp64": (1e-9, 1e-9), "fp16": (1e-2, 1e-2), "bf16": (4e-2, 4e-2)}
MODEL_DIM = 16
DROPOUT_P = 0.25


@dataclasses.dataclass(frozen=True)
class Config:
    """One fuzzed module and how it is compiled and called."""

    batch: int
    heads: int
    kv_heads: int  # < heads: grouped-query attention (enable_gqa=True)
    q_len: int
    kv_len: int  # of the cross-attention context (structure "cross" / "self+cross")
    head_dim: int
    dtype: str
    mask: str  # none | key_padding | full_bool | additive
    causal: bool
    dropout: str  # none | train_only (p if self.training) | always
    training: bool  # module.train() (dropout "train_only" draws)
    scale: float | None
    layout: str  # transpose | contiguous | fused_qkv | sliced | three_d
    pattern: str  # sdpa | softmax (hand-written)
    structure: str  # self | cross | self+cross
    dynamic: bool
    compiler: str  # eager | aot_eager
    grad: bool  # parameters require grad and autograd is on
    seed: int


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """A valid configuration: eager runs it (e.g. no causal together with a mask, which SDPA refuses).

    Half the draws stay inside what the kernels support (so sparse sites and their masks are
    exercised, not only the dense fallbacks); the other half range over everything."""
    inside = draw(st.booleans())

    def pick(everything: list, supported: list | None = None):
        return draw(st.sampled_from(supported if inside and supported is not None else everything))

    pattern = pick(["sdpa"] * 4 + ["softmax"])
    heads = draw(st.integers(1, 4))
    gqa = not inside and pattern == "sdpa" and heads > 1 and draw(st.booleans())
    kv_heads = draw(st.sampled_from([d for d in range(1, heads) if heads % d == 0])) if gqa else heads
    structure = pick(["self", "self", "cross", "self+cross"], ["self", "self", "self+cross"])
    layout = pick(["transpose", "contiguous", "fused_qkv", "sliced", "three_d"],
                  ["transpose", "contiguous", "fused_qkv", "sliced"])
    if gqa or structure != "self":
        layout = layout if layout != "fused_qkv" else "transpose"  # one projection needs equal heads and source
    if layout == "three_d" and gqa:
        layout = "transpose"
    if pattern == "softmax":
        mask, causal, dropout = pick(["none", "additive"], ["none"]), False, "none"
    else:
        mask = pick(["none", "none", "key_padding", "full_bool", "additive"], ["none", "key_padding"])
        causal = not inside and mask == "none" and draw(st.integers(0, 4)) == 0
        dropout = pick(["none", "none", "train_only", "always"], ["none", "train_only"])
    training = draw(st.booleans()) and not (inside and dropout == "train_only")
    return Config(
        batch=draw(st.integers(1, 2)), heads=heads, kv_heads=kv_heads,
        q_len=draw(st.sampled_from(LENGTHS)), kv_len=draw(st.sampled_from(LENGTHS)),
        head_dim=pick(HEAD_DIMS, [d for d in HEAD_DIMS if 16 <= d <= 128]),
        dtype=pick(list(DTYPES), ["fp32", "fp16", "bf16"]),
        mask=mask, causal=causal, dropout=dropout, training=training,
        scale=draw(st.sampled_from([None, None, 0.05, 0.125, 0.3, 1.0])),
        layout=layout, pattern=pattern, structure=structure, dynamic=draw(st.integers(0, 3)) == 0,
        compiler=draw(st.sampled_from(["eager", "aot_eager"])), grad=not inside and draw(st.integers(0, 9)) == 0,
        seed=draw(st.integers(0, 2 ** 16)),
    )


@dataclasses.dataclass(frozen=True)
class Call:
    """One attention call of the module, in execution order, and whether a kernel must support it."""

    self_attention: bool
    masked: bool

    def supported(self, c: Config) -> bool:
        """The test's own rule (not the library's): which calls may be reported sparse."""
        if c.dtype == "fp64" or not 16 <= c.head_dim <= 128 or c.layout == "three_d":
            return False
        if not self.self_attention or c.kv_heads != c.heads:
            return False
        if self.masked and c.mask not in ("none", "key_padding") and not key_padding_shaped(c):
            return False
        random_dropout = c.dropout == "always" or (c.dropout == "train_only" and c.training)
        return not (self.masked and (c.causal or random_dropout))


def mask_shape(c: Config) -> tuple[int, int, int, int]:
    """The first call's mask shape: key padding (B, 1, 1, Sk); full masks broadcast over batch or heads
    for some seeds."""
    keys = c.kv_len if c.structure == "cross" else c.q_len
    if c.mask == "key_padding":
        return c.batch, 1, 1, keys
    return c.batch if c.seed % 2 else 1, c.heads if c.seed % 3 == 0 else 1, c.q_len, keys


def key_padding_shaped(c: Config) -> bool:
    """A boolean mask of shape (B or 1, 1, 1, Sk) is key padding, whatever it was meant as: with one
    query, a full boolean mask that broadcasts over heads is one (the op may take it)."""
    shape = mask_shape(c)
    return c.mask in ("key_padding", "full_bool") and shape[1] == 1 and shape[2] == 1


def calls(c: Config) -> list[Call]:
    """The module's attention calls: masks, causal and dropout apply to the first one only."""
    first = Call(self_attention=c.structure != "cross", masked=True)
    return [first, Call(self_attention=False, masked=False)] if c.structure == "self+cross" else [first]


def detectable_calls(c: Config) -> list[Call]:
    """The calls detection must find: a hand-written softmax with a mask added to its scores is not
    the pattern detection matches (it runs as the model wrote it, so it is not a site)."""
    masked_softmax = c.pattern == "softmax" and c.mask != "none"
    return [call for call in calls(c) if not (masked_softmax and call.masked)]


class FuzzAttention(nn.Module):
    """Projections, then the configured attention call(s); returns the attention output(s) summed."""

    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        inner = 2 * c.head_dim if c.layout == "sliced" else c.head_dim
        self.to_q = nn.ModuleList(nn.Linear(MODEL_DIM, c.heads * inner) for _ in calls(c))
        self.to_k = nn.ModuleList(nn.Linear(MODEL_DIM, c.kv_heads * inner) for _ in calls(c))
        self.to_v = nn.ModuleList(nn.Linear(MODEL_DIM, c.kv_heads * inner) for _ in calls(c))
        self.scale = c.scale  # a Python float attribute (dynamic=True passes it as a graph input)
        self.p = DROPOUT_P

    def _project(self, i: int, x: torch.Tensor, source: torch.Tensor):
        c, b = self.c, x.shape[0]
        q, k, v = self.to_q[i](x), self.to_k[i](source), self.to_v[i](source)
        if c.layout == "fused_qkv":  # one (B, S, 3, H, D) tensor permuted: strided views of it
            qkv = torch.cat([q, k, v], dim=-1).view(b, x.shape[1], 3, c.heads, c.head_dim).permute(2, 0, 3, 1, 4)
            return qkv[0], qkv[1], qkv[2]
        q = q.view(b, x.shape[1], c.heads, -1).transpose(1, 2)
        k, v = (t.view(b, source.shape[1], c.kv_heads, -1).transpose(1, 2) for t in (k, v))
        if c.layout == "sliced":  # the first half of wider heads: last dim contiguous, rows strided
            q, k, v = q[..., :c.head_dim], k[..., :c.head_dim], v[..., :c.head_dim]
        elif c.layout == "contiguous":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return q, k, v

    def _attend(self, q, k, v, call: Call, mask):
        c = self.c
        p = {"none": 0.0, "always": self.p, "train_only": self.p if self.training else 0.0}[c.dropout]
        if not call.masked:
            mask, p, causal = None, 0.0, False
        else:
            causal = c.causal
        b, h = q.shape[:2]
        if c.layout == "three_d":
            q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
            mask = mask.expand(b, h, *mask.shape[2:]).reshape(-1, *mask.shape[2:]) if mask is not None else None
        if c.pattern == "softmax":
            scale = self.scale if self.scale is not None else 1 / math.sqrt(c.head_dim)
            scores = q @ k.transpose(-2, -1) * scale
            if mask is not None:
                scores = scores + mask
            out = scores.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=self.scale, enable_gqa=c.kv_heads != c.heads)
        return out.reshape(b, h, *out.shape[1:]) if c.layout == "three_d" else out

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        total = None
        for i, call in enumerate(calls(self.c)):
            source = x if call.self_attention else context
            q, k, v = self._project(i, x, source)
            out = self._attend(q, k, v, call, mask).transpose(1, 2).flatten(2)
            total = out if total is None else total + out
        return total


def make_inputs(c: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, Sq, dim), context (B, Skv, dim) and the first call's mask. Boolean masks leave a
    whole batch entry (key padding) or a query row (full) without keys for one seed in four: eager
    SDPA gives 0 there, and so must the op. (Additive masks are finite: no row is -inf.)"""
    dtype = DTYPES[c.dtype]
    g = torch.Generator().manual_seed(c.seed)
    x = torch.randn(c.batch, c.q_len, MODEL_DIM, generator=g).to(dtype)
    context = torch.randn(c.batch, c.kv_len, MODEL_DIM, generator=g).to(dtype)
    keys = c.kv_len if c.structure == "cross" else c.q_len
    if c.mask == "none":
        return x, context, None
    fully_masked = c.seed % 4 == 0  # one batch entry without keys, or one query row without keys
    if c.mask == "key_padding":
        keep = torch.rand(c.batch, 1, 1, keys, generator=g) > 0.3
        keep[..., 0] = True
        keep[-1] &= not fully_masked
        return x, context, keep
    shape = mask_shape(c)
    if c.mask == "full_bool":
        keep = torch.rand(*shape, generator=g) > 0.4
        keep[..., 0] = True
        keep[..., -1, :] &= not fully_masked
        return x, context, keep
    return x, context, (torch.randn(*shape, generator=g) * 2).to(dtype)


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: str  # crash | wrong | unsupported_sparse | nonfinite | sites
    density: float
    detail: str


def run_case(c: Config, stats: collections.Counter | None = None) -> list[Failure]:
    """Compile the configuration at density 1.0 and 0.5; every broken promise as a Failure.
    `stats` counts the sites reported sparse and dense at each density (what the run exercised)."""
    torch.manual_seed(c.seed)
    model = FuzzAttention(c).to(DTYPES[c.dtype]).train(c.training)
    model.requires_grad_(c.grad)
    inputs = make_inputs(c)
    for tensor in inputs[:2]:
        tensor.requires_grad_(c.grad)
    expected = forward_and_grads(c, model, model, inputs)
    failures: list[Failure] = []
    for density in (1.0, 0.5):
        failures += _check_density(c, model, inputs, expected, density, stats)
    return failures


@dataclasses.dataclass(frozen=True)
class Result:
    """A forward's output and, with `grad`, the gradients of its parameters and inputs by name."""

    out: torch.Tensor
    grads: dict[str, torch.Tensor | None]


def forward_and_grads(c: Config, model: nn.Module, fn, inputs) -> Result:
    """`fn(*inputs)` (the model, eager or compiled), and with `c.grad` the vector-Jacobian product with a
    fixed random cotangent: the gradients of `model`'s parameters and of x and context (None: unused)."""
    with torch.set_grad_enabled(c.grad):
        out = fn(*inputs)
    if not c.grad:
        return Result(out.detach(), {})
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(c.seed)).to(out.dtype)
    wrt = dict(model.named_parameters()) | {"x": inputs[0], "context": inputs[1]}
    grads = torch.autograd.grad(out, list(wrt.values()), cotangent, allow_unused=True)
    return Result(out.detach(), dict(zip(wrt, grads)))


def _check_density(c: Config, model: nn.Module, inputs, expected: Result, density: float,
                   stats: collections.Counter | None) -> list[Failure]:
    backend = ScalingAttnBackend(density=density, compiler=c.compiler, cache=False, calibration_samples=1,
                                 cost_model=CostModel.ideal("fuzz: every supported site sparse"))
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=c.dynamic)
            got = forward_and_grads(c, model, compiled, inputs)
    except Exception as error:  # noqa: BLE001  (every exception out of torch.compile is a finding)
        return [Failure("crash", density, f"{type(error).__name__}: {str(error)[:300]}")]
    report, expected_calls = backend.report, detectable_calls(c)
    if report is None or len(report.sites) != len(expected_calls):
        found = None if report is None else [s.name for s in report.sites]
        return [Failure("sites", density, f"{len(expected_calls)} attention calls, report sites {found}")]
    if stats is not None:
        stats.update(f"{site.status} at {density}" for site in report.sites)
    failures = [Failure("unsupported_sparse", density, f"{site.name}: {site.shape} {site.reason}")
                for site, call in zip(report.sites, expected_calls)
                if site.status == "sparse" and not call.supported(c)]
    if bool(torch.isfinite(expected.out).all()) and not bool(torch.isfinite(got.out).all()):
        failures.append(Failure("nonfinite", density, "NaN/inf in the compiled output, none in eager"))
    random_dropout = c.dropout == "always" or (c.dropout == "train_only" and c.training)
    if random_dropout:
        return failures
    reference = expected
    if report.sparse_sites:
        with masked_sites(report):
            reference = forward_and_grads(c, model, model, inputs)
    return failures + _wrong(c, got, reference, density, len(report.sparse_sites))


def _wrong(c: Config, got: Result, reference: Result, density: float, sparse: int) -> list[Failure]:
    """The output and each gradient against the reference's."""
    # a gradient that is zero in exact arithmetic (a key projection's bias: softmax is shift-invariant) is
    # the rounding noise of the terms it sums: its tolerance scales with the largest gradient, as its terms do
    largest = max((_largest(grad) for grad in reference.grads.values() if grad is not None), default=0.0)
    compared = {"output": (got.out, reference.out, _largest(reference.out))} | {
        f"grad of {name}": (got.grads[name], grad, largest) for name, grad in reference.grads.items()}
    details = {what: mismatch(c, *values) for what, values in compared.items()}
    return [Failure("wrong", density, f"{what}: {detail} ({sparse} sparse sites)")
            for what, detail in details.items() if detail is not None]


def _largest(t: torch.Tensor) -> float:
    return float(t.double().abs().nan_to_num(0.0).max()) if t.numel() else 0.0


def mismatch(c: Config, got: torch.Tensor | None, reference: torch.Tensor | None, magnitude: float) -> str | None:
    """Why `got` is not `reference` within the dtype's tolerance (None: it is), the absolute part scaled
    by `magnitude` where it is above 1."""
    if got is None or reference is None:
        return None if got is None and reference is None else f"gradient {got} where the reference has {reference}"
    atol, rtol = TOLERANCE[c.dtype]
    # values larger than 1 (a large scale over wide heads sharpens the softmax, and bf16/fp16 eager rounds
    # scores of that size coarsely; gradients summed over many tokens): the absolute tolerance grows with
    # the largest magnitude
    reference = reference.double()
    atol *= max(1.0, magnitude)
    error = (got.double() - reference).abs() - rtol * reference.abs()
    worst = float(torch.nan_to_num(error, nan=float("inf")).max()) if error.numel() else 0.0
    if worst > atol or not torch.equal(got.isnan(), reference.isnan()):
        return f"max excess error {worst:.3g} > atol {atol:g}"
    return None
