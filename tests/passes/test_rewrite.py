"""The rewrite pass: a plan's op call replaces its site, extra inputs are appended (named ones once),
the replaced chain is erased, and the graph computes what the plans say."""
import dataclasses

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from scaling_compiler.passes.detect import detect
from scaling_compiler.passes.rewrite import rewrite
from scaling_compiler.sites import SitePlan, SitePlanSummary

from .graphs import VideoAttention, dynamo_graph, video_inputs

SDPA = torch._C._nn.scaled_dot_product_attention


@dataclasses.dataclass
class ScaledCopy(SitePlan):
    """Attention times a factor that arrives as a shared extra input, plus one private input per site."""

    factor: torch.Tensor

    def emit(self, rewriter, site, q, k, v, key_padding):
        factor = rewriter.add_input(self.factor, name="factor")
        offset = rewriter.add_input(torch.zeros(()))
        attention = rewriter.graph.call_function(SDPA, (q, k, v))
        return rewriter.graph.call_function(torch.add, (rewriter.graph.call_function(torch.mul, (attention, factor)),
                                                        offset))

    def summary(self, site):
        return SitePlanSummary("scaled copy", [1.0] * site.heads, None, None, 0.0, 0.0)


def sdpa_calls(gm):
    return sum(node.target is SDPA for node in gm.graph.nodes)


def test_plans_replace_their_sites_and_take_extra_inputs():
    model, inputs = VideoAttention(layers=2), video_inputs()
    factor = torch.tensor(3.0)

    def plan(graph):
        for site in graph.rewritable:
            site.plan = ScaledCopy(factor)

    outputs = []
    graph = dynamo_graph(model, *inputs, passes=(detect, plan, rewrite, lambda g: outputs.append(
        g.gm(*g.example_inputs, *g.extra_inputs))))
    planned = [site for site in graph.sites if site.plan is not None]
    assert len(planned) == 2 and len(graph.sites) == 4  # two self-attention sites; cross stays
    assert len(graph.extra_inputs) == 1 + len(planned)  # "factor" once, one offset per site
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    assert [n.name for n in placeholders[-3:]] == ["factor", "scalingattn_1", "scalingattn_2"]
    assert sdpa_calls(graph.gm) == 4  # each replaced call erased, each plan's own call added

    class Scaled(torch.overrides.TorchFunctionMode):  # eager model with the self-attention outputs x3
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is F.scaled_dot_product_attention:
                Scaled.calls += 1
                if Scaled.calls % 2 == 1:  # attn1 of each block
                    return out * 3.0
            return out

    with torch.no_grad(), Scaled():
        expected = model(*inputs)
    torch.testing.assert_close(outputs[0][0], expected, rtol=1e-5, atol=1e-5)


def test_nothing_planned_leaves_the_graph_as_it_is():
    graph = dynamo_graph(VideoAttention(), *video_inputs(), passes=(detect,))
    gm = graph.gm
    rewrite(graph)
    assert graph.gm is gm and graph.extra_inputs == []


def test_rewritten_graph_keeps_dynamos_metadata_and_static_extra_inputs():
    """AOTAutograd reports the weights as static inputs (CUDA graphs then do not copy them on every
    replay) only for a graph with dynamo's compile id, parameter sources and a source per placeholder;
    the rewrite keeps them, and marks its own inputs static too (the same tensors reach every call)."""
    model, inputs = VideoAttention(layers=2), video_inputs()

    def plan(graph):
        for site in graph.rewritable:
            site.plan = ScaledCopy(torch.tensor(3.0))

    seen = {}

    def before(graph):
        seen["meta"] = dict(graph.gm.meta)
        seen["sources"] = [n._dynamo_source for n in graph.gm.graph.nodes if n.op == "placeholder"]

    graph = dynamo_graph(model, *inputs, passes=(detect, plan, before, rewrite))
    assert "dynamo_compile_id" in seen["meta"]
    assert graph.gm.meta["dynamo_compile_id"] == seen["meta"]["dynamo_compile_id"]
    assert graph.gm._param_name_to_source is not None
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    originals, extras = placeholders[:len(seen["sources"])], placeholders[len(seen["sources"]):]
    assert [n._dynamo_source for n in originals] == seen["sources"] and None not in seen["sources"]
    assert len(extras) == len(graph.extra_inputs) == 3
    assert all(n._dynamo_source is None and n.meta["tensor_dict"]["_dynamo_static_input_type"] for n in extras)


@pytest.mark.parametrize("weights", ["plain", "int8"])
def test_inductor_sees_weights_and_masks_as_static_inputs(monkeypatch, weights):
    """Through the whole backend: the indices inductor gets as static (what CUDA graphs leave in place)
    are every weight of the model and every mask input. Before, the rewritten graph had none. With
    torchao int8 weights, the inner tensors the flatten pass hands over are static too."""
    import torch._inductor.compile_fx as compile_fx
    from scaling_compiler import ScalingAttnBackend
    from scaling_compiler.demo import zoo

    if not hasattr(compile_fx, "_compile_fx_inner"):
        pytest.skip("this torch has no compile_fx._compile_fx_inner to observe")
    seen = []
    inner = compile_fx._compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        seen.append((len(example_inputs), list(kwargs.get("static_input_idxs") or ())))
        return inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "_compile_fx_inner", spy)
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel")
    if weights == "int8":
        quantization = pytest.importorskip("torchao.quantization")
        quantization.quantize_(model.blocks, quantization.Int8WeightOnlyConfig(set_inductor_config=False))
    backend = ScalingAttnBackend(density=0.5, calibration_samples=1, schedule="uniform", cache=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**zoo.example_inputs("WanTransformer3DModel", model, (3, 24, 24)))
    assert backend.report.sparse_sites
    [(n_inputs, static)] = seen
    from scaling_compiler.passes.flatten_weights import SubclassLayout
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    # the inputs: dynamo's (flattened weights left out), one mask per sparse site (uniform schedule),
    # then the flattened weights' inner tensors
    leaves = sum(SubclassLayout.of(p).count() for p in model.parameters() if is_traceable_wrapper_subclass(p))
    masks = len(backend.report.sparse_sites)
    assert (leaves > 0) == (weights == "int8")
    first_mask = n_inputs - leaves - masks
    assert set(range(first_mask, n_inputs)) <= set(static)
    assert n_inputs - len(set(static)) == 3  # all but the activations: hidden states, timestep, text embeddings
