"""policy="dfsattn" in the backend: token reordering, run-time masks, schedule, CFG reuse, no recompilation.

The reference for a sparse step is the eager model with float64 attention restricted to the masks
the compiled graph used (read from the report's DFSAttn registry), mapped back from the site's
token order to the model's.
"""
import pytest
import torch

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.demo import zoo
from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, unpack_block_mask
from scaling_compiler.kernels.reference import masked_attention_reference
from scaling_compiler.demo.sampling import sigma_schedule
from scaling_compiler.passes.inputs import step_timesteps
from scaling_compiler.policies.dfsattn.op import dfs_attention_op
from scaling_compiler.policies.dfsattn.registry import DFSRegistry
from scaling_compiler.policies.dfsattn.schedule import DFSSchedule
from scaling_compiler.policies.dfsattn.scoring import block_scores, topk_block_mask
from scaling_compiler.policies.token_order import sequence_order
from scaling_compiler.sites import Site, Pattern, SiteKind

from tests.attention_reference import masked_sites, model_order_mask

WAN = "WanTransformer3DModel"
GRID = (3, 24, 24)  # latent grid: 3 x 12 x 12 = 432 tokens, 4 blocks (the last one partial)
# a 6-step plan: steps 0-1 dense, refresh at 2 (keep 2 of 4 blocks) and 4 (keep 1 of 4)
SMALL = dict(num_steps=6, dense_steps=2, refresh_interval=2, keep_ratios=(0.5, 0.25))
STEPS = step_timesteps(1000.0, 6, None).tolist()
# Dense steps: the same attention with keys summed in another order: fp32 rounding (measured 1e-6).
DENSE_ATOL = 1e-5
# Sparse steps: float32 model around float64 reference attention, as in test_backend_models.
SPARSE_ATOL = 1e-4
ATOL = {True: DENSE_ATOL, False: SPARSE_ATOL}  # by "is a dense step"


def build(batch=2, grid=GRID, layers=None):
    torch.manual_seed(0)
    model = zoo.build(WAN, {"num_layers": layers} if layers else None)
    return model, zoo.example_inputs(WAN, model, grid, batch)


def compile_dfs(model, compiler="aot_eager", **options):
    backend = ScalingAttnBackend(policy="dfsattn", compiler=compiler, **options)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return backend, torch.compile(model, backend=backend, fullgraph=True)


def run(model, inputs, timestep):
    inputs["timestep"] = torch.full_like(inputs["timestep"], timestep, dtype=torch.float32)
    with torch.no_grad():
        return model(**inputs)[0]


def reference(model, inputs, report, timestep):
    """The eager model with each sparse site's attention in float64 over the DFSAttn masks in use."""
    masks = {site.name: model_order_mask(report.policy_state.cache.current(site.name), site) for site in report.sparse_sites}
    with masked_sites(report, token_masks=masks):
        return run(model, inputs, timestep)


def expected_output(model, inputs, report, step):
    """Eager at dense steps, else the masked reference."""
    return run(model, inputs, STEPS[step]) if step < 2 else reference(model, inputs, report, STEPS[step])


