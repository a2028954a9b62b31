"""The backend under diffusers' step-cache hooks (`transformer.enable_cache(config)`), on the project's
trained tiny video DiT and its CFG sampler, and on the zoo's tiny Wan.

A cache hook wraps the blocks' forwards: dynamo traces through the wrappers, breaks the graph
where a hook decides at run time (FirstBlockCache's residual test and MagCache's and SeaCache's
heads are `torch.compiler.disable`d: what they wrap runs eagerly, unrewritten) and recompiles as
the hooks' state changes from step to step (PyramidAttentionBroadcast). It compiles each wrapped
block forward once and runs that graph for every block (parameters are graph inputs): the backend
compiles it again for each block's parameters, so each block keeps masks of its own
(per_weights.py; the reports say `same_graph_as`).

Tolerances: at density 1.0 the backend equals the same cached model under plain torch.compile
within 1e-5 (fp32 attention in another order; the hooks' decisions are thresholds on the outputs,
and none sits that close to one); at density 0.5 one step equals the model with float64
attention under the reported masks within 1e-4 (rounding of the surrounding fp32 layers).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import hooks

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import sampling, video_dit, zoo

from tests.attention_reference import NumberedReports, masked_sites

VIDEO = (3, 2, 16, 32)  # (C, F, H, W): 2 x 8 x 16 = 256 tokens, 2 blocks of 128
STEPS = 3


@dataclasses.dataclass
class Clock:
    """The current step's timestep, for the hooks that ask a callback for it (PAB)."""

    timestep: float = 1000.0

    def context(self, transformer):
        cache_context = sampling.diffusers_cache_context(transformer)

        def step(i, timestep, sigma, steps):
            self.timestep = timestep
            return cache_context(i, timestep, sigma, steps)
        return step


def first_block_cache(clock):
    return hooks.FirstBlockCacheConfig(threshold=2.0)  # high: the later steps of 3 reuse the residual


def pyramid_attention_broadcast(clock):
    return hooks.PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 900),
        current_timestep_callback=lambda: clock.timestep)


def mag_cache(clock):
    return hooks.MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5, retention_ratio=0.3)


def sea_cache(clock):
    return hooks.SeaCacheConfig(threshold=1.0)


def taylorseer_cache(clock):
    return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=0, taylor_factors_dtype=torch.float32)


# hook -> (config from a clock, whether the backend sees attention under it)
HOOKS = {
    "FirstBlockCache": (first_block_cache, True),
    "PyramidAttentionBroadcast": (pyramid_attention_broadcast, True),  # recompiles as the skipped layers change
    "SeaCache": (sea_cache, True),  # its leader (first) block runs eagerly, the others compiled
    "TaylorSeerCache": (taylorseer_cache, True),  # one graph, no break
    "MagCache": (mag_cache, False),  # its head hook, around every block, is torch.compiler.disable'd
}
NOT_HERE = {  # hooks diffusers offers that these models cannot run, compiled or not
    "FasterCache": "fails eagerly too on a CFG batch in one call (its unconditional-branch reuse adds tensors "
                   "of batch 2B and B: 'size of tensor a (2) must match ... (4)')",
    "TextKVCache": "hooks NucleusMoEImageTransformerBlock only: nothing to apply to Wan",
}


def cached_demo_model(hook):
    model = video_dit.load_pretrained()
    clock = Clock()
    model.transformer.enable_cache(HOOKS[hook][0](clock))
    return model, clock.context(model.transformer)


class WanVelocity(torch.nn.Module):
    """The zoo's tiny Wan as a `sampling.VelocityModel`: condition tokens embedded as its text."""

    def __init__(self, hook):
        super().__init__()
        torch.manual_seed(0)
        self.wan = zoo.build("WanTransformer3DModel")
        self.embed = torch.nn.Embedding(4, self.wan.config.text_dim)
        self.clock = Clock()
        self.wan.enable_cache(HOOKS[hook][0](self.clock))

    def forward(self, video, timestep, tokens):
        return self.wan(video, timestep, self.embed(tokens), return_dict=False)[0]


def sample(model, step_context, compiler, video=VIDEO):
    torch._dynamo.reset()
    run = model if compiler is None else torch.compile(model, backend=compiler)
    tokens = torch.tensor([[1, 2, 3]])
    return sampling.sample(run, tokens, torch.zeros_like(tokens), video, steps=STEPS, step_context=step_context)


