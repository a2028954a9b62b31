"""WEST: exact block mass, threshold maps, masks at a density, transfer across grids, files and cache."""
import logging

import pytest
import torch

from scaling_compiler import ScalingAttnBackend, cli
from scaling_compiler.kernels.bitmask import BLOCK_SIZE, num_blocks, unpack_block_mask
from scaling_compiler.kernels.block_mass import block_mass, block_mass_triton, row_block_mass
from scaling_compiler.policies.west_fast.topology import SiteTopology, Topology, thresholds_from_significance
from scaling_compiler.policies.west_fast.calibrate import sample_rows

from tests.local_dit import LocalDiT

GRID = (4, 16, 16)  # 1,024 tokens, 8 blocks of half a frame each


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALINGATTN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def dense_block_mass_reference(q, k, scale, key_padding=None):
    """float64: full softmax, then the mean over each tile."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if key_padding is not None:
        scores = scores.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    nq, nk = num_blocks(q.shape[2]), num_blocks(k.shape[2])
    out = torch.zeros(*q.shape[:2], nq, nk, dtype=torch.float64)
    for u in range(nq):
        for v in range(nk):
            out[..., u, v] = probs[..., u * BLOCK_SIZE:(u + 1) * BLOCK_SIZE, v * BLOCK_SIZE:(v + 1) * BLOCK_SIZE].mean((-1, -2))
    return out


@pytest.mark.parametrize("q_len, kv_len", [(256, 256), (300, 300), (130, 389), (77, 77)])
@pytest.mark.parametrize("padded", [False, True])
def test_block_mass_matches_dense_reference(q_len, kv_len, padded):
    torch.manual_seed(q_len + kv_len)
    q, k = torch.randn(2, 3, q_len, 32) * 2, torch.randn(2, 3, kv_len, 32) * 2
    key_padding = torch.rand(2, kv_len) > 0.3 if padded else None
    # a tiny chunk budget forces several row chunks
    mass = block_mass(q, k, 0.2, key_padding, max_chunk_bytes=4 * 2 * 3 * kv_len * 128)
    expected = dense_block_mass_reference(q, k, 0.2, key_padding)
    torch.testing.assert_close(mass.double(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("q_len, kv_len, head_dim, dtype", [
    (256, 256, 64, torch.float32), (300, 389, 48, torch.float16), (77, 130, 128, torch.bfloat16)])
def test_block_mass_triton_matches_dense_reference(q_len, kv_len, head_dim, dtype):
    """The Triton kernel (interpreted on CPU, compiled on CUDA); batch 1's keys are all padded."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(q_len * kv_len)
    q, k = torch.randn(2, 3, q_len, head_dim) * 2, torch.randn(2, 3, kv_len, head_dim) * 2
    q, k = q.to(dtype), k.to(dtype)
    key_padding = torch.rand(2, kv_len) > 0.3
    key_padding[1] = False
    mass = block_mass_triton(q.to(device), k.to(device), 0.2, key_padding.to(device)).cpu()
    expected = dense_block_mass_reference(q, k, 0.2, key_padding).nan_to_num(0.0)
    # low precision: q and k are exact in fp32, products accumulate in fp32
    torch.testing.assert_close(mass.double(), expected, rtol=1e-4, atol=1e-8)
    assert (mass[1] == 0).all()


