"""FAST: fidelity curves, the fitted schedule, step-dependent masks in one compiled graph, the cost model."""
import dataclasses

import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import zoo
from scaling_compiler.config import Config
from scaling_compiler.cost_model import CostModel
from scaling_compiler.passes.detect import detect_sites
from scaling_compiler.policies.west_fast.fast import (
    DENSITY_LADDER, FidelityCurve, FitSettings, fast_schedule, fidelity_curve, fidelity_from_recall,
    step_weighted_fidelity, uniform_schedule,
)
from scaling_compiler.policies.west_fast.policy import WestFastPolicy
from scaling_compiler.sites import GraphRecord
from scaling_compiler.policies.west_fast.topology import SiteTopology, thresholds_from_significance

from tests.attention_reference import masked_sites

GRID = (3, 48, 48)  # 3 x 24 x 24 = 1,728 tokens, 14 blocks


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALINGATTN_CACHE_DIR", str(tmp_path / "cache"))


def peaked_topology(heads=4, n=16, seed=0):
    """Block significance with a few strong blocks per row (sharper for higher heads)."""
    torch.manual_seed(seed)
    sharpness = torch.linspace(1.0, 4.0, heads)[:, None, None]
    mass = torch.rand(heads, n, n).pow(sharpness * 4)
    mass = mass / (mass.sum(-1, keepdim=True) * 128)  # each block row sums to 1 over its keys
    return SiteTopology(thresholds_from_significance(mass), mass, n * 128, n * 128, None, (), "calibrated")


def test_fidelity_from_recall():
    recall = torch.tensor([0.0, 0.25, 0.81, 1.0], dtype=torch.float64)
    expected = 1 - (1 - recall.sqrt()).sqrt()
    torch.testing.assert_close(fidelity_from_recall(recall), expected)
    assert fidelity_from_recall(torch.tensor(1.0)) == 1.0


def test_fidelity_is_monotone_in_density():
    topo = peaked_topology()
    curve = fidelity_curve(topo)
    # raw recall of nested masks, without the curve's monotone envelope
    for h in range(4):
        recalls = [topo.recall(topo.mask_for_density(d)[0])[h] for d in DENSITY_LADDER]
        assert all(a >= b - 1e-12 for a, b in zip(recalls, recalls[1:]))
    assert (curve.fidelity[:, :-1] >= curve.fidelity[:, 1:]).all()
    # what the masks really keep: falls with the ladder, never below one block per row (1/16)
    assert (curve.kept[:, :-1] >= curve.kept[:, 1:]).all() and (curve.kept >= 1 / 16 - 1e-12).all()
    assert curve.kept[:, -1].max() == pytest.approx(1 / 16)  # the ladder's 0.03 keeps one block per row
    torch.testing.assert_close(curve.fidelity[:, 0], torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("target", [0.5, 0.25, 0.1])
def test_fast_schedule_meets_density_target(target):
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(6)]
    schedule = fast_schedule(curves, steps=50, density=target, min_fidelity=None)
    assert abs(schedule.mean_density - target) <= 0.01 * target
    # strict early, loose late: the first step is denser than the last on every layer
    for i in range(6):
        per_step = schedule.density(i).mean(-1)
        assert per_step[0] >= per_step[-1]
    assert schedule.density(0)[0].mean() >= schedule.mean_density  # shallowest layer, first step: strict
    # the per-head floor: no (layer, step, head) after the dense steps takes a ladder density below
    # FitSettings().head_floor x the density those steps have
    dense = schedule.dense_steps
    after = (target * 50 - dense) / (50 - dense)
    for densities, index in zip(schedule.densities, schedule.index):
        assert torch.tensor(densities)[index[dense:]].min() >= FitSettings().head_floor * after - 1e-12
    # density never rises from one step to the next (the surface and the warm-up are both monotone)
    for i in range(6):
        assert (schedule.density(i)[1:] <= schedule.density(i)[:-1] + 1e-12).all()


