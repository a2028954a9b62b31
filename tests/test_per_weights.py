"""A graph dynamo runs for several modules (regional compilation: `compile_repeated_blocks`) gets a
compile, a calibration and masks per module's parameters (per_weights.py)."""
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import zoo

from tests.attention_reference import NumberedReports, masked_sites

WAN = "WanTransformer3DModel"


def test_repeated_blocks_get_masks_of_their_own():
    """Three Wan blocks compiled regionally run one dynamo graph: three reports, the later two naming
    the first as `same_graph_as`, masks that differ between blocks, and the output of float64 attention
    under each block's masks. A second forward reuses the three compiles (no new report)."""
    torch.manual_seed(0)
    model = zoo.build(WAN, {"num_layers": 3})
    inputs = zoo.example_inputs(WAN, model, (3, 24, 24))
    backend = ScalingAttnBackend(compiler="aot_eager", density=0.5, calibration_samples=2)
    torch._dynamo.reset()
    model.compile_repeated_blocks(backend=backend)
    with torch.no_grad():
        out = model(**inputs)[0]
        again = model(**inputs)[0]
    reports = backend.reports
    assert len(reports) == 3
    assert [r.same_graph_as for r in reports] == [None, 0, 0]
    assert [r.to_dict()["same_graph_as"] for r in reports] == [None, 0, 0]
    assert "same dynamo graph as graph 0" in str(reports[1])
    masks = [r.masks_at(500.0)[s.name] for r in reports for s in r.sparse_sites]
    assert len(masks) == 3 and not torch.equal(masks[0], masks[1])
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), masked_sites(NumberedReports(reports), 500.0):
        expected = model(**inputs)[0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
