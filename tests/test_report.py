"""The report: what it says about graphs without attention, graph breaks, coarse grids and density 1,
figures that agree with each other, the pictures it saves, and the CLI around it (issue 15, item 7)."""
import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scaling_compiler import ScalingAttnBackend, cli
from scaling_compiler.demo import zoo
from scaling_compiler.kernels.bitmask import num_blocks, unpack_block_mask
from scaling_compiler.policies.west_fast.plan import kept_pair_fraction

WAN = "WanTransformer3DModel"


def compiled_wan(grid, **options):
    torch.manual_seed(0)
    model = zoo.build(WAN)
    inputs = zoo.example_inputs(WAN, model, grid)
    backend = ScalingAttnBackend(compiler="eager", **options)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    return backend


class LinearAttention(torch.nn.Module):
    """Attention without a softmax (as Sana's): nothing the backend can rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        return q @ (k.transpose(-1, -2) @ v) / (q @ k.sum(-2, keepdim=True).transpose(-1, -2))


class BrokenAttention(torch.nn.Module):
    """Softmax attention, then a data-dependent `nonzero` (as Mochi's) that breaks dynamo's graph."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        kept = (out.sum(-1) > 0).nonzero()
        return out * kept.shape[0]


def test_graph_without_softmax_attention_says_so_in_a_sentence():
    backend = ScalingAttnBackend(compiler="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(LinearAttention(), backend=backend)(torch.randn(1, 200, 32))
    assert len(backend.reports) == 1 and backend.report.sites == []
    text = str(backend.report)
    assert text == ("scalingattn graph 0: no softmax attention in this graph, nothing to rewrite "
                    "(it runs as dynamo captured it)")  # one sentence, no empty table
    summary = backend.summary()
    assert summary.startswith("scalingattn: dynamo made 1 graph; 0 attention sites (0 sparse) in 0 of them")
    assert "no softmax attention in any graph: nothing was rewritten" in summary


def test_summary_counts_graphs_and_says_why_dynamo_broke_the_graph():
    backend = ScalingAttnBackend(compiler="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(BrokenAttention(), backend=backend)(torch.randn(1, 200, 32))
    assert [len(r.sites) for r in backend.reports] == [1, 0]  # the graph after the break has no attention
    summary = backend.summary()
    lines = summary.splitlines()
    assert lines[0] == "scalingattn: dynamo made 2 graphs; 1 attention site (1 sparse) in 1 of them"
    # dynamo's own reason (torch 2.13: "Dynamic shape operator"; older: "dynamic shape operator: aten.nonzero")
    assert re.fullmatch(r"graph breaks: 1: .*dynamic shape operator.* \(x1\) \(TORCH_LOGS=graph_breaks shows where\)",
                        lines[1], flags=re.IGNORECASE)
    assert lines[-1] == ("1 of the graphs hold no attention; attention inside code dynamo broke off runs eagerly, "
                         "unrewritten")


def tiny_mochi():
    import diffusers

    torch.manual_seed(0)
    model = diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=64, num_layers=2, pooled_projection_dim=32,
        in_channels=4, text_embed_dim=32, time_embed_dim=32, max_sequence_length=16).eval()
    return model, dict(hidden_states=torch.randn(1, 4, 3, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                       timestep=torch.full((1,), 500), encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool),
                       return_dict=False)


def tiny_sana():
    import diffusers

    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=32,
        sample_size=16, patch_size=1).eval()
    return model, dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                       timestep=torch.full((1,), 500), return_dict=False)