@pytest.mark.parametrize("target", [0.3, 0.12])
def test_fast_fits_the_warmup(target):
    """Without the `warmup` option the fit tries each of FitSettings.warmups that leaves the sparse steps
    FitSettings().head_floor x the target, and keeps the best step-weighted fidelity; warmup=0 turns the dense
    steps off."""
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(6)]
    fitted = fast_schedule(curves, steps=30, density=target, min_fidelity=None)
    assert abs(fitted.mean_density - target) <= 0.01 * target
    # at 0.3, 2 dense steps of 30 leave 0.25 >= 0.75 x 0.3, 3 leave 0.222 < 0.225; at 0.12, 2 leave 0.057
    allowed = {0.3: (0.0, 0.05), 0.12: (0.0,)}[target]
    fixed = {f: fast_schedule(curves, steps=30, density=target, min_fidelity=None, warmup=f) for f in allowed}
    assert fitted.dense_steps in {round(f * 30) for f in fixed}
    scores = {f: step_weighted_fidelity(s, FitSettings().step_weight) for f, s in fixed.items()}
    assert step_weighted_fidelity(fitted, FitSettings().step_weight) == pytest.approx(max(scores.values()))
    assert fixed[0.0].dense_steps == 0 and (fixed[0.0].density(0)[0] < 1.0).any()


def test_fast_chooses_dense_steps_when_sparse_levels_buy_nothing():
    """Heads whose fidelity is the same at every density below 1: only dense steps add fidelity,
    and early ones weigh most, so the fit takes the longest warm-up that keeps the floor (at 0.6,
    4 dense steps of 20 leave 0.5 >= 0.75 x 0.6)."""
    fidelity = torch.linspace(0.3, 0.6, 8, dtype=torch.float64)[:, None].repeat(1, len(DENSITY_LADDER))
    fidelity[:, 0] = 1.0
    kept = torch.tensor(DENSITY_LADDER, dtype=torch.float64).expand(8, -1)
    curves = [FidelityCurve(DENSITY_LADDER, fidelity, kept)] * 6
    schedule = fast_schedule(curves, steps=20, density=0.6, min_fidelity=None)
    assert schedule.dense_steps == round(max(FitSettings().warmups) * 20) == 4
    assert abs(schedule.mean_density - 0.6) <= 0.01 * 0.6
    # at 0.3 only 1 dense step keeps it (2 would leave 0.222 < 0.225)
    assert fast_schedule(curves, steps=20, density=0.3, min_fidelity=None).dense_steps == 1


def test_step_weight_moves_density_to_early_steps():
    """Unweighted, mean fidelity is blind to when a step runs (the curves are the same at every
    step); weighting early steps gives them more of the same budget."""
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(6)]

    def early_share(weight):
        schedule = fast_schedule(curves, steps=30, density=0.25, min_fidelity=None, warmup=0.0,
                                 settings=FitSettings(step_weight=weight))
        per_step = torch.stack([schedule.density(i).mean(-1) for i in range(6)]).mean(0)
        return float(per_step[:10].mean())

    assert early_share(2.0) > early_share(0.0)


def test_unreachable_density_warns_and_comes_closest(caplog):
    """The ladder's sparsest mask keeps one of 16 blocks per row: 0.02 cannot be met; FAST says so and
    takes the sparsest schedule it has (no dense warm-up: that would only move further away)."""
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(3)]
    with caplog.at_level("WARNING", logger="scaling_compiler.policies.west_fast.fast"):
        schedule = fast_schedule(curves, steps=10, density=0.02, min_fidelity=None)
    assert "cannot meet density 0.02" in caplog.text
    assert schedule.dense_steps == 0
    assert schedule.mean_density == pytest.approx(min(c.kept.min().item() for c in curves), rel=0.05)


def test_min_fidelity_floor_holds_everywhere():
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(3)]
    schedule = fast_schedule(curves, steps=10, density=None, min_fidelity=0.9)
    for i, curve in enumerate(curves):
        chosen = torch.gather(curve.fidelity.expand(10, -1, -1), 2, schedule.index[i][..., None])
        assert (chosen >= 0.9 - 1e-12).all()
    assert schedule.mean_density < 1.0


def test_uniform_schedule_with_warmup():
    schedule = uniform_schedule([2, 2], steps=50, density=0.3, warmup=0.2)
    density = schedule.density(0)
    assert (density[:10] == 1.0).all() and torch.allclose(density[10:], torch.tensor(0.125, dtype=torch.float64))
    assert schedule.mean_density == pytest.approx(0.3)
    with pytest.raises(ValueError, match="warmup"):
        uniform_schedule([2], steps=10, density=0.1, warmup=0.2)


