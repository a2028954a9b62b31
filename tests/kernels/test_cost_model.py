"""cost_model: fitting fixed per-call costs from rows at several shapes, tables keyed by
implementation and direction, the CPU ideal, the first-use measurement and its cache.

Fits of exact synthetic rows must recover the law they came from to 1e-9 (float64 least squares).
"""
import json
import math

import pytest
import torch

from scaling_compiler import cost_model
from scaling_compiler.cost_model import (BACKWARD, DENSE, FORWARD, FP8, MEASURE_SHAPES, TABLES, CostModel, Shape,
                                         fit_line,
                                         measure_rows, measured_model, row)
from scaling_compiler.kernels import dispatch
from scaling_compiler.kernels.dispatch import Implementation

TMA, POINTER = Implementation.TRITON_TMA.value, Implementation.TRITON_POINTER.value
TINY_DIT = Shape("tiny-dit-9x64x64", 2, 4, 9216, 64)  # the README demo's sites: CFG batch 2, 4 heads of 64
WAN = Shape("wan1.3b-480p", 1, 12, 32760, 128)
SHAPES = (Shape("small", 1, 4, 1024, 64), Shape("mid", 2, 4, 4096, 64), TINY_DIT, WAN)


def flops(shape: Shape) -> float:
    return 4.0 * shape.B * shape.H * shape.S**2 * shape.D


# An H200-like world where the README demo's slowdown happens: the sparse op pays 0.4 ms per call
# (mask pick, decode, launches, host work), SDPA 0.02 ms.
LAWS = {TMA: (0.40, 1 / 550e9), POINTER: (0.45, 1 / 300e9), DENSE: (0.02, 1 / 600e9)}
# backward (2.5x the forward's FLOPs): each Triton path has its backward, SDPA's backward faster per
# FLOP than ours, so that a training site's verdict can differ from its forward's
BACKWARD_LAWS = {TMA: (0.50, 2.5 / 120e9), POINTER: (0.55, 2.5 / 100e9), DENSE: (0.05, 2.5 / 500e9)}


def law_ms(implementation: str, shape: Shape, density: float, direction: str = FORWARD) -> float:
    overhead, per_flop = (LAWS if direction == FORWARD else BACKWARD_LAWS)[implementation]
    return overhead + per_flop * density * flops(shape)


def law_rows(implementations=(TMA, POINTER), densities=(1.0, 0.5, 0.25, 0.1)):
    rows = [row(DENSE, FORWARD, s, 1.0, law_ms(DENSE, s, 1.0)) for s in SHAPES]
    rows += [row(i, FORWARD, s, d, law_ms(i, s, d)) for i in implementations for s in SHAPES for d in densities]
    return rows


def test_fit_recovers_overhead_and_slope_from_several_shapes():
    rows = law_rows()
    for implementation in (TMA, POINTER):
        model = CostModel.from_rows(rows, implementation, FORWARD, "test")
        overhead, per_flop = LAWS[implementation]
        assert model.sparse_overhead_ms == pytest.approx(overhead, rel=1e-9)
        assert model.sparse_ms_per_flop == pytest.approx(per_flop, rel=1e-9)
        assert model.dense_overhead_ms == pytest.approx(LAWS[DENSE][0], rel=1e-9)
        assert model.dense_ms_per_flop == pytest.approx(LAWS[DENSE][1], rel=1e-9)


def test_fit_weighs_relative_error_and_clamps_a_negative_intercept():
    # +-5% noise on the two big calls must not swamp the intercept the small calls pin down
    law = lambda x: 0.1 + 1e-12 * x
    points = [(1e9, law(1e9)), (3e9, law(3e9)), (1e12, law(1e12) * 1.05), (1e13, law(1e13) * 0.95)]
    overhead, _ = fit_line(points)
    assert overhead == pytest.approx(0.1, rel=0.02)
    x, y = torch.tensor(points, dtype=torch.float64).T
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert abs(float(y.mean() - slope * x.mean()) - 0.1) > 0.02  # plain least squares: 0.134
    overhead, per_flop = fit_line([(1e9, 0.5), (2e9, 2.0)])  # a line through them crosses below 0
    assert overhead == 0.0 and per_flop == pytest.approx((1e9 * 0.5 / 0.25 + 2e9 * 2.0 / 4) / (1e18 / 0.25 + 4e18 / 4))


