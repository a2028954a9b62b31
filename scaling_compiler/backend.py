"""The `scalingattn` dynamo backend: the passes, in order, over one graph record, then the inner compiler.

    detect -> admit (policy) -> reorder -> plan (policy: calibrate + tune) -> rewrite -> inner compiler

Each pass takes the `GraphRecord` (sites.py) and adds to it; the report is built from the final
record. The policy (`policies/`, chosen by the `policy` option) decides which blocks each site
keeps; nothing here depends on which policy runs.

`torch.compile(model, backend="scalingattn", options={...})` reaches `scalingattn_backend`
through the `torch_dynamo_backends` entry point (no import needed). `ScalingAttnBackend(**options)`
is the same backend as an object that keeps the reports.

Masks depend on sequence lengths. When dynamo hands over a graph with symbolic shapes
(its automatic-dynamic recompile after a shape change, or `dynamic=True`), the backend specialises
it per concrete input shape at call time, so every shape runs with masks made for it. The graph's
inputs are classified (passes/inputs.py) when dynamo hands it over, while dynamo's records of
where each input came from still exist; every per-shape copy keeps that classification, so
calibration keeps the weights and finds the timestep on every graph alike.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from . import ops  # noqa: F401  (registers torch.ops.scaling_compiler)
from .config import Config, InnerCompiler, options_dict
from .cost_model import CostModel
from .passes.detect import detect
from .passes.inputs import GraphInput, InputKind, annotate_inputs
from .passes.reorder import reorder
from .passes.rewrite import rewrite
from .policies import policy_class
from .policies.west_fast.fast import FitSettings
from .report import PassReport, build_report, compile_summary, graph_breaks
from .sites import GraphRecord

log = logging.getLogger(__name__)

CompiledFn = Callable[..., Any]


class ScalingAttnBackend:
    """A torch.compile backend object: `torch.compile(model, backend=ScalingAttnBackend(density=0.5))`.

    Besides the options: `fast_fit` sets the constants of FAST's fit (west_fast; the ablation
    benchmark varies them) and `cost_model` fixes the cost model (e.g. `CostModel.ideal(...)` to
    measure mask quality with every site sparse, whatever the device's measured costs).
    """

    def __init__(self, *, fast_fit: FitSettings | None = None, cost_model: CostModel | None = None,
                 **options: Any) -> None:
        self.config = Config.from_options(options)
        self.reports: list[PassReport] = []
        extensions = {"fast_fit": fast_fit} if fast_fit is not None else {}
        self.policy = policy_class(self.config.policy)(self.config, cost_model, **extensions)
        self._breaks_before = graph_breaks()  # dynamo's graph breaks are process-wide: count from here

    def summary(self) -> str:
        """All graphs this backend compiled: how many, why dynamo broke the model (where it says),
        which hold attention, and a hint when none does (`report.compile_summary`)."""
        return compile_summary(self.reports, graph_breaks() - self._breaks_before)

    @property
    def report(self) -> PassReport | None:
        """The report of the most recently compiled graph."""
        return self.reports[-1] if self.reports else None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None
                 ) -> CompiledFn:
        if mode is not None:  # torch.compile(..., backend=ScalingAttnBackend(...), mode=...)
            self.config = dataclasses.replace(self.config, mode=mode)
        inputs = annotate_inputs(gm)  # now: dynamo drops its records of the inputs once this returns
        if any(_is_symbolic(x) for x in example_inputs):
            log.info("graph has symbolic shapes: specialising per concrete shape at call time")
            return _PerShapeCompiled(self, gm, inputs)
        return self.compile_static(gm, list(example_inputs))

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledFn:
        """Run the passes on a graph whose example inputs have concrete shapes."""
        graph = GraphRecord(gm, example_inputs, self.config)
        for compile_pass in (detect, self.policy.admit, reorder, self.policy.plan, rewrite):
            compile_pass(graph)
        report = build_report(graph, len(self.reports))
        self.reports.append(report)
        # asked for explicitly: shown at the default log level; else TORCH_LOGS="+scaling_compiler"
        log.log(logging.WARNING if self.config.report else logging.DEBUG, "%s", report)
        extra = graph.extra_inputs
        compiled = _inner_compile(self.config, graph.gm, example_inputs + _static_examples(extra, example_inputs))
        return _Compiled(compiled, extra, graph.policy_state)


@dataclasses.dataclass
class _Compiled:
    """A compiled graph, the extra inputs it takes after the original ones, and the policy's run-time
    state its ops look up (alive as long as the graph)."""

    compiled: CompiledFn
    extra_inputs: list[torch.Tensor]
    policy_state: Any

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args, *self.extra_inputs)


class _PerShapeCompiled:
    """Compiles a symbolic-shape graph once per concrete input shape, on first use.

    Each shape gets a copy of the graph with the Python numbers dynamo passes as 0-d tensors on
    symbolic graphs (the model's scale or dropout p, a float argument) folded in as the constants
    they are on a static graph (keyed by value, as dynamo keys a static graph), and with fake
    values of the call's concrete shapes in every node's meta. The values keep `requires_grad` as
    the call computes it, so detection's gradient rule sees what it sees on a static graph.
    """

    def __init__(self, backend: ScalingAttnBackend, gm: torch.fx.GraphModule, inputs: list[GraphInput]) -> None:
        self.backend, self.gm, self.inputs = backend, gm, inputs
        self.by_shape: dict[tuple, CompiledFn] = {}

    def __call__(self, *args: Any) -> Any:
        key = self._key(args)
        compiled = self.by_shape.get(key)
        if compiled is None:
            gm = torch.fx.GraphModule(self.gm, _copy_graph(self.gm.graph))
            _fold_scalars(gm, self.inputs, args)
            _propagate(gm, args)
            compiled = self.by_shape[key] = self.backend.compile_static(gm, list(args))
        return compiled(*args)

    def _key(self, args: tuple[Any, ...]) -> tuple:
        """Shapes and dtypes of the tensors, the values of Python numbers (also those passed as tensors)."""
        key: list[Any] = [torch.is_grad_enabled()]
        for graph_input, arg in zip(self.inputs, args):
            if not isinstance(arg, torch.Tensor):
                key.append(arg)
            elif graph_input.kind in _SCALARS and arg.numel() == 1:
                key.append(arg.item())
            else:
                key.append((tuple(arg.shape), arg.dtype, arg.requires_grad))
        return tuple(key)


_SCALARS = (InputKind.SCALAR, InputKind.MODEL_SCALAR)


def _fold_scalars(gm: torch.fx.GraphModule, inputs: list[GraphInput], args: tuple[Any, ...]) -> None:
    """Replace `.item()` of Python numbers passed as 0-d tensors, and SymInt inputs (sizes), by their
    values, then fold the Python arithmetic on them, so an attention's scale or dropout p is a constant
    and sizes are the ints they are on a static graph (a hand-written `scores / n` is then found).

    (Left symbolic, an SDPA scale fails fake propagation: its meta function guards on the value.)"""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    constants: dict[torch.fx.Node, Any] = {}
    for node, graph_input, arg in zip(placeholders, inputs, args):
        if graph_input.kind in _SCALARS and isinstance(arg, torch.Tensor) and arg.numel() == 1:
            constants.update({user: arg.item() for user in node.users
                              if user.op == "call_method" and user.target == "item"})
        elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
            constants[node] = arg  # a SymInt size (the sequence length in `scores / n`): its value
    if not constants:
        return
    for node in list(gm.graph.nodes):
        if node in constants:
            continue
        foldable = node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "math")
        if foldable and node.all_input_nodes and all(parent in constants for parent in node.all_input_nodes):
            args_, kwargs_ = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constants[n])
            constants[node] = node.target(*args_, **kwargs_)
    for node, value in constants.items():
        for user in list(node.users):
            user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs),
                                                           lambda n: value if n is node else n)
    for node in reversed(list(constants)):
        if not node.users and node.op != "placeholder":  # the call still passes every input
            gm.graph.erase_node(node)
    gm.recompile()


class _GradFakeTensorProp(FakeTensorProp):
    """FakeTensorProp that keeps `requires_grad` in the recorded values (its snapshots detach)."""

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        value = node.meta.get("val")
        if isinstance(result, torch.Tensor) and result.requires_grad and isinstance(value, torch.Tensor):
            node.meta["val"] = value.detach().requires_grad_(True)
        return result


def _propagate(gm: torch.fx.GraphModule, args: tuple[Any, ...]) -> None:
    """Fake values of the concrete call in every node's meta.

    Shapes are the call's, fixed; an `.item()` left in the graph (of a tensor, not of a folded
    number) gives an unbacked symbol rather than failing.
    """
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    mode.allow_scalar_outputs = True
    fake_args = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    _GradFakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_args)


def scalingattn_backend(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> CompiledFn:
    """Entry point for `torch.compile(..., backend="scalingattn", options={...})` (or `mode=...`:
    torch.compile takes one of the two)."""
    return ScalingAttnBackend(**options_dict(options))(gm, example_inputs, mode)


def _inner_compile(config: Config, gm: torch.fx.GraphModule, inputs: list[Any]) -> CompiledFn:
    compiler = config.compiler
    if compiler is InnerCompiler.INDUCTOR:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, inputs, config_patches=list_mode_options(config.mode) if config.mode else None)
    if compiler is InnerCompiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, inputs)
    return gm.forward


def _static_examples(extra_inputs: list[torch.Tensor], example_inputs: list[Any]) -> list[torch.Tensor]:
    """The mask tensors as fake tensors of fixed shape in dynamo's fake mode.

    Handed over as real tensors, AOT autograd fakeifies them with fresh dynamic size symbols that
    dynamo's guards cannot name (no source): a guard on one fails the whole compile with
    "sources must not be empty for symbol sN".
    """
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return extra_inputs
    return [fake_mode.from_tensor(tensor, static_shapes=True) for tensor in extra_inputs]


def _is_symbolic(x: Any) -> bool:
    if isinstance(x, torch.SymInt):
        return True
    return isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy
