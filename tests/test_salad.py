"""SALAD's linear branch (option `linear_branch`): the branch's math, a fresh branch adds nothing,
tuning reaches only the branch, and tuned branches save and reload (or fail naming the mismatch)."""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed

from scaling_compiler import ScalingAttnBackend
from scaling_compiler.cost_model import CostModel
from scaling_compiler.salad import LinearBranch, LinearBranchMismatch, linear_attention

from .passes.graphs import VideoAttention, video_inputs

INPUTS = dict(frames=3, height=16, width=32)  # 384 tokens: 3 mask blocks per site


def _compile(model, **options):
    torch._dynamo.reset()
    backend = ScalingAttnBackend(density=0.5, compiler="aot_eager", cache=False,
                                 cost_model=CostModel.ideal("test: every site sparse"), **options)
    return torch.compile(model, backend=backend, fullgraph=True), backend


def _model():
    torch.manual_seed(0)
    return VideoAttention(layers=2)


@pytest.mark.parametrize("padded", [False, True])
def test_linear_attention_matches_the_quadratic_form(padded):
    """phi(q) (phi(k)^T v) / (phi(q) . sum phi(k)) equals the S x S form relu(q) relu(k)^T row-normalised
    (float64), with padded keys dropped."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 200, 16, generator=g, dtype=torch.float64) for _ in range(3))
    key_padding = torch.rand(2, 200, generator=g) > 0.3 if padded else None
    scores = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    if padded:
        scores = scores * key_padding[:, None, None, :]
    expected = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(linear_attention(q, k, v, key_padding), expected, rtol=1e-6, atol=1e-9)


def _expected_branch(branch, q, k, v, sparse, q_maps, k_maps):
    """sparse + sigmoid(gate(mean_tokens(q))) * Proj(linear attention of q A_h, k B_h, v), per sample."""
    B, H, S, D = q.shape
    lin = linear_attention(torch.einsum("bhsd,hde->bhse", q, q_maps), torch.einsum("bhsd,hde->bhse", k, k_maps), v)
    gate = torch.sigmoid(branch.gate(q.mean(2).reshape(B, H * D)))  # (B, 1)
    return sparse + (gate[:, None] * branch.proj(lin.transpose(1, 2).reshape(B, S, H * D))).reshape(B, S, H, D).transpose(1, 2)


def test_branch_adds_the_gated_projection():
    """LinearBranch: sparse output + sigmoid(gate(mean_tokens(q))) * Proj(linear attention), per sample;
    its feature maps start at the identity (the features ReLU(q), ReLU(k)), and tuned maps A_h, B_h
    give the features ReLU(q A_h), ReLU(k B_h)."""
    g = torch.Generator().manual_seed(2)
    q, k, v, sparse = (torch.randn(2, 2, 130, 16, generator=g) for _ in range(4))
    branch = LinearBranch(heads=2, head_dim=16)
    identity = torch.eye(16).expand(2, 16, 16)
    assert torch.equal(branch.q_map, identity) and torch.equal(branch.k_map, identity)
    assert torch.equal(branch(q, k, v, sparse), sparse)  # zero-initialised projection: exactly nothing added
    torch.nn.init.normal_(branch.proj.weight, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(branch(q, k, v, sparse), _expected_branch(branch, q, k, v, sparse, identity, identity),
                                   rtol=1e-5, atol=1e-5)
        lin = linear_attention(q, k, v).transpose(1, 2).reshape(2, 130, 32)  # identity maps: plain ReLU features
        gate = torch.sigmoid(branch.gate(q.mean(2).reshape(2, 32)))
        expected = sparse + (gate[:, None] * branch.proj(lin)).reshape(2, 130, 2, 16).transpose(1, 2)
        torch.testing.assert_close(branch(q, k, v, sparse), expected, rtol=1e-5, atol=1e-5)
        for p in (branch.q_map, branch.k_map):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        q_maps, k_maps = branch.q_map.clone(), branch.k_map.clone()
        torch.testing.assert_close(branch(q, k, v, sparse), _expected_branch(branch, q, k, v, sparse, q_maps, k_maps),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(branch(q, k, v, sparse), expected, atol=1e-3)  # the maps change the features


def test_fresh_branch_equals_sparse_only():
    """A freshly compiled model with linear branches equals the sparse-only model exactly; the report
    says which sites carry a branch."""
    model = _model()
    inputs = video_inputs(**INPUTS)
    sparse_only, _ = _compile(model)
    with torch.no_grad():
        expected = sparse_only(*inputs)
    salad, backend = _compile(model, linear_branch=True)
    with torch.no_grad():
        out = salad(*inputs)
    assert torch.equal(out, expected)
    sparse_sites = backend.report.sparse_sites
    assert len(sparse_sites) == 2 and all("+ linear branch" in s.reason for s in sparse_sites)
    assert sorted(backend.linear_branches.sites) == ["blocks__0__attn1", "blocks__1__attn1"]


def test_tuning_reaches_only_the_branches(tmp_path):
    """With the model frozen, a compiled training step gives gradients to the branches only; the
    loss falls under Adam; the tuned branches save and reload into a fresh compile, which then
    equals the tuned model exactly."""
    model = _model().requires_grad_(False)
    inputs = video_inputs(**INPUTS)
    salad, backend = _compile(model, linear_branch=True)
    target = torch.randn_like(salad(*inputs))
    optimizer = torch.optim.Adam(backend.linear_branches.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.mse_loss(salad(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in backend.linear_branches.parameters())
    assert losses[-1] < 0.9 * losses[0]
    identity = torch.eye(32).expand(2, 32, 32)
    for branch in backend.linear_branches.sites.values():  # the feature maps tune too
        assert not torch.equal(branch.q_map, identity) and not torch.equal(branch.k_map, identity)
    path = backend.linear_branches.save(tmp_path / "branches.safetensors")
    with torch.no_grad():
        tuned = salad(*inputs)
    reloaded, _ = _compile(model, linear_branch=True, linear_branch_weights=str(path))
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs), tuned)


def test_branch_file_without_feature_maps_loads_with_identity_maps(tmp_path):
    """A file written before the branches had feature maps (no q_map, k_map tensors) loads: its
    projection and gate as saved, identity maps (the features it was tuned with, ReLU(q), ReLU(k)).
    A file that lacks one of the two maps is an error naming it."""
    from safetensors.torch import save_file

    from scaling_compiler.salad import LinearBranches, read_metadata
    from scaling_compiler.salad.branch import BranchWeights

    branches = LinearBranches()
    _, tuned = branches.branch_for("blocks.0.attn1", 2, 16, torch.device("cpu"), None)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    path = branches.save(tmp_path / "new.safetensors")
    tensors = BranchWeights(path).tensors
    old = tmp_path / "old.safetensors"
    save_file({n: t for n, t in tensors.items() if not n.endswith(("q_map", "k_map"))}, str(old), metadata=read_metadata(path))
    _, loaded = LinearBranches().branch_for("blocks.0.attn1", 2, 16, torch.device("cpu"), BranchWeights(old))
    identity = torch.eye(16).expand(2, 16, 16)
    assert torch.equal(loaded.q_map, identity) and torch.equal(loaded.k_map, identity)
    for name in ("proj.weight", "proj.bias", "gate.weight", "gate.bias"):
        assert torch.equal(loaded.get_parameter(name), tuned.get_parameter(name))
    _, reloaded = LinearBranches().branch_for("blocks.0.attn1", 2, 16, torch.device("cpu"), BranchWeights(path))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), tuned.state_dict().values()))

    half = tmp_path / "half.safetensors"
    save_file({n: t for n, t in tensors.items() if not n.endswith("k_map")}, str(half), metadata=read_metadata(path))
    with pytest.raises(RuntimeError, match="k_map"):
        LinearBranches().branch_for("blocks.0.attn1", 2, 16, torch.device("cpu"), BranchWeights(half))


def test_mismatched_weights_name_the_mismatch(tmp_path):
    """Branch files that do not fit the model: another model's sites, other head shapes, a file that
    holds no branches, no file."""
    inputs = video_inputs(**INPUTS)
    salad, backend = _compile(_model(), linear_branch=True)
    salad(*inputs)
    path = backend.linear_branches.save(tmp_path / "two_layers.safetensors")

    torch.manual_seed(0)
    wider = VideoAttention(heads=4, head_dim=16, layers=2)  # same width, other heads
    deeper = VideoAttention(layers=3)
    for model, message in ((wider, r"site 'blocks.0.attn1' was tuned with 2 heads of 32.*4 heads of 16"),
                           (deeper, r"no branch for site 'blocks.2.attn1'")):
        with pytest.raises(BackendCompilerFailed, match=message) as failure:  # dynamo wraps what backends raise
            _compile(model, linear_branch=True, linear_branch_weights=str(path))[0](*inputs)
        assert isinstance(failure.value.inner_exception, LinearBranchMismatch)

    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LinearBranchMismatch, match="holds no linear branches"):
        ScalingAttnBackend(linear_branch=True, linear_branch_weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="option 'linear_branch_weights'"):
        ScalingAttnBackend(linear_branch=True, linear_branch_weights=str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("options, message", [
    ({"linear_branch": 1}, "option 'linear_branch' must be True or False"),
    ({"linear_branch_weights": "x.safetensors"}, "option 'linear_branch_weights' needs linear_branch=True"),
    ({"linear_branch": True, "linear_branch_weights": 3}, "option 'linear_branch_weights' must be a path"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        ScalingAttnBackend(**options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_attention_low_precision_long_sequence(dtype):
    """At 40,000 keys whose values have a large mean, sums over keys would overflow fp16: the means
    do not, and the result stays within the input dtype's rounding of the float64 answer."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 1, 40_000, 16, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 1, 40_000, 16, generator=g, dtype=torch.float64) + 8.0
    expected = linear_attention(q, k, v)
    got = linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2)