@pytest.mark.parametrize("factory, last_line", [
    # Mochi: dynamo breaks the graph around a `nonzero`; its self-attention is never captured
    (tiny_mochi, "only cross-attention was captured (it stays dense): self-attention in code around the graph "
                 "breaks runs eagerly, unrewritten"),
    # Sana: linear self-attention, softmax only in the cross-attention
    (tiny_sana, "only cross-attention was captured (it stays dense): no softmax self-attention to make sparse "
                "(linear attention, as Sana's, is not softmax attention)"),
])
def test_models_without_captured_self_attention_get_a_sentence(factory, last_line):
    model, inputs = factory()
    backend = ScalingAttnBackend(compiler="eager", density=0.5)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    summary = backend.summary().splitlines()
    assert summary[-1] == last_line
    assert summary[0].startswith(f"scalingattn: dynamo made {len(backend.reports)} graph")
    if factory is tiny_mochi:
        assert len(backend.reports) > 1 and any(line.startswith("graph breaks: ") for line in summary)
        empty = [r for r in backend.reports if not r.sites]
        assert empty and all(len(str(r).splitlines()) == 1 for r in empty)  # a sentence each, no empty table
    assert "note: only cross-attention in this graph" in str(next(r for r in backend.reports if r.sites))


def test_figures_agree_on_a_coarse_grid(caplog):
    """192 tokens are 2 key blocks: density 0.25 cannot be met. Predicted times follow the masks' kept
    fraction, the warning quotes no density of its own, and a note says the grid is too coarse."""
    with caplog.at_level(logging.WARNING, logger="scaling_compiler"):
        backend = compiled_wan((3, 16, 16), density=0.25, calibration_samples=2)
    report = backend.report
    assert report.sparse_sites
    for site in report.sparse_sites:  # the ideal CPU cost model: time = kept fraction x dense time
        assert site.predicted_ms / site.dense_ms == pytest.approx(site.density, rel=1e-9)
    kept = sum(s.dense_flops * s.density for s in report.sparse_sites) / sum(s.dense_flops for s in report.sparse_sites)
    assert report.predicted_speedup == pytest.approx(1.0 / kept, rel=1e-9)
    warnings = [r.getMessage() for r in caplog.records if "cannot meet density" in r.getMessage()]
    assert warnings and not any(re.search(r"using \d", w) for w in warnings)
    text = str(report)
    assert "note: too few blocks for density 0.25" in text and "no mask keeps less than 0.50" in text
    assert f"sparse sites predicted {report.predicted_speedup:.2f}x as fast as dense" in text


def test_one_block_sites_stay_dense_instead_of_promising_a_speedup():
    """16 tokens: one block, which every mask keeps. The sites were reported sparse with 0% saved and
    a 4x predicted speed-up; now the cost model keeps them dense and the note says why."""
    report = compiled_wan((1, 8, 8), density=0.25, calibration_samples=2).report
    self_sites = [s for s in report.sites if s.kind == "self"]
    assert self_sites and all(s.status == "dense" and s.reason.startswith("cost model") for s in self_sites)
    assert report.predicted_speedup is None and report.flops_saved == 0
    text = str(report)
    assert "saved 0.0% by the masks" in text and "predicted" not in text.splitlines()[0]
    assert "1 key block of 128 tokens per query block" in text


def test_density_one_sites_are_labelled_all_blocks():
    report = compiled_wan((3, 16, 16), density=1.0).report
    rows = [line for line in str(report).splitlines() if line.startswith("blocks.")]
    self_rows = [row for row in rows if " self " in row]
    assert len(self_rows) == 2 and all("sparse (all blocks)" in row for row in self_rows)
    assert all(s.status == "sparse" for s in report.sites if s.kind == "self")  # the record is unchanged