def test_tables_are_keyed_by_implementation_and_direction():
    rows = law_rows(implementations=(TMA,))
    assert CostModel.from_rows(rows, TMA, FORWARD, "t").sparse_overhead_ms == pytest.approx(0.40)
    assert CostModel.from_rows(rows, POINTER, FORWARD, "t") is None  # no rows of its own
    assert CostModel.from_rows(rows, TMA, "backward", "t") is None  # a backward gets its own rows
    backward = [dict(r, direction="backward", ms=2 * r["ms"]) for r in rows]
    both = CostModel.from_rows(rows + backward, TMA, "backward", "t")
    assert both.sparse_ms_per_flop == pytest.approx(2 * LAWS[TMA][1], rel=1e-9)


# the FP8 op in an H200-like world: a quantisation prep reading q, k, v at ~0.45 TB/s whatever the
# density (0.34 ms at the Wan2.1-1.3B shape), then 0.85x the 16-bit op's time
FP8_PREP_MS_PER_BYTE, FP8_RATIO = 1 / 0.45e9, 0.85


def shape_bytes(shape: Shape) -> int:
    return cost_model.qkv_bytes(shape.B, shape.H, shape.S, shape.S, shape.D)


def fp8_law_ms(shape: Shape, density: float) -> float:
    return FP8_PREP_MS_PER_BYTE * shape_bytes(shape) + FP8_RATIO * law_ms(TMA, shape, density)


def fp8_rows(shapes=SHAPES, densities=(1.0, 0.5, 0.25, 0.1)):
    return [row(FP8, FORWARD, s, d, fp8_law_ms(s, d), versus=TMA, versus_ms=law_ms(TMA, s, d))
            for s in shapes for d in densities]


@pytest.mark.parametrize("shapes", [SHAPES, (WAN,)], ids=["several shapes", "one shape"])
def test_fp8_rows_fit_prep_and_kernel_ratio_forward_only(shapes):
    """From FP8 rows holding the time of the 16-bit op they were timed beside (one shape is enough: the
    prep is per byte, the rest a ratio); they serve only the model of that op."""
    rows = law_rows(implementations=(TMA,))
    model = CostModel.from_rows(rows + fp8_rows(shapes), TMA, FORWARD, "t")
    assert model.fp8_prep_ms_per_byte == pytest.approx(FP8_PREP_MS_PER_BYTE, rel=1e-6)
    assert model.fp8_kernel_ratio == pytest.approx(FP8_RATIO, rel=1e-6)
    assert (model.sparse_overhead_ms, model.sparse_ms_per_flop) == pytest.approx(LAWS[TMA], rel=1e-9)  # unchanged
    half = torch.full((12,), 0.5)
    assert model.fp8_sparse_ms(flops(WAN), half, shape_bytes(WAN)) == pytest.approx(fp8_law_ms(WAN, 0.5), rel=1e-6)
    assert CostModel.from_rows(rows, TMA, FORWARD, "t").fp8_sparse_ms(flops(WAN), half, shape_bytes(WAN)) is None
    pointer = law_rows(implementations=(POINTER,)) + fp8_rows(shapes)
    assert CostModel.from_rows(pointer, POINTER, FORWARD, "t").fp8_kernel_ratio is None  # timed beside TMA
    backward = [dict(r, direction=BACKWARD) for r in rows + fp8_rows(shapes)]
    assert CostModel.from_rows(backward, TMA, BACKWARD, "t").fp8_kernel_ratio is None  # the FP8 op has no backward
    assert model.plus(model).fp8_sparse_ms(flops(WAN), half, shape_bytes(WAN)) is None  # training: forward + backward