def compiles():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def capture_qk(model, inputs, timestep, call):
    """q, k and scale of the `call`-th SDPA call of an eager forward."""
    captured = {}

    class Capture(torch.overrides.TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                Capture.calls += 1
                if Capture.calls == call:
                    bound = dict(zip(("query", "key"), args)) | kwargs
                    captured.update(q=bound["query"], k=bound["key"], scale=bound.get("scale"))
            return func(*args, **kwargs)

    with Capture():
        run(model, inputs, timestep)
    return captured["q"], captured["k"], captured["scale"] or captured["q"].shape[-1] ** -0.5


def test_steps_match_dense_eager_and_masked_reference_without_recompiling():
    model, inputs = build()
    backend, compiled = compile_dfs(model, **SMALL)
    for step, timestep in enumerate(STEPS):
        out = run(compiled, inputs, timestep)
        if step < 2:  # dense steps
            torch.testing.assert_close(out, run(model, inputs, timestep), atol=DENSE_ATOL, rtol=0)
            continue
        torch.testing.assert_close(out, reference(model, inputs, backend.report, timestep), atol=SPARSE_ATOL, rtol=0)
        assert (out - run(model, inputs, timestep)).abs().max() > 1e-3  # the masks changed the computation
        if step == 2:
            check_cfg_reuse(model, inputs, backend.report.policy_state.cache.current("blocks.1.attn1"))
    assert compiles() == 1 and len(backend.reports) == 1

    report = backend.report
    assert report.policy == "dfsattn" and report.token_order == "hilbert"
    dense_layer, sparse = report.sites[0], report.sites[2]  # blocks.0.attn1 is layer 0: dense by default
    assert dense_layer.status == "dense" and "dense layer 0" in dense_layer.reason
    assert sparse.status == "sparse" and sparse.token_order == "hilbert" and sparse.name == "blocks.1.attn1"
    assert all(s.status == "dense" and "cross-attention" in s.reason for s in report.sites if s.kind == "cross")
    registry = report.policy_state
    assert list(registry.site_ids) == ["blocks.1.attn1"]
    assert [(r.site, r.step, r.keep_ratio) for r in registry.cache.refreshes] == [
        ("blocks.1.attn1", 2, 0.5), ("blocks.1.attn1", 4, 0.25)]
    assert registry.density_per_step("blocks.1.attn1") == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert sparse.step_densities == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]  # the plan's nominal top-k budgets
    assert report.policy_state.scoring_seconds > 0
    data = report.to_dict()["dfsattn"]
    assert data["refresh_steps"] == [2, 4] and data["refreshes_run"] == 2 and data["cfg_reuse"]
    assert data["keep_ratio_per_step"] == [None, None, 0.5, 0.5, 0.25, 0.25]
    assert "policy: dfsattn" in str(report)


def check_cfg_reuse(model, inputs, words):
    """Both CFG halves got the masks scored from the cond half's q and k (layer 0 runs dense in both
    the compiled and the eager model, so blocks.1.attn1 sees the same q and k up to rounding)."""
    q, k, scale = capture_qk(model, inputs, STEPS[2], call=3)  # calls: blocks.0.attn1, .attn2, blocks.1.attn1
    perm = sequence_order(q.shape[2], (3, 12, 12), (), "hilbert")
    q, k = q[:, :, perm], k[:, :, perm]
    own = [topk_block_mask(block_scores(q[i : i + 1], k[i : i + 1], scale), 0.5)[0] for i in (0, 1)]
    assert not torch.equal(own[0], own[1])  # scored on its own, the uncond half would choose other blocks
    mask = unpack_block_mask(words, 4)
    assert torch.equal(mask[0], own[0]) and torch.equal(mask[1], own[0])


def test_schedule_follows_the_published_plan_at_the_sampler_timesteps():
    """The paper's defaults over 50 sampler steps: dense 0-11, refresh at 12/24/36 (not 48) keeping 0.3/0.2/0.1."""
    model, inputs = build(batch=1, grid=(5, 32, 32), layers=1)  # 1,280 tokens: 10 blocks, 0.3/0.2/0.1 keep 3/2/1
    timesteps = (1000.0 * sigma_schedule(50)[:50]).tolist()
    backend, compiled = compile_dfs(model, timesteps=timesteps, dense_layers=())
    visited = [0, 11, 12, 13, 23, 24, 35, 36, 47, 48, 49]  # around each boundary of the plan
    for step in visited:
        run(compiled, inputs, timesteps[step])
    assert compiles() == 1 and len(backend.reports) == 1
    registry = backend.report.policy_state
    assert registry.refresh_steps == [12, 24, 36]
    assert registry.keep_ratio_per_step == [None] * 12 + [0.3] * 12 + [0.2] * 12 + [0.1] * 14
    assert [(r.step, r.keep_ratio) for r in registry.cache.refreshes] == [(12, 0.3), (24, 0.2), (36, 0.1)]
    kept = {step: 1.0 if step < 12 else 0.3 if step < 24 else 0.2 if step < 36 else 0.1 for step in visited}
    used = registry.density_per_step("blocks.0.attn1")
    assert {step: used[step] for step in visited} == pytest.approx(kept)
    assert registry.step_of(torch.tensor([timesteps[30] + 0.4])) == 30  # the nearest sampler timestep


