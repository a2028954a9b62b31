"""examples/finetune_salad.py --quick on the CPU: SALAD's branches tune (the loss falls), are saved, and
reload into a fresh compile to the same outputs.

About 60-90 s on two cores: one WEST calibration, 8 forward+backward steps of the 6-layer tiny DiT at
768 tokens beside its dense teacher, then a second compile that loads the saved branches.
"""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.variants import backend_options
from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel
from scaling_compiler.salad import read_metadata
from tests.examples import load_example

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example():
    return load_example("finetune_salad")


@pytest.fixture(scope="module")
def tuned(example, tmp_path_factory):
    torch._dynamo.reset()
    out = tmp_path_factory.mktemp("salad")
    return example.main(["--quick", "--out", str(out)])


def test_quick_tuning_lowers_the_loss_without_recompiling(tuned):
    summary, losses = tuned["summary"], tuned["losses"]
    assert summary["steps"] == len(losses) == 8 and summary["videos_seen"] == 8
    # --quick cycles 2 fixed batches: the first two steps and the last two see the same data
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.8 * first, losses
    assert summary["recompiles"] == 0  # one graph for every step: the masks follow the timestep input
    out = Path(tuned["args"].out)
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)) and records[-1]["loss"] == pytest.approx(losses[-1])
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_checkpoints_record_the_density_and_held_out_prompts(tuned):
    out = Path(tuned["args"].out)
    assert (out / "branches_step4.safetensors").is_file() and (out / "branches_step8.safetensors").is_file()
    metadata = read_metadata(tuned["path"])
    assert float(metadata["density"]) == 0.1
    tuning = json.loads(metadata["tuning"])
    assert tuning["steps"] == 8 and tuning["sampler_steps"] == 2 and tuning["video"] == [3, 32, 32]
    assert len(tuning["held_out_prompts"]) == 8 and tuning["train_seed_base"] >= 1000
    assert tuning["lr"] == 1e-3 and tuning["warmup"] == 0  # the recipe is recorded (--quick's)


def test_init_continues_from_saved_branches(example, tuned, tmp_path):
    """--init starts from a run's branches: the first step's loss is below the fresh run's (same data),
    and the new file records where it started."""
    torch._dynamo.reset()
    again = example.main(["--quick", "--out", str(tmp_path), "--init", str(tuned["path"])])
    assert again["losses"][0] < 0.8 * tuned["losses"][0], (again["losses"], tuned["losses"])
    assert json.loads(read_metadata(again["path"])["tuning"])["init"] == str(tuned["path"])


def test_default_recipe(example):
    # the GPU recipe (peak lr chosen on the CPU at 5x32x32, see the module docstring); --quick keeps its own
    args = example.parse_args(["--device", "cpu"])
    assert (args.lr, args.warmup, args.batch, args.micro_batch, args.sampler_steps) == (5e-3, 20, 8, 1, 30)
    quick = example.parse_args(["--quick"])
    assert (quick.lr, quick.warmup, quick.batch, quick.steps) == (1e-3, 0, 1, 8)


def test_training_labels_never_hit_held_out_prompts(example):
    from scaling_compiler.demo import synthetic_videos as sv

    held_out = {tuple(sv.parse_prompt(p).tolist()) for p in sv.EVAL_PROMPTS}
    labels = example.training_labels(2000, torch.Generator().manual_seed(0))
    assert not held_out & {tuple(row) for row in labels.tolist()}


def test_saved_branches_reload_to_identical_outputs(example, tuned):
    args, model = tuned["args"], tuned["model"]
    assert any(p.abs().sum() > 0 for name, p in tuned["backend"].linear_branches.named_parameters()
               if name.endswith("proj.weight"))  # tuned: no longer the zero projection
    batch = example.make_batch(args, 100, tuned["video"])
    with torch.no_grad():
        expected = tuned["student"](batch.video, batch.timestep, batch.tokens)
        torch._dynamo.reset()
        fresh = torch.compile(model, backend=example.student_backend(args, weights=tuned["path"]), fullgraph=True,
                              dynamic=False)
        reloaded = fresh(batch.video, batch.timestep, batch.tokens)
        torch._dynamo.reset()
        sparse_only = torch.compile(model, backend=example.student_backend(args), fullgraph=True, dynamic=False)
        untuned = sparse_only(batch.video, batch.timestep, batch.tokens)
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)
    assert (untuned - expected).abs().max() > 1e-3  # the branches change the output: the check has teeth


def _west_fast_masks(example, args, model, inputs) -> dict[str, torch.Tensor]:
    """The masks of the quality harness's "west:fast" variant at the tuning's settings, compiled on
    `inputs`, calibrated afresh (no cache)."""
    options = backend_options("west:fast", args.density, "eager", args.sampler_steps)
    backend = ScalingAttnBackend(**options, calibration_samples=args.calibration_samples, cache=False,
                                 cost_model=CostModel.ideal("test: every site sparse"))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs)
    return backend.report.masks


def test_tuning_runs_the_masks_the_harness_calibrates(example, tuned):
    """The student compiles on the harness's own compiling call, so its masks are the ones the harness's
    west:fast variant calibrates for itself; compiled on a tuning batch they differ (the check has teeth:
    WEST calibrates from the compiling call's inputs)."""
    args, model, video = tuned["args"], tuned["model"], tuned["video"]
    tuned_masks = tuned["backend"].reports[0].masks
    harness = _west_fast_masks(example, args, model, example.harness_compile_call(model.config.in_channels, video,
                                                                                   torch.device("cpu")))
    assert tuned_masks.keys() == harness.keys() and tuned_masks
    assert all(torch.equal(tuned_masks[name], harness[name]) for name in harness)
    batch = example.make_batch(args, 0, video)
    on_a_batch = _west_fast_masks(example, args, model, (batch.video, batch.timestep, batch.tokens))
    assert any(not torch.equal(on_a_batch[name], harness[name]) for name in harness)
