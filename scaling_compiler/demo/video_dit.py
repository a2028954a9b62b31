"""A tiny text-free video DiT: the real diffusers WanTransformer3DModel on raw pixels.

The condition is three discrete tokens (shape, colour, motion; see `synthetic_videos`),
embedded by a small table into `text_dim` vectors that the Wan blocks cross-attend to.
Self-attention is the full 3-D attention over frames x (H/2) x (W/2) tokens with Wan's
3-D RoPE, which is what the scalingattn backend rewrites.

    model = load_pretrained(device="cuda", dtype=torch.bfloat16)   # the committed checkpoint
    video, timestep, tokens = example_inputs(model.config, frames=9, height=64, width=64)
    velocity = model(video, timestep, tokens)                       # (B, 3, F, H, W)

`example_inputs` works at any (frames, height, width) with even height and width:
the token count is frames * (height // 2) * (width // 2).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from scaling_compiler.demo import synthetic_videos as sv

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINT_DIR / "tiny_video_dit.safetensors"

# Fields passed to WanTransformer3DModel unchanged; the others describe video and condition.
_WAN_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
    "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps",
    "rope_max_seq_len",
)


@dataclass(frozen=True)
class TinyVideoDiTConfig:
    """WanTransformer3DModel kwargs plus the default video size and the condition vocabulary."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patch: 1x2x2 on raw pixels, so 64x64 frames give 32x32 tokens each."""
    num_attention_heads: int = 4
    attention_head_dim: int = 64
    """Kept at 64 or 128: the block-sparse kernel supports head dims 16..128."""
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 128
    """Width of the condition-token embeddings fed as encoder_hidden_states."""
    freq_dim: int = 256
    ffn_dim: int = 1024
    num_layers: int = 6
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    frames: int = 9
    height: int = 64
    width: int = 64
    """Default video: 9 x 64 x 64 pixels -> 9 x 32 x 32 = 9216 self-attention tokens."""
    vocab_size: int = sv.VOCAB_SIZE
    num_condition_tokens: int = sv.NUM_CONDITION_TOKENS
    flow_shift: float = 2.0
    """Time shift of the sigma schedule used in training and sampling."""

    def wan_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in _WAN_FIELDS}

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the default video."""
        return (self.in_channels, self.frames, self.height, self.width)

    def num_tokens(self, frames: int | None = None, height: int | None = None, width: int | None = None) -> int:
        pt, ph, pw = self.patch_size
        return ((frames or self.frames) // pt) * ((height or self.height) // ph) * ((width or self.width) // pw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TinyVideoDiTConfig:
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown TinyVideoDiTConfig fields: {sorted(unknown)}")
        values = dict(values)
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)


class TinyVideoDiT(torch.nn.Module):
    """Condition-token embedding + WanTransformer3DModel; forward returns the velocity."""

    def __init__(self, config: TinyVideoDiTConfig):
        super().__init__()
        self.config = config
        self.cond_embed = torch.nn.Embedding(config.vocab_size, config.text_dim)
        self.transformer = WanTransformer3DModel(**config.wan_kwargs())

    def forward(
        self,
        video: torch.Tensor,  # (B, C, F, H, W)
        timestep: torch.Tensor,  # (B,) in [0, 1000]
        tokens: torch.Tensor,  # (B, T) condition token ids
    ) -> torch.Tensor:  # (B, C, F, H, W)
        context = self.cond_embed(tokens)  # (B, T, text_dim)
        video = video.to(self.transformer.patch_embedding.weight.dtype)
        return self.transformer(video, timestep, context, return_dict=False)[0]


def _cast(model: TinyVideoDiT, dtype: torch.dtype) -> TinyVideoDiT:
    """Cast parameters to `dtype` except the modules Wan keeps in fp32 (as from_pretrained does)."""
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, param in model.named_parameters():
        fp32 = any(part in keep for part in name.split("."))
        param.data = param.data.to(torch.float32 if fp32 else dtype)
    rope = model.transformer.rope
    rope.freqs_cos, rope.freqs_sin = rope.freqs_cos.float(), rope.freqs_sin.float()
    return model


def build_model(config: TinyVideoDiTConfig = TinyVideoDiTConfig(), seed: int = 0) -> TinyVideoDiT:
    """A randomly initialised fp32 model (on the CPU); the output projection starts at zero."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVideoDiT(config)
    torch.nn.init.zeros_(model.transformer.proj_out.weight)
    torch.nn.init.zeros_(model.transformer.proj_out.bias)
    return _cast(model, torch.float32)