@pytest.mark.parametrize("target", [0.3, 0.2])
def test_fast_schedule_after_dense_warmup(target):
    """FAST with warm-up: the first 10% of steps dense, the surface fitted over the rest, and the
    mean over all steps (dense ones counted) on target."""
    curves = [fidelity_curve(peaked_topology(seed=s)) for s in range(6)]
    schedule = fast_schedule(curves, steps=30, density=target, min_fidelity=None, warmup=0.1)
    assert abs(schedule.mean_density - target) <= 0.01 * target
    for i in range(6):
        density = schedule.density(i)
        assert (density[:3] == 1.0).all() and (density[3:] < 1.0).any()
    with pytest.raises(ValueError, match="warmup"):
        fast_schedule(curves, steps=10, density=0.1, min_fidelity=None, warmup=0.2)


def compile_wan(**options):
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel")
    backend = ScalingAttnBackend(compiler="aot_eager", calibration_samples=2, **options)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    return model, backend, compiled


def test_step_changes_masks_without_recompiling():
    model, backend, compiled = compile_wan(density=0.25, num_steps=10)
    kwargs = zoo.example_inputs("WanTransformer3DModel", model, GRID)
    outputs = {}
    for timestep in (999, 500, 30):  # first, middle and last step bins
        kwargs["timestep"] = torch.tensor([timestep])
        with torch.no_grad():
            outputs[timestep] = compiled(**kwargs)[0]
            with masked_sites(backend.report, timestep):
                expected = model(**kwargs)[0]
        torch.testing.assert_close(outputs[timestep], expected, rtol=1e-4, atol=1e-4)
    assert len(backend.reports) == 1  # one compile served every step
    report = backend.report
    first, last = report.masks_at(999), report.masks_at(30)
    assert any(not torch.equal(first[name], last[name]) for name in first)
    for site in report.sparse_sites:
        assert site.step_densities[0] > site.step_densities[-1]


def test_fast_report_fields():
    _, backend, compiled = compile_wan(density=0.25)
    kwargs = zoo.example_inputs("WanTransformer3DModel", zoo.build("WanTransformer3DModel"), GRID)
    with torch.no_grad():
        compiled(**kwargs)
    report = backend.report
    assert report.schedule == "fast" and "timestep input" in report.step_source
    for site in report.sparse_sites:
        assert "FAST beta=" in site.reason and "(fitted)" in site.reason and len(site.step_densities) == 10
        assert site.predicted_ms < site.dense_ms
    assert report.predicted_speedup > 1.0
    # the mean density over (layer, step, head) meets the target within 1% (blocks the masks keep)
    plans = report.plans.values()
    per_cell = torch.cat([
        torch.gather(p.block_masks.flatten(2).double().mean(-1), 0, p.level_index).flatten() for p in plans
    ])
    assert per_cell.mean().item() == pytest.approx(0.25, rel=0.01)
    # device memory: per site the packed masks at each of its densities and the (steps, H) choice,
    # plus one table of step timesteps
    expected = sum(p.block_masks.shape[0] * p.block_masks.shape[1] * p.block_masks.shape[2] * 4  # one word: 32 blocks
                   + p.level_index.numel() * 8 for p in plans) + 50 * 4
    assert report.mask_bytes == expected


def detected_sites():
    """The rewritable attention sites of the tiny Wan graph, as detection records them."""
    torch.manual_seed(0)
    model = zoo.build("WanTransformer3DModel")
    sites = []

    def capture(gm, example_inputs):
        sites.extend(site for site in detect_sites(gm) if site.rewritable)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(**zoo.example_inputs("WanTransformer3DModel", model, GRID))
    return sites


def planned(options: dict, cost: CostModel) -> list:
    """The detected sites of the Wan model as the west_fast policy plans them with `cost`."""
    config = Config.from_options(options)
    graph = GraphRecord(None, [], config, sites=[dataclasses.replace(site) for site in detected_sites()])
    WestFastPolicy(config, cost).plan(graph)
    return graph.sites


def test_cost_model_keeps_slow_sites_dense():
    options = {"density": 0.5, "masks": "local_band"}
    slow = CostModel("test: huge launch overhead", 1e-12, 1e3, 1e-12)
    ideal = CostModel("test: ideal", 1e-12, 0.0, 1e-12)
    assert all(site.plan is None and "cost model" in site.dense_reason for site in planned(options, slow))
    assert all(site.plan is not None for site in planned(options, ideal))