@pytest.mark.parametrize("density, runs_fp8", [(1.0, True), (0.1, False)])
def test_fp8_runs_only_where_predicted_faster(density, runs_fp8):
    """west_fast's plan of a Wan-sized site: with FP8 rows, FP8 is refused (with both times) where its
    prep outweighs its faster kernel; without FP8 rows there is no objection."""
    from scaling_compiler.policies.west_fast.plan import build_plan
    from scaling_compiler.sites import Site

    site = Site("blocks.0.attn1", None, None, WAN.B, WAN.H, WAN.H, WAN.S, WAN.S, WAN.D, torch.bfloat16,
                torch.device("cpu"), (), WAN.D**-0.5, None, False, False, 0.0, None, "", ())
    nb = (WAN.S + 127) // 128
    masks = (torch.rand(1, WAN.H, nb, nb, generator=torch.Generator().manual_seed(0)) < density) | (density == 1.0)
    rows = law_rows(implementations=(TMA,))
    plan = build_plan(site, masks, (density,), torch.zeros(1, WAN.H, dtype=torch.int64), torch.tensor([500.0]), "t",
                      None, CostModel.from_rows(rows + fp8_rows(), TMA, FORWARD, "t"))
    assert plan.fp8_predicted_ms == pytest.approx(FP8_PREP_MS_PER_BYTE * shape_bytes(WAN) + FP8_RATIO * plan.predicted_ms,
                                                  rel=1e-6)
    refusal = plan.fp8_refusal()
    assert (refusal is None) == runs_fp8
    if not runs_fp8:
        assert refusal == (f"cost model: FP8 {plan.fp8_predicted_ms:.3g} ms (quantisation included) is not 5% "
                           f"below the 16-bit kernel's {plan.predicted_ms:.3g} ms")
    no_fp8 = build_plan(site, masks, (density,), torch.zeros(1, WAN.H, dtype=torch.int64), torch.tensor([500.0]), "t",
                        None, CostModel.from_rows(rows, TMA, FORWARD, "t"))
    assert no_fp8.fp8_predicted_ms is None and no_fp8.fp8_refusal() is None


def test_small_sites_with_big_fixed_costs_are_predicted_slower_than_dense():
    """The README demo on an H200: the ideal model said 4x; with fixed costs, sparse is slower at
    the tiny DiT's size (so the planner keeps it dense) and still pays at the Wan2.1-1.3B layer."""
    model = CostModel.from_rows(law_rows(), TMA, FORWARD, "test")
    quarter = torch.full((4,), 0.25)
    assert model.sparse_ms(flops(TINY_DIT), quarter) > model.dense_ms(flops(TINY_DIT))
    assert model.sparse_ms(flops(WAN), torch.full((12,), 0.25)) < 0.5 * model.dense_ms(flops(WAN))
    ideal = CostModel.ideal("ideal: no GPU")
    assert ideal.dense_ms(flops(TINY_DIT)) / ideal.sparse_ms(flops(TINY_DIT), quarter) == pytest.approx(4.0)


def test_cpu_gets_the_ideal_model():
    model = CostModel.for_device(torch.device("cpu"))
    assert model.source == "ideal: no GPU"
    f = flops(TINY_DIT)
    assert model.sparse_ms(f, torch.tensor([0.1, 0.3], dtype=torch.float64)) == pytest.approx(0.2 * model.dense_ms(f), rel=1e-12)
    assert model.sparse_overhead_ms == model.dense_overhead_ms == 0.0


