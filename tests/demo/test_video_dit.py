"""The tiny video DiT: procedural data, model, sampler and checkpoints, at tiny sizes on the CPU."""
import pytest
import torch

from scaling_compiler.demo import synthetic_videos as sv
from scaling_compiler.demo.sampling import sample, save_contact_sheet, save_video_strip, sigma_schedule
from scaling_compiler.demo.video_dit import (
    DEFAULT_CHECKPOINT,
    TinyVideoDiTConfig,
    attention_entropy,
    build_model,
    example_inputs,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)

TINY = TinyVideoDiTConfig(num_attention_heads=2, attention_head_dim=32, ffn_dim=64, num_layers=2,
                          text_dim=32, freq_dim=32, frames=3, height=12, width=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(TINY).eval()
    torch.nn.init.normal_(m.transformer.proj_out.weight, std=0.05)  # non-zero output for the tests
    return m


def test_videos_shape_range_and_determinism():
    videos, labels = sv.make_batch(4, seed=3, frames=5, height=24, width=40)
    assert videos.shape == (4, 3, 5, 24, 40) and labels.shape == (4, 3)
    assert videos.min() >= -1 and videos.max() <= 1
    again, labels_again = sv.make_batch(4, seed=3, frames=5, height=24, width=40)
    assert torch.equal(videos, again) and torch.equal(labels, labels_again)
    assert not torch.equal(videos, sv.make_batch(4, seed=4, frames=5, height=24, width=40)[0])


@pytest.mark.parametrize("slot", [0, 1, 2])
def test_each_condition_slot_changes_the_video(slot):
    labels = torch.tensor([[0, 0, 0]])
    other = labels.clone()
    other[0, slot] = 3
    render = lambda lab: sv.render_videos(lab, torch.Generator().manual_seed(0), 5, 32, 32)  # noqa: E731
    assert (render(labels) - render(other)).abs().max() > 0.5


def test_motion_moves_and_tokens_cover_the_vocabulary():
    video = sv.render_videos(sv.parse_prompt("red square bounce")[None], torch.Generator().manual_seed(1), 4, 32, 32)
    assert (video[:, :, 0] - video[:, :, -1]).abs().max() > 0.5  # the shape moved
    assert sv.describe(sv.parse_prompt("bounce square red")) == "red square bounce"
    with pytest.raises(ValueError):
        sv.parse_prompt("red square")
    all_labels = torch.tensor([[len(s) - 1 for s in sv.SLOTS], [0, 0, 0]])
    tokens = sv.labels_to_tokens(all_labels)
    assert tokens.min() > sv.NULL_TOKEN and tokens.max() == sv.VOCAB_SIZE - 1
    assert len(set(tokens.flatten().tolist())) == 6  # slots do not share ids


def test_forward_shape_at_tiny_grid(model):
    video, timestep, tokens = example_inputs(TINY, batch=2, frames=3, height=8, width=12)
    out = model(video, timestep, tokens)
    assert out.shape == (2, 3, 3, 8, 12) and torch.isfinite(out).all()
    assert TINY.num_tokens(3, 8, 12) == 3 * 4 * 6


def test_sampler_is_deterministic_and_seeded(model):
    tokens = sv.labels_to_tokens(torch.tensor([[1, 2, 3]]))
    kwargs = dict(video_shape=(3, 2, 8, 8), steps=3)
    a = sample(model, tokens, sv.null_tokens(1), seed=7, **kwargs)
    b = sample(model, tokens, sv.null_tokens(1), seed=7, **kwargs)
    c = sample(model, tokens, sv.null_tokens(1), seed=8, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 3, 2, 8, 8) and a.abs().max() <= 1


def test_cfg_runs_one_batch_of_cond_and_uncond():
    calls = []

    def velocity(x, t, tokens):  # cond rows predict +1, uncond rows 0
        calls.append((x.shape[0], tokens.clone()))
        return (tokens[:, :1] != sv.NULL_TOKEN).float().view(-1, 1, 1, 1, 1).expand_as(x)

    tokens = torch.tensor([[1, 7, 15]])
    noise = torch.zeros(1, 3, 1, 2, 2)
    guided = sample(velocity, tokens, sv.null_tokens(1), (3, 1, 2, 2), steps=2, guidance_scale=3.0, noise=noise)
    assert [n for n, _ in calls] == [2, 2] and torch.equal(calls[0][1][1], sv.null_tokens(1)[0])
    # Euler from sigma 1 to 0 with velocity u + 3 (c - u) = 3: x = 0 - 1 * 3, clamped to -1
    assert torch.allclose(guided, torch.full_like(guided, -1.0))
    calls.clear()
    plain = sample(velocity, tokens, sv.null_tokens(1), (3, 1, 2, 2), steps=2, guidance_scale=1.0, noise=noise + 0.5)
    assert [n for n, _ in calls] == [1, 1] and torch.allclose(plain, torch.full_like(plain, -0.5))
    sigmas = sigma_schedule(4, shift=2.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_round_trip(model, tmp_path, dtype):
    path = save_checkpoint(model, tmp_path / "tiny.safetensors", dtype=dtype)
    assert path.with_suffix(".json").exists()
    loaded = load_checkpoint(path)
    assert loaded.config == TINY
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p.to(dtype).float(), q.float()), name
    inputs = example_inputs(TINY, frames=2, height=8, width=8)
    if dtype == torch.float32:
        assert torch.equal(model(*inputs), loaded(*inputs))


def test_attention_entropy_report(model):
    result = attention_entropy(model, example_inputs(TINY, frames=2, height=8, width=8), rows=4)
    assert result["tokens"] == 2 * 4 * 4 and len(result["layers"]) == TINY.num_layers
    for head in result["layers"][0]:
        assert 0 < head["ratio_to_uniform"] <= 1 + 1e-4 and 0 < head["top1pct_mass"] <= 1


def test_committed_checkpoint_loads():
    # the checkpoint is package data (pyproject): the demo needs it installed, so it must be there
    assert DEFAULT_CHECKPOINT.exists() and DEFAULT_CHECKPOINT.with_suffix(".json").exists()
    m = load_pretrained()
    assert m.config.num_tokens() >= 4096 and m.config.attention_head_dim in (64, 128)
    assert DEFAULT_CHECKPOINT.stat().st_size <= 16 * 2**20
    out = m(*example_inputs(m.config, frames=2, height=8, width=8))
    assert out.shape == (1, 3, 2, 8, 8) and torch.isfinite(out).all()


def test_video_files(tmp_path):
    videos, labels = sv.make_batch(2, seed=0, frames=3, height=8, width=8)
    assert save_video_strip(videos, tmp_path / "v.gif").stat().st_size > 0
    assert save_video_strip(videos[0], tmp_path / "v.png").stat().st_size > 0
    names = [sv.describe(l) for l in labels]
    assert save_contact_sheet(videos, names, tmp_path / "sheet.png").stat().st_size > 0