def test_row_block_mass_matches_dense_reference():
    torch.manual_seed(3)
    q, k = torch.randn(2, 3, 300, 32) * 2, torch.randn(2, 3, 389, 32) * 2
    key_padding = torch.rand(2, 389) > 0.3
    rows = torch.tensor([0, 131, 299])
    got = row_block_mass(q, k, 0.2, rows, key_padding)
    probs = ((q.double() @ k.double().transpose(-1, -2)) * 0.2).masked_fill(
        ~key_padding[:, None, None, :], float("-inf")).softmax(-1)[:, :, rows]
    expected = torch.stack([probs[..., v * 128:(v + 1) * 128].sum(-1) for v in range(4)], dim=-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


def test_sample_rows_are_stratified_over_query_blocks():
    generator = torch.Generator().manual_seed(0)
    rows = sample_rows(5000, generator)  # 40 query blocks, the last one 8 tokens long
    blocks = rows // 128
    assert len(rows) == 16 and blocks.unique().numel() == 16 and blocks[0] == 0 and blocks[-1] == 39
    assert (rows < 5000).all()
    assert sample_rows(200, generator).tolist() != [0, 128]  # random offsets inside blocks
    assert (sample_rows(200, generator) // 128).tolist() == [0, 1]


def test_thresholds_from_significance_ranks_per_row():
    significance = torch.tensor([[[0.1, 0.5, 0.4], [0.3, 0.3, 0.4]]])
    t = thresholds_from_significance(significance)
    torch.testing.assert_close(t, torch.tensor([[[1.0, 1 / 3, 2 / 3], [2 / 3, 1.0, 1 / 3]]]))


def random_site_topology(heads=3, n=7, seed=0):
    torch.manual_seed(seed)
    samples = torch.rand(5, heads, n, n)
    t = thresholds_from_significance(samples).amin(0)
    return SiteTopology(t, samples.mean(0), n * 128, n * 128, None, (), "calibrated")


def test_masks_grow_with_density_and_keep_a_block_per_row():
    topo = random_site_topology()
    previous = torch.zeros_like(topo.thresholds, dtype=torch.bool)
    for density in torch.linspace(0.05, 1, 15).tolist():
        mask, _ = topo.mask_for_density(density)
        assert (mask >= previous).all()  # nested: a denser mask keeps every block of a sparser one
        assert mask.any(-1).all()  # every query-block row keeps a block
        previous = mask
    assert topo.mask_for_density(1.0)[0].all()


@pytest.mark.parametrize("density", [0.05, 0.25, 0.5, 0.9])
def test_mask_for_density_meets_target(density):
    topo = random_site_topology(n=10)
    mask, levels = topo.mask_for_density(density)
    per_head = mask.float().mean((-1, -2))
    assert (per_head <= max(density, 0.1) + 1e-9).all()  # at most the target (one block per row: 0.1)
    assert (per_head >= density - 0.1 - 1e-9).all()
    assert mask.any(-1).all()
    for h, p in enumerate(levels):
        assert (topo.thresholds[h][mask[h]] <= p).all()


def compile_local(grid=GRID, **options):
    torch.manual_seed(0)
    model = LocalDiT(grid).eval()
    options.setdefault("schedule", "uniform")  # these tests look at WEST masks at one density
    backend = ScalingAttnBackend(compiler="eager", calibration_samples=2, **options)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randn(1, 4, *grid))
    return model, backend


def test_west_recovers_local_attention():
    model, backend = compile_local(density=0.25)
    report = backend.report
    [site] = report.sites
    assert site.status == "sparse" and site.token_grid == GRID
    site_map = report.topology.sites[site.name]
    nk = num_blocks(site.shape[2])
    # the sharp head's first block in every row is its own (diagonal) block
    assert torch.equal(site_map.thresholds[0].argmin(-1), torch.arange(nk))
    # the kept blocks are the true top-mass blocks of each row (float64 dense attention of
    # this model's fixed q and k, computed independently), and they form the local band
    west = unpack_block_mask(report.masks[site.name], nk)
    true_mass = dense_block_mass_reference(model.qk[None], model.qk[None], site.scale)[0]
    top = true_mass.topk(2, dim=-1).indices
    expected = torch.zeros_like(west).scatter_(-1, top, True)
    assert torch.equal(west, expected)
    distance = (torch.arange(nk)[:, None] - torch.arange(nk)[None, :]).abs()
    assert (distance[west[0]] <= 1).all()
    assert min(site.head_recall) > 0.9  # the kept blocks hold the attention mass


def test_transfer_to_the_same_grid_is_identity():
    topo = random_site_topology(n=8)
    topo.q_len = topo.kv_len = 1024
    topo.token_grid = GRID
    moved = topo.transfer(1024, GRID, ())
    assert torch.equal(moved.thresholds, topo.thresholds)


@pytest.mark.parametrize("source_grid, target_grid", [((2, 16, 16), (4, 16, 16)), ((4, 8, 16), (4, 16, 32)),
                                                      ((3, 10, 10), (5, 16, 14))])
def test_transfer_is_conservative(source_grid, target_grid):
    """Each target block pair gets a T no larger than that of any source block pair its tokens map to."""
    n_source, n_target = (g[0] * g[1] * g[2] for g in (source_grid, target_grid))
    torch.manual_seed(0)
    samples = torch.rand(3, 2, num_blocks(n_source), num_blocks(n_source))
    topo = SiteTopology(thresholds_from_significance(samples).amin(0), None, n_source, n_source, source_grid, (),
                        "calibrated")
    moved = topo.transfer(n_target, target_grid, ())
    # independent token mapping: each target token's centre, scaled to the source grid
    coords = torch.stack(torch.unravel_index(torch.arange(n_target), target_grid), 1).double()
    scale = torch.tensor(source_grid).double() / torch.tensor(target_grid).double()
    src = ((coords + 0.5) * scale).floor().long()
    src_token = (src[:, 0] * source_grid[1] + src[:, 1]) * source_grid[2] + src[:, 2]
    src_block = src_token // BLOCK_SIZE
    tgt_block = torch.arange(n_target) // BLOCK_SIZE
    for h in range(2):
        t_source_pairs = topo.thresholds[h][src_block[:, None], src_block[None, :]]  # (n_target, n_target)
        t_moved_pairs = moved.thresholds[h][tgt_block[:, None], tgt_block[None, :]]
        assert (t_moved_pairs <= t_source_pairs).all()


def test_topology_file_round_trip_and_transfer_through_backend(tmp_path):
    path = str(tmp_path / "local.safetensors")
    torch._dynamo.reset()
    assert cli.main(["calibrate", "tests.local_dit:small_model_and_inputs", "--out", path, "--samples", "2"]) == 0
    loaded = Topology.load(path)
    [site_map] = loaded.sites.values()
    assert site_map.token_grid == (4, 8, 8) and site_map.q_len == 256
    # FAST's sampled rows: 16 per batch entry and sample, spread over the 2 query blocks here,
    # each an exact softmax row (sums to 1 over key blocks)
    heads, nq, nk = site_map.thresholds.shape
    assert site_map.row_mass.shape[0] == heads and site_map.row_mass.shape[2] == nk
    assert site_map.row_blocks.numel() == site_map.row_mass.shape[1] > 0
    assert set(site_map.row_blocks.tolist()) == set(range(nq))
    torch.testing.assert_close(site_map.row_mass.sum(-1), torch.ones(site_map.row_mass.shape[:2]))

    _, backend = compile_local(density=0.25, topology_file=path)
    report = backend.report
    assert f"from {path}" in report.topology_origin
    [site] = report.sites
    assert "transferred from 4x8x8" in site.reason and site.head_recall is None


def test_topology_file_that_cannot_be_resized_names_the_option(tmp_path, caplog):
    """A stored map whose text spans differ from the site's cannot be resized: the site is calibrated,
    with a warning that names the option, instead of an error from deep inside the transfer."""
    path = str(tmp_path / "local.safetensors")
    torch._dynamo.reset()
    assert cli.main(["calibrate", "tests.local_dit:small_model_and_inputs", "--out", path, "--samples", "2"]) == 0
    topology = Topology.load(path)
    for site_map in topology.sites.values():
        site_map.text_spans = ((0, 7),)
    bad = str(tmp_path / "text.safetensors")
    topology.save(bad)
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        _, backend = compile_local(density=0.25, topology_file=bad)
    assert "calibrated" in backend.report.topology_origin and backend.report.sparse_sites
    assert any("option 'topology_file'" in r.message and "text spans differ" in r.message for r in caplog.records)


def test_cache_hit_miss_corruption_and_mismatch(cache_dir, caplog):
    _, first = compile_local(density=0.25)
    assert "calibrated" in first.report.topology_origin
    [cached_file] = list(cache_dir.glob("*.safetensors"))

    _, second = compile_local(density=0.25)  # hit: no calibration
    assert "from cache" in second.report.topology_origin
    assert torch.equal(second.report.masks["<model>"], first.report.masks["<model>"])

    _, other = compile_local(density=0.25, calibration_seed=1)  # different settings: a miss
    assert "calibrated" in other.report.topology_origin

    cached_file.write_bytes(b"not a safetensors file")  # corruption: warned, recomputed, rewritten
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        _, third = compile_local(density=0.25)
    assert "calibrated" in third.report.topology_origin
    assert any("ignoring and removing cache entry" in r.message for r in caplog.records)
    assert Topology.load(str(cached_file)).sites

    stale = Topology.load(str(cached_file))  # mismatch: a file that describes other weights
    stale.fingerprint = "0" * 32
    stale.save(str(cached_file))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        _, fourth = compile_local(density=0.25)
    assert "calibrated" in fourth.report.topology_origin
    assert any("weights fingerprint" in r.message for r in caplog.records)


def test_cache_off_always_calibrates(cache_dir):
    compile_local(density=0.25, cache=False)
    _, backend = compile_local(density=0.25, cache=False)
    assert "calibrated" in backend.report.topology_origin
    assert not cache_dir.exists() or not list(cache_dir.glob("*.safetensors"))


def test_user_calibration_inputs():
    inputs = [{"hidden_states": torch.randn(1, 4, *GRID)} for _ in range(2)]
    _, backend = compile_local(density=0.25, calibration_inputs=inputs)
    assert "user samples" in backend.report.topology_origin
    assert backend.report.config["calibration_inputs"] == "2 user inputs"
