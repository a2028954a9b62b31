"""benchmarks.quality's "salad" variant: branch files by density, refused at another density, and a
--quick run beside "west:fast" on the CPU (the same masks, the branch changes the videos)."""
import json

import pytest
import torch

from benchmarks import quality
from scaling_compiler.demo import synthetic_videos as sv
from scaling_compiler.salad import LinearBranches

SITES = [f"transformer.blocks.{i}.attn1" for i in range(6)]  # the tiny DiT's self-attention sites


def branch_file(path, density: float, seed: int = 0):
    """A branch file for the tiny DiT as examples/finetune_salad.py writes it, with random projections."""
    branches = LinearBranches()
    torch.manual_seed(seed)
    for name in SITES:
        _, branch = branches.branch_for(name, 4, 64, torch.device("cpu"), None)
        torch.nn.init.normal_(branch.proj.weight, std=0.02)
    tuning = {"density": density, "sampler_steps": 2, "video": [3, 32, 32], "train_seed_base": 1_000_000,
              "held_out_prompts": list(sv.EVAL_PROMPTS)}
    return branches.save(path, {"density": repr(density), "tuning": json.dumps(tuning)})


def test_salad_needs_a_file_tuned_at_each_density(tmp_path):
    path = branch_file(tmp_path / "b.safetensors", 0.5)
    args = quality.parse_args(["--quick", "--variants", "salad", "--densities", "0.5", "--salad-weights", str(path)])
    assert quality.salad_file(args, 0.5) == str(path)
    with pytest.raises(SystemExit):  # argparse's error: no file tuned at 0.25
        quality.parse_args(["--quick", "--variants", "salad", "--densities", "0.25", "--salad-weights", str(path)])
    with pytest.raises(ValueError, match="tuned: 0.5"):
        args.variants, args.densities = ["salad"], [0.25]
        quality.salad_file(args, 0.25)
    with pytest.raises(SystemExit):  # two files at one density
        other = branch_file(tmp_path / "c.safetensors", 0.5)
        quality.parse_args(["--quick", "--variants", "salad", "--salad-weights", str(path), str(other)])


def test_held_out_is_checked_against_the_tuning_record():
    tuning = {"held_out_prompts": list(sv.EVAL_PROMPTS), "train_seed_base": 1_000_000}
    assert quality.salad_held_out(tuning, [(sv.EVAL_PROMPTS[0], 0), (sv.EVAL_PROMPTS[1], 7)])
    assert not quality.salad_held_out(tuning, [("red circle grow", 0)])  # a prompt tuning could draw
    assert not quality.salad_held_out(tuning, [(sv.EVAL_PROMPTS[0], 1_000_000)])  # a tuning seed
    assert not quality.salad_held_out({}, [(sv.EVAL_PROMPTS[0], 0)])  # no record: not known to be held out


@pytest.mark.slow
def test_quick_run_reports_salad_beside_west_fast(tmp_path):
    path = branch_file(tmp_path / "b.safetensors", 0.5)
    result = quality.main(["--quick", "--variants", "west:fast", "salad", "--densities", "0.5", "--salad-weights",
                           str(path), "--calibration-samples", "1", "--compiler", "eager", "--out", str(tmp_path),
                           "--cache-dir", str(tmp_path / "cache")])
    by_name = {v["variant"]: v for v in result["variants"]}
    assert set(by_name) == {"west:fast@0.5", "salad@0.5"}
    west, salad = by_name["west:fast@0.5"], by_name["salad@0.5"]
    assert salad["masks"] == "west" and salad["schedule"] == "fast"
    assert salad["salad"]["weights"] == str(path) and salad["salad"]["held_out"]
    assert salad["backend_config"]["linear_branch"] and salad["backend_config"]["linear_branch_weights"] == str(path)
    # the same masks, dense steps counted alike; the (random) branches change the videos
    assert salad["density_used"] == west["density_used"]
    assert 0 < salad["psnr_mean"] < 200 and salad["psnr_mean"] != west["psnr_mean"]
    [gain] = result["salad_gains"]
    assert gain["density"] == 0.5 and gain["held_out"]
    assert gain["psnr_gain_db"] == pytest.approx(salad["psnr_mean"] - west["psnr_mean"])