def test_first_format_h100_table_reads_as_the_tma_forward():
    model = CostModel.from_table(TABLES / "nvidia-h100-80gb-hbm3.json")
    assert model.source == "committed table nvidia-h100-80gb-hbm3.json"
    f = flops(WAN)
    assert model.dense_ms(f) == pytest.approx(11.57, rel=0.02)  # cuDNN's measured 11.57 ms
    assert model.sparse_ms(f, torch.full((12,), 0.1)) == pytest.approx(1.29, rel=0.15)  # measured 1.29 ms
    assert CostModel.from_table(TABLES / "nvidia-h100-80gb-hbm3.json", POINTER) is None


class FakeClock:
    """Times by the laws above, counting calls (no GPU)."""
    def __init__(self, direction: str = FORWARD):
        self.calls = 0
        self.direction = direction

    def __call__(self, implementation, shape, density):
        self.calls += 1
        return density, law_ms(implementation, shape, density, self.direction)


def test_measured_table_cache_round_trip(tmp_path):
    clock = FakeClock()
    shapes = SHAPES[:3]
    model = measured_model("NVIDIA Fake GPU", POINTER, FORWARD, clock, root=tmp_path, shapes=shapes)
    assert clock.calls == len(shapes) * 5  # dense + 4 densities per shape
    (path,) = tmp_path.glob("*.json")
    assert model.source == f"measured on first use, cached at {path}"
    table = json.loads(path.read_text())
    import triton
    assert (table["gpu"], table["implementation"], table["torch"], table["triton"]) == \
        ("NVIDIA Fake GPU", POINTER, torch.__version__, triton.__version__)
    assert "nvidia-fake-gpu" in path.name and POINTER.replace("_", "-") in path.name
    assert model.sparse_overhead_ms == pytest.approx(LAWS[POINTER][0], rel=1e-9)
    assert model.dense_overhead_ms == pytest.approx(LAWS[DENSE][0], rel=1e-9)

    def no_clock(*args):
        raise AssertionError("a cached table must not be measured again")
    assert measured_model("NVIDIA Fake GPU", POINTER, FORWARD, no_clock, root=tmp_path, shapes=shapes) == model

    table["torch"] = "0.0.1"  # written by another setup: measured again, not used
    path.write_text(json.dumps(table))
    again = measured_model("NVIDIA Fake GPU", POINTER, FORWARD, clock, root=tmp_path, shapes=shapes)
    assert clock.calls == 2 * len(shapes) * 5 and again == model
    assert json.loads(path.read_text())["torch"] == torch.__version__


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A CUDA device on this CPU machine: a name, a capability and a cache folder."""
    def make(name, major):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(dispatch, "device_capability", lambda device: (major, 0))
        monkeypatch.setenv("SCALINGATTN_CACHE_DIR", str(tmp_path))
        cost_model._for_gpu.cache_clear()
        return torch.device("cuda", 0)
    yield make
    cost_model._for_gpu.cache_clear()


def test_for_device_prefers_the_committed_table(fake_gpu, monkeypatch):
    device = fake_gpu("NVIDIA H100 80GB HBM3", 9)
    monkeypatch.setattr(cost_model, "op_timer", lambda device: pytest.fail("measured despite a committed table"))
    assert CostModel.for_device(device).source == "committed table nvidia-h100-80gb-hbm3.json"


def test_for_device_measures_a_gpu_without_a_table(fake_gpu, monkeypatch, tmp_path):
    device = fake_gpu("NVIDIA A100-SXM4-80GB", 8)  # Ampere: no TMA, the pointer path, no committed table
    clock = FakeClock()
    monkeypatch.setattr(cost_model, "op_timer", lambda device: clock)
    model = CostModel.for_device(device)
    (path,) = (tmp_path / "cost_tables").glob("*.json")
    assert model.source == f"measured on first use, cached at {path}"
    assert json.loads(path.read_text())["implementation"] == POINTER
    assert clock.calls == len(MEASURE_SHAPES) * 5
    assert model.sparse_overhead_ms == pytest.approx(LAWS[POINTER][0], rel=1e-9)
    assert CostModel.for_device(device) is model  # once per process
    assert CostModel.for_device(device, direction="backward").source.startswith("ideal: no measured backward")


def test_measure_shapes_include_the_demo_and_wan():
    assert TINY_DIT in MEASURE_SHAPES and WAN in MEASURE_SHAPES
    assert min(flops(s) for s in MEASURE_SHAPES) < flops(TINY_DIT) / 50  # small shapes pin the overhead


@pytest.mark.parametrize("implementation", [Implementation.TORCH_BLOCKWISE.value, POINTER])
def test_op_timer_runs_the_op_path_on_cpu(implementation):
    """The timer's calls run (CPU: the block-wise op; the pointer path forced in the interpreter)
    and report the mask's real kept fraction."""
    import os
    if implementation == POINTER and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("forcing a Triton path on CPU tensors needs the interpreter")
    outputs = []

    def one_call(fn):
        outputs.append(fn())
        return 1.5

    measure = cost_model.op_timer(torch.device("cpu"), time_fn=one_call, dtype=torch.float32)
    shape = Shape("t", 1, 2, 300, 32)
    assert measure(DENSE, shape, 1.0) == (1.0, 1.5)
    assert measure(implementation, shape, 1.0) == (1.0, 1.5)
    density, _ = measure(implementation, shape, 0.5)
    assert 0.0 < density < 1.0
    rows = measure_rows(implementation, FORWARD, measure, [shape], [1.0])
    assert [(r["implementation"], r["density"], r["ms"]) for r in rows] == [(DENSE, 1.0, 1.5), (implementation, 1.0, 1.5)]
    for out in outputs:
        out = out[0] if isinstance(out, tuple) else out
        assert out.shape == (1, 2, 300, 32) and torch.isfinite(out).all()
    full = outputs[1][0] if isinstance(outputs[1], tuple) else outputs[1]
    dense = outputs[0]
    assert (full - dense).abs().max() < 1e-4  # all blocks kept: the sparse op is dense attention (fp32)
    assert math.isclose(density, 0.5, abs_tol=0.35)