def test_inductor_fullgraph_and_no_recompilation():
    model, inputs = build(layers=1)
    backend, compiled = compile_dfs(model, compiler="inductor", dense_layers=(), **SMALL)
    for step in (0, 2, 3, 4):
        out = run(compiled, inputs, STEPS[step])
        expected = expected_output(model, inputs, backend.report, step)
        torch.testing.assert_close(out, expected, atol=ATOL[step < 2], rtol=0)
    assert compiles() == 1 and len(backend.reports) == 1


@pytest.mark.parametrize("name", ["CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel"])
def test_joint_attention_keeps_text_in_place_and_its_blocks(name):
    """Joint text+video attention (CogVideoX: text first; HunyuanVideo: text last, key-padding mask)."""
    torch.manual_seed(0)
    model = zoo.build(name)
    inputs = zoo.example_inputs(name, model, GRID, batch=2)
    backend, compiled = compile_dfs(model, dense_layers=(), **SMALL)
    for step in (0, 2):
        out = run(compiled, inputs, STEPS[step])
        expected = expected_output(model, inputs, backend.report, step)
        torch.testing.assert_close(out, expected, atol=ATOL[step < 2], rtol=0)
    joint = [s for s in backend.report.sparse_sites if s.kind == "joint"]
    assert joint and all(s.token_order == "hilbert" for s in joint)
    for site in joint:
        mask = unpack_block_mask(backend.report.policy_state.cache.current(site.name), num_blocks(site.shape[2]))
        text = sorted({t // BLOCK_SIZE for start, end in site.text_spans for t in range(start, end)})
        assert mask[..., text].all() and mask[..., text, :].all()  # text keys kept, text queries dense
        assert not mask.all()


def test_op_registration_and_output():
    """torch.library.opcheck of the DFSAttn op on a dense and a sparse step; the sparse step equals
    float64 attention over the masks it cached (tail blocks of 300 tokens, CFG halves sharing them)."""
    site = Site(
        name="s", pattern=Pattern.SDPA, kind=SiteKind.SELF, batch=2, heads=2, kv_heads=2, q_len=300, kv_len=300,
        head_dim=32, dtype=torch.float32, device=torch.device("cpu"), q_stride=(), scale=32**-0.5, attn_mask=None,
        key_padding=False, is_causal=False, dropout_p=0.0, token_grid=None, grid_source="test", text_spans=())
    schedule = DFSSchedule(num_steps=2, dense_steps=1, keep_ratios=(0.5,), dense_layers=())
    registry = DFSRegistry(schedule, [site], [1000.0, 0.0], cfg_batch=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 32) for _ in range(3))
    for t in (1000.0, 0.0):
        args = (q, k, v, torch.tensor([t, t]), registry.site_ids["s"], 32**-0.5, None)
        torch.library.opcheck(dfs_attention_op, args)
        out = dfs_attention_op(*args)
        words = registry.cache.current("s")
        if t == 1000.0:  # dense step
            assert words is None
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        else:
            expected, _ = masked_attention_reference(q, k, v, unpack_block_mask(words, 3), 32**-0.5)
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)  # fp32 op vs float64
            assert torch.equal(words[0], words[1])
    assert [r.step for r in registry.cache.refreshes] == [1]  # opcheck's repeated calls reuse the step's masks