@pytest.mark.parametrize("density, sparse_per_flop, sparse", [
    # predicted from the pairs the band really keeps (the 64-token tail block weighs less):
    (0.9, 1.00e-12, True),  # keeps 0.915: 8.5% faster than dense on paper
    (0.9, 1.08e-12, False),  # 1.2% faster: inside the margin
    (0.5, 1.84e-12, True),  # keeps 0.509: 6.4% faster
    (0.5, 1.92e-12, False),  # 2.3% faster: inside the margin
    (1.0, 2.00e-12, True),  # density 1 always runs the op (the exactness check), even when slower
])
def test_cost_model_needs_a_margin_over_dense(density, sparse_per_flop, sparse):
    cost = CostModel("test", sparse_per_flop, 0.0, 1e-12)
    sites = planned({"density": density, "masks": "local_band"}, cost)
    assert all((site.plan is not None) == sparse for site in sites)
    if not sparse:
        assert all("not 5% below dense" in site.dense_reason for site in sites)


def test_table_cost_model_from_measured_h100_table():
    from scaling_compiler.cost_model import TABLES

    cost = CostModel.from_table(TABLES / "nvidia-h100-80gb-hbm3.json")
    flops = 4 * 12 * 32760**2 * 128
    assert cost.dense_ms(flops) == pytest.approx(11.57, rel=0.02)
    assert cost.sparse_ms(flops, torch.full((12,), 0.1)) == pytest.approx(1.29, rel=0.15)
    assert cost.sparse_ms(flops, torch.full((12,), 1.0)) < cost.dense_ms(flops) * 1.05


def test_fidelity_curve_needs_native_calibration():
    topo = peaked_topology()
    topo.mass = None
    with pytest.raises(ValueError, match="calibration mass"):
        fidelity_curve(topo)


def test_fidelity_curve_uses_sampled_rows():
    """Two sampled rows of one query block that disagree: the block mean says 0.5 recall for
    each, the rows say 1.0 and 0.0; the curve is the rows' mean fidelity."""
    heads, n = 1, 4
    mass = torch.full((heads, n, n), 1.0 / (n * 128))
    mass[0, 0] = torch.tensor([0.5, 0.5, 0.0, 0.0]) / 128  # block row 0: half in block 0, half in block 1
    thresholds = thresholds_from_significance(mass)
    rows = torch.zeros(heads, 2, n)
    rows[0, 0, 0], rows[0, 1, 1] = 1.0, 1.0  # row A only looks at key block 0, row B only at block 1
    by_block = SiteTopology(thresholds, mass, n * 128, n * 128, None, (), "calibrated")
    by_row = SiteTopology(thresholds, mass, n * 128, n * 128, None, (), "calibrated",
                          row_mass=rows, row_blocks=torch.tensor([0, 0]))
    density = 0.25  # one block per row
    [level] = [i for i, d in enumerate(DENSITY_LADDER) if d == density]
    kept_block = int(by_row.mask_for_density(density)[0][0, 0].nonzero()[0, 0])
    assert kept_block in (0, 1)
    expected_rows = (fidelity_from_recall(torch.tensor(1.0)) + fidelity_from_recall(torch.tensor(0.0))) / 2
    torch.testing.assert_close(fidelity_curve(by_row).fidelity[0, level].item(), expected_rows.item())
    # without rows: the mean over query blocks of the fidelity of each block's mean recall
    block_recall = torch.tensor([0.5, 0.25, 0.25, 0.25], dtype=torch.float64)
    torch.testing.assert_close(fidelity_curve(by_block).fidelity[0, level].item(),
                               fidelity_from_recall(block_recall).mean().item())


def test_option_validation():
    with pytest.raises(ValueError, match="'density' and 'min_fidelity' are exclusive"):
        Config.from_options({"density": 0.5, "min_fidelity": 0.9})
    with pytest.raises(ValueError, match="option 'warmup' must be a fraction"):
        Config.from_options({"density": 0.5, "warmup": 1.0})
    with pytest.raises(ValueError, match="needs masks='west'"):
        Config.from_options({"masks": "window_3d", "schedule": "fast"})
    with pytest.raises(ValueError, match="'num_steps'"):
        Config.from_options({"num_steps": 0})