def test_write_committed_table_for_both_triton_paths(fake_gpu, monkeypatch, tmp_path):
    """`python -m scaling_compiler.cost_model --write DIR` on a TMA GPU: rows for the TMA and the
    pointer path and dense rows, in each direction, read back as committed tables; a rerun merges."""
    fake_gpu("NVIDIA H200", 9)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cost_model, "op_timer", lambda device, direction=FORWARD: FakeClock(direction))
    out = tmp_path / "tables"
    cost_model.main(["--write", str(out)])
    path = out / "nvidia-h200.json"
    rows = json.loads(path.read_text())["rows"]
    per_shape = len(cost_model.MEASURE_DENSITIES)
    count = lambda implementation, direction: sum((r["implementation"], r["direction"]) == (implementation, direction)
                                                  for r in rows)
    assert count(DENSE, FORWARD) == count(DENSE, BACKWARD) == len(MEASURE_SHAPES)
    assert count(TMA, FORWARD) == count(POINTER, FORWARD) == len(MEASURE_SHAPES) * per_shape
    assert count(TMA, BACKWARD) == count(POINTER, BACKWARD) == len(MEASURE_SHAPES) * per_shape
    for implementation in (TMA, POINTER):
        model = CostModel.from_table(path, implementation)
        assert model.source == "committed table nvidia-h200.json"
        assert model.sparse_overhead_ms == pytest.approx(LAWS[implementation][0], rel=1e-9)
    for implementation in (TMA, POINTER):
        backward = CostModel.from_table(path, implementation, BACKWARD)
        assert backward.sparse_overhead_ms == pytest.approx(BACKWARD_LAWS[implementation][0], rel=1e-9)
        assert backward.dense_ms_per_flop == pytest.approx(BACKWARD_LAWS[DENSE][1], rel=1e-9)
    extra = row(TMA, "backward", Shape("other", 1, 2, 512, 64), 0.5, 1.0)
    cost_model.write_table(path, [extra], cost_model.environment("NVIDIA H200"))  # merged, not replaced
    assert len(json.loads(path.read_text())["rows"]) == len(rows) + 1
    # a new measurement at the same nominal density replaces the old one, whatever fraction its masks kept
    other = Shape("other", 1, 2, 512, 64)
    again = [row(TMA, "backward", other, 0.5006, 1.5, nominal_density=0.5),
             row(TMA, "backward", other, 0.2491, 0.7, nominal_density=0.25)]
    cost_model.write_table(path, again[:1], cost_model.environment("NVIDIA H200"))
    cost_model.write_table(path, [row(TMA, "backward", other, 0.4994, 1.4, nominal_density=0.5), again[1]],
                           cost_model.environment("NVIDIA H200"))
    kept = [r for r in json.loads(path.read_text())["rows"] if r["shape"] == "other"]
    assert sorted((r.get("nominal_density", r["density"]), r["ms"]) for r in kept) == [(0.25, 0.7), (0.5, 1.4)]