def ours(density):
    return ScalingAttnBackend(compiler="aot_eager", density=density, calibration_samples=2)


def block_reports(backend):
    return [r for r in backend.reports if any(s.kind == "self" for s in r.sites)]


def assert_density_one_equals_plain(make, hook, video):
    """`make()` -> (model, step_context) under `hook`: sampled with the backend at density 1.0 and with
    plain torch.compile; the backend sees the blocks' attention unless the hook hides it."""
    plain = sample(*make(), "aot_eager", video)
    backend = ours(1.0)
    out = sample(*make(), backend, video)
    assert out.isfinite().all()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    if HOOKS[hook][1]:
        assert block_reports(backend)
        assert all(s.status == "sparse" for r in block_reports(backend) for s in r.sites if s.kind == "self")
    else:
        assert not any(r.sites for r in backend.reports)
        assert "no softmax attention in any graph" in backend.summary()


def wan_under(hook):
    model = WanVelocity(hook)
    return model, model.clock.context(model.wan)


WAN_VIDEO = (4, 3, 24, 24)  # (C, F, H, W) of the zoo's Wan: 3 x 12 x 12 = 432 tokens


@pytest.mark.parametrize("hook", [pytest.param(h, marks=[] if h == "FirstBlockCache" else pytest.mark.slow)
                                  for h in HOOKS] + list(NOT_HERE))
def test_cached_wan_samples_density_one_equals_plain_compile(hook):
    if hook in NOT_HERE:
        pytest.skip(f"{hook}: {NOT_HERE[hook]}")
    assert_density_one_equals_plain(lambda: wan_under(hook), hook, WAN_VIDEO)


@pytest.mark.slow
@pytest.mark.parametrize("hook", list(HOOKS))
def test_cached_demo_model_density_one_equals_plain_compile(hook):
    assert_density_one_equals_plain(lambda: cached_demo_model(hook), hook, VIDEO)


@pytest.mark.slow
def test_first_block_cache_gives_each_block_masks_of_its_own():
    """The trained demo DiT under FirstBlockCache: dynamo runs one graph for blocks 1..4; each gets its
    own compile and masks, and the sampled video differs from the dense one but stays finite."""
    model, context = cached_demo_model("FirstBlockCache")
    backend = ours(0.5)
    out = sample(model, context, backend)
    blocks = block_reports(backend)
    assert len(blocks) >= model.config.num_layers
    reused = [r for r in blocks if r.same_graph_as is not None]
    assert reused and {r.same_graph_as for r in reused} <= {r.graph_index for r in blocks}
    masks = [next(iter(r.masks_at(500.0).values())) for r in blocks]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])
    assert "compiled again for each module's parameters" in backend.summary()
    assert out.isfinite().all()
    dense = sample(*cached_demo_model("FirstBlockCache"), None)
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["FirstBlockCache", "PyramidAttentionBroadcast"])
def test_cached_wan_step_equals_masked_reference(hook):
    """One step of a 4-layer tiny Wan under the hook (every block computes on a first step; under
    FirstBlockCache blocks 1 and 2 run one dynamo graph): the backend at density 0.5 equals the model
    with float64 attention under each block's reported masks."""
    inputs, outputs = None, []
    for compiler in (ours(0.5), None):
        torch.manual_seed(0)
        cached = zoo.build("WanTransformer3DModel", {"num_layers": 4})
        inputs = inputs or zoo.example_inputs("WanTransformer3DModel", cached, (3, 24, 24))
        clock = Clock(timestep=500.0)
        cached.enable_cache(HOOKS[hook][0](clock))
        torch._dynamo.reset()
        with torch.no_grad(), clock.context(cached)(0, 500.0, 0.5, STEPS):
            if compiler is not None:
                outputs.append(torch.compile(cached, backend=compiler)(**inputs)[0])
                backend = compiler
            else:
                with masked_sites(NumberedReports(backend.reports), 500.0):
                    outputs.append(cached(**inputs)[0])
    self_sites = [s for r in backend.reports for s in r.sites if s.kind == "self"]  # one per block
    assert len(self_sites) == 4 and all(s.status == "sparse" and s.density < 1 for s in self_sites)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    cached.disable_cache()
    with torch.no_grad():
        assert (outputs[0] - cached(**inputs)[0]).abs().max() > 1e-3