@pytest.mark.parametrize("masks,options", [("local_band", {"density": 0.5}),
                                           ("west", {"density": 0.5, "calibration_samples": 2})])
def test_west_policy_in_hilbert_order(masks, options):
    """WEST+FAST with token_order="hilbert": masks built (and calibrated) in Hilbert order."""
    model, inputs = build(batch=1, layers=1)
    backend = ScalingAttnBackend(compiler="aot_eager", masks=masks, token_order="hilbert", **options)
    torch._dynamo.reset()
    out = run(torch.compile(model, backend=backend, fullgraph=True), inputs, 500.0)
    report = backend.report
    assert report.policy == "west_fast" and all(s.token_order == "hilbert" for s in report.sparse_sites)
    if masks == "west":
        assert "calibrated" in report.topology_origin  # never from the raster-order cache
    masks = {site.name: model_order_mask(report.masks_at(500.0)[site.name], site) for site in report.sparse_sites}
    with masked_sites(report, token_masks=masks):
        expected = run(model, inputs, 500.0)
    torch.testing.assert_close(out, expected, atol=SPARSE_ATOL, rtol=0)


@pytest.mark.parametrize("options,message", [
    ({"policy": "sparse"}, "option 'policy' must be one of 'west_fast', 'dfsattn'"),
    ({"policy": "dfsattn", "token_order": "zigzag"}, "option 'token_order' must be one of"),
    ({"policy": "dfsattn", "dense_steps": -1}, "option 'dense_steps' must be an int >= 0"),
    ({"policy": "dfsattn", "refresh_interval": 0}, "option 'refresh_interval' must be an int >= 1"),
    ({"policy": "dfsattn", "keep_ratios": [0.3, 1.5]}, "option 'keep_ratios'"),
    ({"policy": "dfsattn", "keep_ratios": []}, "option 'keep_ratios'"),
    ({"policy": "dfsattn", "dense_layers": [-1]}, "option 'dense_layers'"),
    ({"policy": "dfsattn", "cfg_reuse": "yes"}, "option 'cfg_reuse'"),
    ({"policy": "dfsattn", "density": 0.25}, "option 'density' does not apply to policy='dfsattn'"),
    ({"policy": "dfsattn", "masks": "window_3d"}, "option 'masks' does not apply to policy='dfsattn'"),
    ({"dense_steps": 5}, "option 'dense_steps' does not apply to policy='west_fast'"),
    ({"density": 0.5, "masks": "window_3d", "token_order": "hilbert"}, "option 'token_order'='hilbert' needs a rule built in any order"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        ScalingAttnBackend(**options)


def test_defaults_are_the_papers():
    config = ScalingAttnBackend(policy="dfsattn").config
    assert config.token_order.value == "hilbert" and "schedule" not in config.as_dict()
    schedule = config.options.schedule(config.num_steps)
    assert (schedule.num_steps, schedule.dense_steps, schedule.refresh_interval) == (50, 12, 12)
    assert schedule.keep_ratios == (0.3, 0.2, 0.1) and schedule.dense_layers == (0,) and schedule.cfg_reuse
    assert ScalingAttnBackend().config.token_order.value == "raster"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_leave_the_run_time_op_outside():
    """mode="reduce-overhead": the op syncs with the host and caches masks between calls, so it is tagged
    cudagraph_unsafe; each step equals the same model compiled without CUDA graphs."""
    model, inputs = build(batch=1)
    model = model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def steps(mode):
        backend = ScalingAttnBackend(policy="dfsattn", compiler="inductor", dense_layers=(), **SMALL)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, mode=mode)
        outs = []
        for t in STEPS:
            torch.compiler.cudagraph_mark_step_begin()
            outs.append(run(compiled, inputs, t).clone())
        return backend, outs

    backend, graphed = steps("reduce-overhead")
    assert backend.report.sparse_sites
    _, plain = steps(None)
    for a, b in zip(graphed, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
