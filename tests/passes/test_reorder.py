"""The reorder pass on a dynamo graph: the same function, the attention sees its tokens along the curve."""
import pytest
import torch

from scaling_compiler.passes.detect import detect
from scaling_compiler.passes.reorder import reorder
from scaling_compiler.policies.token_order import sequence_order

from .graphs import VideoAttention, dynamo_graph, video_inputs


def run(graph):
    with torch.no_grad():
        return graph.gm(*graph.example_inputs)


@pytest.mark.parametrize("order", ["morton", "hilbert"])
@pytest.mark.parametrize("joint", [False, True])
def test_curve_order_computes_the_same_function(order, joint):
    model, inputs = VideoAttention(joint=joint, layers=2), video_inputs(frames=2, height=16, width=24)
    before = dynamo_graph(model, *inputs, passes=(detect,))
    outputs = []
    graph = dynamo_graph(model, *inputs, passes=(detect, reorder, lambda g: outputs.append(run(g))),
                         token_order=order)
    with torch.no_grad():
        expected = model(*inputs)
    torch.testing.assert_close(outputs[0][0], expected, rtol=1e-5, atol=1e-5)  # float32, summation order only
    moved = [site for site in graph.sites if site.token_order == order]
    assert [site.name for site in moved] == [s.name for s in before.sites if s.rewritable]
    for site in moved:
        for node in (site.q_node, site.k_node, site.v_node):  # the attention reads gathered tensors
            assert node.target is torch.index_select
        perm = getattr(graph.gm, site.q_node.args[2].target)
        torch.testing.assert_close(perm.cpu(), sequence_order(site.q_len, site.token_grid, site.text_spans, order))


def test_raster_order_and_sites_without_a_grid_are_left_alone():
    model, inputs = VideoAttention(), video_inputs()
    graph = dynamo_graph(model, *inputs, passes=(detect,))
    gm, sites = graph.gm, graph.sites
    reorder(graph)  # raster: nothing to do
    assert graph.gm is gm and graph.sites == sites
    graph = dynamo_graph(model, *inputs, passes=(detect,), token_order="hilbert")
    for site in graph.sites:
        site.token_grid = None
    gm = graph.gm
    reorder(graph)
    assert graph.gm is gm and all(site.token_order == "raster" for site in graph.sites)