def save_checkpoint(model: TinyVideoDiT, path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the weights (cast to `dtype`) as safetensors and the config beside them as .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(model.config.to_dict(), indent=2)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": config_json, "format": "pt"})
    path.with_suffix(".json").write_text(config_json + "\n")
    logger.info("saved %d tensors to %s", len(tensors), path)
    return path


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TinyVideoDiT:
    """Load a checkpoint written by `save_checkpoint`, in eval mode."""
    path = Path(path)
    config = TinyVideoDiTConfig.from_dict(json.loads(path.with_suffix(".json").read_text()))
    model = TinyVideoDiT(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return _cast(model, dtype).to(device).eval()


def load_pretrained(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TinyVideoDiT:
    """The checkpoint committed in scaling_compiler/demo/checkpoints/ (trained by
    examples/train_video_dit.py on synthetic_videos)."""
    if not DEFAULT_CHECKPOINT.exists():
        raise FileNotFoundError(f"{DEFAULT_CHECKPOINT} is missing: run examples/train_video_dit.py")
    return load_checkpoint(DEFAULT_CHECKPOINT, device, dtype)


def example_inputs(
    config: TinyVideoDiTConfig,
    batch: int = 1,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    sigma: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(video, timestep, tokens) for `model(*inputs)`: synthetic videos noised to `sigma`.

    Any (frames, height, width) with even height and width; defaults to the config's video.
    """
    frames, height, width = frames or config.frames, height or config.height, width or config.width
    if height % config.patch_size[1] or width % config.patch_size[2]:
        raise ValueError(f"height and width must be multiples of the patch {config.patch_size}")
    x0, labels = sv.make_batch(batch, seed, frames, height, width)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    video = ((1 - sigma) * x0 + sigma * noise).to(device, dtype)
    timestep = torch.full((batch,), 1000.0 * sigma, device=device)  # float32 whatever `dtype`
    return video, timestep, sv.labels_to_tokens(labels).to(device)


def _self_attention_qk(attn, hidden_states: torch.Tensor, rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, S, H, D) of a Wan self-attention, exactly as WanAttnProcessor forms them."""
    cos, sin = rotary_emb

    def rope(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2].float(), sin[..., 1::2].float()
        return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)

    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    return rope(q), rope(k)


@torch.no_grad()
def attention_entropy(
    model: TinyVideoDiT,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rows: int = 16,
    seed: int = 0,
) -> dict:
    """Entropy of self-attention softmax rows per layer and head, against uniform (log S).

    `rows` query rows are sampled per head, one in each of `rows` equal strata of the
    token order, from the first video of `inputs`. Reports per (layer, head): mean entropy,
    its ratio to log S, effective keys exp(H) and the mass held by the top 1% of keys.
    """
    captured: list[tuple[torch.Tensor, tuple]] = []
    hooks = [
        block.attn1.register_forward_pre_hook(lambda mod, args: captured.append((args[0][:1], args[3])))
        for block in model.transformer.blocks
    ]
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    generator = torch.Generator().manual_seed(seed)
    layers = []
    for block, (hidden, rotary) in zip(model.transformer.blocks, captured):
        q, k = _self_attention_qk(block.attn1, hidden, rotary)  # (1, S, H, D)
        s = q.shape[1]
        strata = torch.linspace(0, s, rows + 1).long()
        idx = strata[:-1] + (torch.rand(rows, generator=generator) * (strata[1:] - strata[:-1])).long()
        logits = torch.einsum("qhd,khd->hqk", q[0, idx.to(q.device)], k[0]) / math.sqrt(q.shape[-1])
        p = logits.softmax(-1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (H, rows)
        top = p.topk(max(1, s // 100), dim=-1).values.sum(-1)
        layers.append([
            {"head": h, "entropy": round(float(entropy[h].mean()), 4),
             "ratio_to_uniform": round(float(entropy[h].mean() / math.log(s)), 4),
             "effective_keys": round(float(entropy[h].exp().mean()), 1),
             "top1pct_mass": round(float(top[h].mean()), 4)}
            for h in range(q.shape[2])
        ])
    s = q.shape[1]
    return {"tokens": s, "uniform_entropy": round(math.log(s), 4), "rows_per_head": rows, "layers": layers}
