"""The `scalingattn` dynamo backend: the passes, in order, over one graph record, then the inner compiler.

    detect -> admit (policy) -> reorder -> plan (policy: calibrate + tune) [-> linear branches]
    -> rewrite -> inner compiler

Each pass takes the `GraphRecord` (sites.py) and adds to it; the report is built from the final
record. The policy (`policies/`, chosen by the `policy` option) decides which blocks each site
keeps; nothing here depends on which policy runs.

`torch.compile(model, backend="scalingattn", options={...})` reaches `scalingattn_backend`
through the `torch_dynamo_backends` entry point (no import needed). `ScalingAttnBackend(**options)`
is the same backend as an object that keeps the reports.

Masks depend on sequence lengths. When dynamo hands over a graph with symbolic shapes
(its automatic-dynamic recompile after a shape change, or `dynamic=True`), the backend specialises
it per concrete input shape at call time (`per_shape.py`), so every shape runs with masks made for it. The graph's
inputs are classified (passes/inputs.py) when dynamo hands it over, while dynamo's records of
where each input came from still exist; every per-shape copy keeps that classification, so
calibration keeps the weights and finds the timestep on every graph alike. A graph with sparse
sites that dynamo runs for several modules (repeated blocks under regional compilation or a
diffusers cache hook) is compiled again for each module's parameters (`per_weights.py`), so each
layer keeps masks of its own.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import is_fake

from . import ops  # noqa: F401  (registers torch.ops.scaling_compiler)
from .config import Config, InnerCompiler, options_dict
from .cost_model import CostModel
from .passes.detect import detect
from .passes.flatten_weights import FlatWeights, flatten_weights
from .passes.inputs import annotate_inputs
from .per_shape import PerShapeCompiled
from .per_weights import compile_per_weights
from .passes.reorder import reorder
from .passes.linear_branch import add_linear_branches
from .passes.rewrite import rewrite
from .policies import policy_class
from .policies.west_fast.fast import FitSettings
from .report import PassReport, build_report, compile_summary, graph_breaks
from .salad.branch import BranchWeights, LinearBranches
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
        self.linear_branches = LinearBranches()  # SALAD branches of every compiled site (option linear_branch)
        weights = self.config.linear_branch_weights
        self._branch_weights = BranchWeights(weights) if weights is not None else None
        self._breaks_before = graph_breaks()  # dynamo's graph breaks are process-wide: count from here

    def _linear_branches(self, graph: GraphRecord) -> None:
        if self.config.linear_branch:
            add_linear_branches(graph, self.linear_branches, self._branch_weights)

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
            return PerShapeCompiled(self.compile_static, gm, inputs)
        return self.compile_static(gm, list(example_inputs))

    def compile_static(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> CompiledFn:
        """Run the passes on a graph whose example inputs have concrete shapes: for the example's
        parameters, and again for other parameters the graph runs with (`per_weights.py`)."""
        return compile_per_weights(self._compile_graph, gm, example_inputs)

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list[Any], same_graph_as: int | None
                       ) -> tuple[CompiledFn, PassReport]:
        """The passes and the inner compiler over one graph; `same_graph_as`: the report of the graph's
        first parameters when this compile is for another module's."""
        graph = GraphRecord(gm, example_inputs, self.config)
        for compile_pass in (detect, self.policy.admit, reorder, self.policy.plan, self._linear_branches, rewrite):
            compile_pass(graph)
        report = build_report(graph, len(self.reports), same_graph_as)
        self.reports.append(report)
        # asked for explicitly: shown at the default log level; else TORCH_LOGS="+scaling_compiler"
        log.log(logging.WARNING if self.config.report else logging.DEBUG, "%s", report)
        extra = graph.extra_inputs
        gm, flat, inner_examples = flatten_weights(graph.gm, example_inputs)
        if flat is not None:
            try:
                compiled = _inner_compile(self.config, gm, flat.other_inputs(example_inputs)
                                          + _static_examples(extra + inner_examples, example_inputs))
                return _Compiled(compiled, extra, graph.policy_state, flat), report
            except Exception as error:  # noqa: BLE001 (a subclass the rebuild cannot trace: slower, not wrong)
                log.warning("scalingattn: graph %d: compiling its %d tensor-subclass weights as plain inner tensors "
                            "failed (%s: %s); they stay subclass inputs, which AOTAutograd unwraps on every call",
                            report.graph_index, len(flat.layouts), type(error).__name__, error)
        compiled = _inner_compile(self.config, graph.gm, example_inputs + _static_examples(extra, example_inputs))
        return _Compiled(compiled, extra, graph.policy_state), report


@dataclasses.dataclass
class _Compiled:
    """A compiled graph, the extra inputs it takes after the original ones, the policy's run-time
    state its ops look up (alive as long as the graph), and how its subclass weights were flattened
    (`passes/flatten_weights.py`; their inner tensors go last)."""

    compiled: CompiledFn
    extra_inputs: list[torch.Tensor]
    policy_state: Any
    flat_weights: FlatWeights | None = None

    def __call__(self, *args: Any) -> Any:
        if self.flat_weights is None:
            return self.compiled(*args, *self.extra_inputs)
        flat = self.flat_weights
        return self.compiled(*flat.other_inputs(args), *self.extra_inputs, *flat.leaves(args))


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
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from .passes.float8_activations import Float8ActivationFusion

        patches = dict(list_mode_options(config.mode)) if config.mode else {}
        patches["post_grad_custom_post_pass"] = Float8ActivationFusion(then=inductor_config.post_grad_custom_post_pass)
        return compile_fx(gm, inputs, config_patches=patches)
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
    return [tensor if is_fake(tensor) else fake_mode.from_tensor(tensor, static_shapes=True) for tensor in extra_inputs]


def _is_symbolic(x: Any) -> bool:
    if isinstance(x, torch.SymInt):
        return True
    return isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)
