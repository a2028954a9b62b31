"""benchmarks.variants: variant specs -> backend options (fast: no model runs)."""
import pytest

from benchmarks import variants
from scaling_compiler.policies.dfsattn.schedule import DFSSchedule


def test_specs_become_options():
    options = variants.backend_options("west:uniform:0.2/morton", 0.25, "eager", steps=10)
    assert (options["masks"], options["schedule"], options["warmup"], options["token_order"]) == (
        "west", "uniform", 0.2, "morton")
    assert options["density"] == 0.25 and len(options["timesteps"]) == 10
    assert "schedule" not in variants.backend_options("window_3d", 0.5, "eager")
    with pytest.raises(ValueError):
        variants.backend_options("west:no_such_schedule", 0.25, "eager")


def test_density_one_runs_once_and_densities_go_highest_first():
    assert variants.variants(["west:fast", "window_3d"], [0.1, 1.0, 0.5, 0.1]) == [
        ("all_blocks", 1.0), ("west:fast", 0.5), ("window_3d", 0.5), ("west:fast", 0.1), ("window_3d", 0.1)]


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_dfsattn_variant_matches_the_density_with_dense_steps_counted(density):
    options = variants.backend_options("dfsattn", density, "eager", steps=30, num_k_blocks=72)  # 9x64x64 video
    assert options["policy"] == "dfsattn" and options["dense_layers"] == ()
    assert options["dense_steps"] == round(min(12 / 50, density / 2) * 30)
    assert options["refresh_interval"] == (30 - options["dense_steps"]) // 3
    ratios = options["keep_ratios"]
    assert ratios[0] > ratios[1] > ratios[2] and ratios[0] / ratios[2] == pytest.approx(3, rel=0.01)
    schedule = DFSSchedule(num_steps=30, dense_steps=options["dense_steps"], keep_ratios=ratios, dense_layers=(),
                           refresh_interval=options["refresh_interval"])
    assert schedule.density_report(1, 30, 72).including_dense_steps == pytest.approx(density, rel=0.03)
    with pytest.raises(ValueError, match="dense steps"):
        variants.backend_options("dfsattn:0.5", density, "eager", steps=30)