def test_for_device_fits_the_backward_from_committed_rows(fake_gpu, monkeypatch, tmp_path):
    """Each implementation's backward is fitted from its own committed rows; a training site's model
    adds the forward's and the backward's lines."""
    device = fake_gpu("NVIDIA H200", 9)
    rows = law_rows(implementations=(TMA,))
    rows += [row(DENSE, BACKWARD, s, 1.0, law_ms(DENSE, s, 1.0, BACKWARD)) for s in SHAPES]
    rows += [row(i, BACKWARD, s, d, law_ms(i, s, d, BACKWARD)) for i in (TMA, POINTER) for s in SHAPES
             for d in (1.0, 0.5, 0.1)]
    cost_model.write_table(tmp_path / "nvidia-h200.json", rows, cost_model.environment("NVIDIA H200"))
    monkeypatch.setattr(cost_model, "TABLES", tmp_path)
    monkeypatch.setattr(cost_model, "op_timer", lambda *a, **k: pytest.fail("measured despite a committed table"))
    for implementation, laws in ((None, TMA), (TMA, TMA), (POINTER, POINTER)):
        backward = CostModel.for_device(device, implementation, BACKWARD)
        assert backward.source == "committed table nvidia-h200.json"
        assert (backward.sparse_overhead_ms, backward.sparse_ms_per_flop) == pytest.approx(BACKWARD_LAWS[laws], rel=1e-9)
        assert (backward.dense_overhead_ms, backward.dense_ms_per_flop) == pytest.approx(BACKWARD_LAWS[DENSE], rel=1e-9)
    training = CostModel.for_training(device)
    forward = CostModel.for_device(device)
    half = torch.full((12,), 0.5)
    assert training.source == "committed table nvidia-h200.json + committed table nvidia-h200.json"
    assert training.sparse_ms(flops(WAN), half) == pytest.approx(
        forward.sparse_ms(flops(WAN), half) + law_ms(TMA, WAN, 0.5, BACKWARD), rel=1e-9)
    assert training.dense_ms(flops(WAN)) == pytest.approx(law_ms(DENSE, WAN, 1.0) + law_ms(DENSE, WAN, 1.0, BACKWARD))


def test_backward_without_rows_is_the_ideal_at_its_flops():
    """No backward rows (here: no GPU): the ideal at 2.5x the forward's time per FLOP, so that a
    training site's sum weighs the backward as its FLOPs do."""
    forward, backward = (CostModel.for_device(torch.device("cpu"), direction=d) for d in (FORWARD, BACKWARD))
    assert backward.dense_ms(flops(WAN)) == pytest.approx(cost_model.BACKWARD_FLOP_RATIO * forward.dense_ms(flops(WAN)))
    training = CostModel.for_training(torch.device("cpu"))
    assert training.dense_ms(flops(WAN)) == pytest.approx(3.5 * forward.dense_ms(flops(WAN)))
    assert training.sparse_ms(flops(WAN), torch.full((2,), 0.2)) == pytest.approx(0.2 * training.dense_ms(flops(WAN)))


