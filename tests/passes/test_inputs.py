"""Graph inputs classified from dynamo's records, on static and symbolic graphs alike, and the
calibration inputs made from them (only floating activations randomised)."""
import torch
from torch import nn

from scaling_compiler.passes.inputs import InputKind, annotate_inputs, find_timestep, graph_inputs
from scaling_compiler.policies.west_fast.calibrate import calibration_inputs
from scaling_compiler.sites import TimestepInput

TABLE = torch.arange(6.0)  # a global tensor the model reads: model state, not an input


class Mixed(nn.Module):
    """Every kind of graph input: parameters, an integer buffer, a float tensor attribute, a global,
    a float attribute, a dict argument holding the timestep, integer position ids, a bool mask."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.embed = nn.Embedding(16, 6)
        self.register_buffer("offsets", torch.arange(6))
        self.table = torch.linspace(0, 1, 6)
        self.gain = 0.5

    def forward(self, x, positions, keep, conditioning):
        timestep = conditioning["timestep"]
        h = self.proj(x) + self.embed(positions) + self.table + TABLE + self.offsets.float()
        return (h * self.gain + timestep[:, None, None]) * keep[..., None]


EXPECTED = {  # source name -> kind (the parameters of proj and embed aside)
    "L['x']": InputKind.ACTIVATION,
    "L['positions']": InputKind.ACTIVATION,
    "L['keep']": InputKind.ACTIVATION,
    "L['conditioning']['timestep']": InputKind.ACTIVATION,
    "G['TABLE']": InputKind.CONSTANT,
}


def _inputs(batch, seq=5):
    generator = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, seq, 6, generator=generator), torch.randint(0, 16, (batch, seq), generator=generator),
            torch.ones(batch, seq, dtype=torch.bool), {"timestep": torch.full((batch,), 700.0)})


def _compile_and_capture(dynamic):
    """Run the model through a backend that records each graph and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        annotate_inputs(gm)
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    model = Mixed()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        for batch in (1, 2, 3):
            compiled(*_inputs(batch))
    return graphs


def _check(gm):
    inputs = {graph_input.source: graph_input for graph_input in graph_inputs(gm)}
    for source, kind in EXPECTED.items():
        assert inputs[source].kind is kind, (source, inputs[source])
    assert inputs["L['conditioning']['timestep']"].name == "timestep"
    kinds = {graph_input.kind for graph_input in inputs.values()}
    params = [i for i in inputs.values() if i.kind is InputKind.PARAMETER]
    assert sorted(i.name for i in params) == ["bias", "weight", "weight"]
    assert [i.name for i in inputs.values() if i.kind is InputKind.BUFFER] == ["offsets"]
    assert [i.name for i in inputs.values() if i.kind is InputKind.CONSTANT and "table" in i.source] == ["table"]
    return kinds


def test_inputs_classified_on_static_and_symbolic_graphs():
    """Read after dynamo has dropped its records (once the backend returned), as a per-shape copy is."""
    static = _compile_and_capture(dynamic=None)
    symbolic_kinds = None
    for gm, examples in static:
        assert all("grapharg" not in n.meta for n in gm.graph.nodes)  # dynamo cleaned up after the backend
        kinds = _check(gm)
        symbolic = any(isinstance(x, torch.SymInt) for x in examples)
        if symbolic:
            symbolic_kinds = kinds
            assert InputKind.SCALAR in kinds  # the SymInt sizes
    assert symbolic_kinds is not None  # the automatic-dynamic recompile after a batch change
    assert not any(isinstance(x, torch.SymInt) for x in static[0][1])  # and the first, static graph
    gm, examples = _compile_and_capture(dynamic=True)[-1]
    _check(gm)
    gain = [i for i in graph_inputs(gm) if i.source == "L['self'].gain"]
    assert [i.kind for i in gain] == [InputKind.MODEL_SCALAR]  # dynamic=True passes the float as a 0-d tensor


def test_timestep_found_on_every_graph():
    for dynamic in (None, True):
        for gm, examples in _compile_and_capture(dynamic):
            timestep = find_timestep(gm, examples, None)
            assert timestep is not None
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            assert graph_inputs(gm)[timestep.position].source == "L['conditioning']['timestep']"
            assert placeholders[timestep.position].meta["example_value"].dim() == 1
            assert timestep.timestep_max == 1000.0


def test_calibration_randomises_only_floating_activations():
    graphs = _compile_and_capture(dynamic=None)
    assert any(isinstance(x, torch.SymInt) for x in graphs[-1][1])
    for gm, examples in graphs:
        timestep = find_timestep(gm, examples, 800.0)
        assert timestep == TimestepInput(timestep.position, 800.0)
        for sample in range(3):
            inputs = calibration_inputs(gm, examples, sample, seed=0, timestep=timestep)
            for position, (graph_input, example, value) in enumerate(zip(graph_inputs(gm), examples, inputs)):
                if position == timestep.position:
                    assert value.dtype == example.dtype and not torch.equal(value, example)
                    assert bool(((value >= 0) & (value < 800.0)).all())
                elif graph_input.source == "L['x']":
                    assert value.shape == example.shape and not torch.equal(value, example)
                else:  # weights, buffers, constants, integer ids, the bool mask and the sizes: as they are
                    assert value is example, graph_input


def test_integer_timestep_randomised_in_range_and_stays_integer():
    def backend(gm, example_inputs):
        annotate_inputs(gm)
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    graphs = []
    model = nn.Embedding(1000, 4)
    torch._dynamo.reset()
    torch.compile(lambda timestep: model(timestep), backend=backend)(torch.tensor([999, 999]))
    [(gm, examples)] = graphs
    timestep = find_timestep(gm, examples, None)
    [value] = [v for v, i in zip(calibration_inputs(gm, examples, 0, 0, timestep=timestep), graph_inputs(gm))
               if i.name == "timestep"]
    assert value.dtype == torch.int64 and bool(((value >= 0) & (value < 1000)).all())