def test_save_pictures_draws_the_masks_and_the_densities(tmp_path):
    from scaling_compiler.pictures import KEPT, SKIPPED, _colour, density_cube, shown_steps

    report = compiled_wan((3, 24, 24), density=0.5, calibration_samples=2).report
    written = report.save_pictures(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        [f"masks_{s.name}.png" for s in report.sparse_sites] + ["density.png"])
    # the mask picture: head h at step s is the panel at row s, column h; each block a cell
    site = report.sparse_sites[0]
    image = Image.open(tmp_path / f"masks_{site.name}.png").convert("RGB")
    nk = num_blocks(site.kv_len)
    cell = max(1, min(16, 128 // nk))
    steps = shown_steps(len(report.step_timesteps))
    plan = report.plans[site.name]
    steps = steps[:1] if plan.static else steps
    for row, step in enumerate(steps):
        mask = unpack_block_mask(plan.masks_at(float(report.step_timesteps[step])), nk)
        for h in range(site.shape[1]):
            for i in range(nk):
                for j in range(nk):
                    x = 110 + h * (nk * cell + 6) + j * cell + cell // 2
                    y = 28 + row * (nk * cell + 6 + 14) + 14 + i * cell + cell // 2
                    assert image.getpixel((x, y)) == (KEPT if mask[h, i, j] else SKIPPED)
    # the density picture: one band per layer, a column per step, a row per head, coloured by kept fraction
    names, cubes = density_cube(report)
    assert names == [s.name for s in report.sparse_sites]
    expected = kept_pair_fraction(plan.block_masks, site.shape[2], site.kv_len)
    assert torch.equal(cubes[0], torch.gather(expected, 0, plan.level_index))
    density = Image.open(tmp_path / "density.png").convert("RGB")
    steps_total = cubes[0].shape[0]
    cell = max(2, min(12, 600 // steps_total))
    for h in range(site.shape[1]):
        for step in (0, steps_total - 1):
            colour = tuple(_colour(cubes[0][step, h]).tolist())
            assert density.getpixel((130 + step * cell + cell // 2, 28 + h * cell + cell // 2)) == colour


def test_cli_inspect_pictures(tmp_path, capsys):
    torch._dynamo.reset()
    code = cli.main(["inspect", WAN, "--grid", "3,24,24", "--options",
                     '{"density": 0.5, "calibration_samples": 2}', "--pictures", str(tmp_path / "pics")])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert names == ["density.png", "masks_blocks.0.attn1.png", "masks_blocks.1.attn1.png"]
    out = capsys.readouterr().out
    assert "wrote 3 pictures" in out and "scalingattn: dynamo made 1 graph" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", WAN, "--options", "{bad"], "--options is not valid JSON"),
    (["inspect", WAN, "--options", "[1]"], "--options must be a JSON object"),
    (["inspect", WAN, "--options", '{"density": 2}'], "option 'density' must be in (0, 1]"),
    (["inspect", WAN, "--options", '{"densty": 0.5}'], "unknown scalingattn option(s) ['densty']"),
    (["inspect", WAN, "--config", '{"no_such_argument": 1}'], "--config: "),
    (["inspect", WAN, "--grid", "3,24"], "--grid must be three positive ints"),
    (["inspect", "no_such_module:build"], "cannot load the model factory 'no_such_module:build'"),
    # found at compile time (the graph has no timestep input: one step), inside torch.compile
    (["inspect", "tests.handwritten_dit:build_with_inputs", "--options", '{"density": 0.9, "warmup": 0.6}'],
     "option 'warmup'=0.6: 1 dense steps of 1 (the graph has no timestep input: one step) leave no sparse step"),
])
def test_cli_mistakes_are_one_line_with_status_2(argv, message, capsys):
    torch._dynamo.reset()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"scalingattn {argv[0]}: error: ") and message in err[0]


def test_cli_inspect_is_seeded(tmp_path, monkeypatch):
    """Two identical runs: the same report, and one cache entry (the same weights), not two."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCALINGATTN_CACHE_DIR", str(cache))
    reports = []
    for run in range(2):
        path = tmp_path / f"run{run}.json"
        torch._dynamo.reset()
        assert cli.main(["inspect", WAN, "--grid", "3,16,16", "--options",
                         '{"density": 0.5, "calibration_samples": 2}', "--json", str(path)]) == 0
        reports.append(json.loads(path.read_text()))
    first, second = ([{k: v for k, v in r.items() if k not in ("topology_origin", "calibration_seconds")}
                      for r in run] for run in reports)
    assert first == second and any(s["status"] == "sparse" for s in first[0]["sites"])
    assert "calibrated" in reports[0][0]["topology_origin"] and "from cache" in reports[1][0]["topology_origin"]
    assert len([p for p in cache.iterdir() if p.suffix == ".safetensors"]) == 1