def test_training_site_verdict_counts_the_backward(fake_gpu, monkeypatch, tmp_path):
    """west_fast's plan of a Wan-sized site at density 0.5: sparse pays in the forward alone, but a
    training site adds a backward that does not pay (BACKWARD_LAWS), so it stays dense."""
    from scaling_compiler.config import Config
    from scaling_compiler.policies.west_fast.plan import build_plan, unless_slower
    from scaling_compiler.policies.west_fast.policy import WestFastPolicy
    from scaling_compiler.sites import Site

    device = fake_gpu("NVIDIA H200", 9)
    rows = law_rows(implementations=(TMA,))
    rows += [row(DENSE, BACKWARD, s, 1.0, law_ms(DENSE, s, 1.0, BACKWARD)) for s in SHAPES]
    rows += [row(TMA, BACKWARD, s, d, law_ms(TMA, s, d, BACKWARD)) for s in SHAPES for d in (1.0, 0.5)]
    cost_model.write_table(tmp_path / "nvidia-h200.json", rows, cost_model.environment("NVIDIA H200"))
    monkeypatch.setattr(cost_model, "TABLES", tmp_path)
    policy = WestFastPolicy(Config.from_options({"density": 0.5, "masks": "local_band"}))
    nb = (WAN.S + 127) // 128
    masks = (torch.arange(nb)[:, None] + torch.arange(nb)[None, :]) % 2 == 0  # half the blocks
    masks = masks.expand(1, WAN.H, nb, nb)
    verdicts = {}
    for requires_grad in (False, True):
        site = Site("blocks.0.attn1", None, None, WAN.B, WAN.H, WAN.H, WAN.S, WAN.S, WAN.D, torch.bfloat16, device, (),
                    WAN.D**-0.5, None, False, False, 0.0, None, "", (), requires_grad=requires_grad)
        cost = policy.cost_model(device, site.requires_grad)
        plan = build_plan(site, masks, (0.5,), torch.zeros(1, WAN.H, dtype=torch.int64), torch.tensor([500.0]),
                          "test", None, cost)
        backward = law_ms(DENSE, WAN, 1.0, BACKWARD) if requires_grad else 0.0
        assert plan.dense_ms == pytest.approx(law_ms(DENSE, WAN, 1.0) + backward, rel=1e-6)
        verdicts[requires_grad] = unless_slower(plan, cost)
    assert not isinstance(verdicts[False], str)  # inference: sparse
    assert isinstance(verdicts[True], str) and "+ committed table" in verdicts[True]  # training: dense


@pytest.mark.parametrize("implementation", [Implementation.TORCH_BLOCKWISE.value, POINTER])
def test_op_timer_times_the_backward_on_cpu(implementation):
    """The backward timer's calls run the op's backward (forced to the pointer path in the
    interpreter) and SDPA's backward; with every block kept their gradients agree (fp32)."""
    import os
    if implementation == POINTER and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("forcing a Triton path on CPU tensors needs the interpreter")
    outputs = []

    def one_call(fn):
        outputs.append(fn())
        outputs.append(fn())  # repeatable: the forward's graph and out / lse are kept
        return 2.5

    measure = cost_model.op_timer(torch.device("cpu"), time_fn=one_call, dtype=torch.float32, direction=BACKWARD)
    shape = Shape("t", 1, 2, 300, 32)
    assert measure(DENSE, shape, 1.0) == (1.0, 2.5)
    assert measure(implementation, shape, 1.0) == (1.0, 2.5)
    dense, sparse = outputs[0], outputs[2]
    for d, s in zip(dense, sparse):
        assert s.shape == (1, 2, 300, 32) and torch.isfinite(s).all()
        assert (d - s).abs().max() < 1e-4
    assert measure_rows(implementation, BACKWARD, measure, [shape], [1.0])[1]["direction"] == BACKWARD
