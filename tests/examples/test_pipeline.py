"""examples/pipeline.py: the diffusers pipeline path (a tiny WanPipeline with CFG) compiled with scalingattn."""
import pytest
import torch

from tests.examples import load_example

STEPS = 3
# the same pipeline, seed and CFG as the dense run; "eager" inner compiler: only the backend's
# rewrite differs from the dense pipeline, not inductor's kernels
ARGS = ["--steps", str(STEPS), "--guidance", "5.0", "--compiler", "eager", "--output-type", "latent"]


@pytest.fixture(scope="module")
def example():
    return load_example("pipeline")


def run(example, density):
    torch._dynamo.reset()
    return example.main(ARGS + ["--density", str(density)])


def test_density_one_equals_the_dense_pipeline(example):
    result = run(example, 1.0)
    dense, compiled = result["dense"], result["sparse"]
    assert dense.shape == (1, 16, 3, 32, 32) and torch.isfinite(dense).all()  # latents of 9 frames at 256x256
    # every block kept: the same attention up to float32 summation order, after 3 CFG steps
    torch.testing.assert_close(compiled, dense, rtol=1e-4, atol=1e-4)


def test_sparse_pipeline_uses_the_schedulers_timesteps(example):
    result = run(example, 0.5)
    backend, dense, sparse = result["backend"], result["dense"], result["sparse"]
    pipe_timesteps = example.build_pipeline().scheduler
    pipe_timesteps.set_timesteps(STEPS)
    expected = tuple(pipe_timesteps.timesteps.tolist())
    assert result["timesteps"] == expected and len(backend.reports) == 1  # CFG's two calls share one graph
    report = backend.report
    self_sites = [s for s in report.sites if s.kind == "self"]
    assert len(self_sites) == 2 and all(s.status == "sparse" for s in self_sites)  # CPU: the ideal cost model
    assert all(s.status == "dense" for s in report.sites if s.kind == "cross")
    assert report.schedule == "fast"
    # the step's masks are picked from the transformer's timestep input among the scheduler's values
    assert report.step_source.startswith("timestep input #")
    assert report.step_source.endswith(f"nearest of the {STEPS} given timesteps")
    torch.testing.assert_close(report.step_timesteps, torch.tensor(expected, dtype=torch.float32))
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense, atol=1e-3)
