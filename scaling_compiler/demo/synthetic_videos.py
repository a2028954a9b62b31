"""Procedural videos of one coloured shape moving on a plain background, made from a seed.

Each video is described by three discrete labels - shape, colour, motion - which are also
its condition: `labels_to_tokens` maps them to token ids (0 is the null token used for
classifier-free guidance). Everything is vectorised torch, so a batch renders on the GPU
in one pass; random parameters are drawn on the CPU from a seeded generator, so a seed
gives the same videos on any device.

Shapes are rendered from signed distance functions in normalised coordinates
([-1, 1] across the frame), so the same labels and seed give the same motion at any
resolution or frame count.
"""
from __future__ import annotations

import math

import torch

SHAPES = ("circle", "square", "triangle", "cross", "ring", "hexagon")
COLOURS = {  # RGB in [0, 1]
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.25),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.98, 0.9, 0.15),
    "cyan": (0.1, 0.9, 0.95),
    "magenta": (0.95, 0.2, 0.9),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.05),
}
MOTIONS = ("bounce", "rotate", "grow", "shrink", "orbit")
BACKGROUND = (0.12, 0.12, 0.14)  # plain dark grey, in [0, 1]

SLOTS = (SHAPES, tuple(COLOURS), MOTIONS)
NULL_TOKEN = 0
# Token ids: 0 = null, then the shapes, the colours and the motions, in that order.
TOKEN_OFFSETS = (1, 1 + len(SHAPES), 1 + len(SHAPES) + len(COLOURS))
VOCAB_SIZE = 1 + sum(len(s) for s in SLOTS)
NUM_CONDITION_TOKENS = len(SLOTS)
# The quality harness's prompts (every shape, colour and motion at least once): held out of any
# tuning on these videos (examples/finetune_salad.py never draws their label triples).
EVAL_PROMPTS = (
    "red circle bounce", "blue square rotate", "green triangle grow", "yellow cross shrink",
    "cyan ring orbit", "magenta hexagon bounce", "white square orbit", "orange hexagon rotate",
)


def labels_to_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(B, 3) class indices (shape, colour, motion) -> (B, 3) token ids."""
    return labels + torch.tensor(TOKEN_OFFSETS, device=labels.device)


def null_tokens(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The unconditional condition: (B, 3) null tokens."""
    return torch.full((batch, NUM_CONDITION_TOKENS), NULL_TOKEN, dtype=torch.long, device=device)


def parse_prompt(prompt: str) -> torch.Tensor:
    """'red circle bounce' (any word order) -> (3,) labels; every slot must be named once."""
    words = prompt.lower().split()
    labels = []
    for names in SLOTS:
        found = [w for w in words if w in names]
        if len(found) != 1:
            raise ValueError(f"prompt {prompt!r} must name exactly one of {names}")
        labels.append(names.index(found[0]))
    return torch.tensor(labels)


def describe(labels: torch.Tensor) -> str:
    """(3,) labels -> 'colour shape motion'."""
    shape, colour, motion = (int(v) for v in labels)
    return f"{SLOTS[1][colour]} {SHAPES[shape]} {MOTIONS[motion]}"


def sample_labels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniformly random (B, 3) labels, drawn on the CPU."""
    return torch.stack([torch.randint(len(s), (batch,), generator=generator) for s in SLOTS], dim=1)


def _shape_sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (in shape units, radius ~1) of every shape, picked per video by `shape`.

    px, py: (B, F, H, W) coordinates in the shape's frame; shape: (B,) class indices.
    """
    r = torch.sqrt(px * px + py * py)
    ax, ay = px.abs(), py.abs()

    def polygon(n: int, inradius: float) -> torch.Tensor:
        # max over the edge normals of the projection: exact inside, close enough for anti-aliasing
        angles = [math.pi / 2 + 2 * math.pi * k / n + math.pi / n for k in range(n)]
        return torch.stack([px * math.cos(a) + py * math.sin(a) for a in angles]).amax(0) - inradius

    sdfs = torch.stack([
        r - 1.0,                                                    # circle
        torch.maximum(ax, ay) - 0.85,                               # square
        polygon(3, 0.55),                                           # triangle
        torch.minimum(torch.maximum(ax - 1.0, ay - 0.35),           # cross
                      torch.maximum(ax - 0.35, ay - 1.0)),
        (r - 0.72).abs() - 0.28,                                    # ring
        polygon(6, 0.87),                                           # hexagon
    ])  # (S, B, F, H, W)
    index = shape.view(1, -1, 1, 1, 1).expand(1, *sdfs.shape[1:])
    return sdfs.gather(0, index)[0]


def _reflect(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fold x into [lo, hi] as a ball bouncing between two walls does (triangle wave)."""
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(x - lo, 2 * span)
    return lo + span - (u - span).abs()


def render_videos(
    labels: torch.Tensor,  # (B, 3) shape, colour, motion
    generator: torch.Generator,
    frames: int = 9,
    height: int = 64,
    width: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Render one video per label row: (B, 3, F, H, W) in [-1, 1].

    Start position, direction, speed, size and angle are random (from `generator`, on the
    CPU); what the labels name is fixed.
    """
    b = labels.shape[0]
    shape, colour, motion = labels.T

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, generator=generator)

    size0 = 0.22 + 0.12 * rand(b)                    # radius, in half-frames
    angle0 = 2 * math.pi * rand(b)
    center0 = (rand(b, 2) * 2 - 1) * 0.45
    heading = 2 * math.pi * rand(b)
    speed = 0.12 + 0.08 * rand(b)                    # half-frames per frame
    spin = (0.25 + 0.2 * rand(b)) * torch.where(rand(b) < 0.5, -1.0, 1.0)  # radians per frame
    orbit_radius = 0.3 + 0.2 * rand(b)
    orbit_phase = 2 * math.pi * rand(b)

    t = torch.arange(frames, dtype=torch.float32).view(1, -1)   # (1, F)
    progress = t / max(frames - 1, 1)
    is_ = [(motion == k).view(-1, 1) for k in range(len(MOTIONS))]
    bounce, rotate, grow, shrink, orbit = is_

    # scale over time: grow 0.55x -> 1.45x, shrink the reverse, otherwise constant
    scale = size0.view(-1, 1) * torch.where(grow, 0.55 + 0.9 * progress,
                                            torch.where(shrink, 1.45 - 0.9 * progress, 1.0 + 0 * t))
    angle = angle0.view(-1, 1) + torch.where(rotate | orbit, spin.view(-1, 1) * t, 0 * t)

    # bounce: straight line folded at the walls; orbit: circle around the start point
    direction = torch.stack([heading.cos(), heading.sin()], dim=-1)            # (B, 2)
    line = center0.unsqueeze(1) + (speed.view(-1, 1) * t).unsqueeze(-1) * direction.unsqueeze(1)
    wall = 1.0 - scale.unsqueeze(-1)
    line = _reflect(line, -wall, wall)
    phase = orbit_phase.view(-1, 1) + 0.6 * t
    orbit_xy = center0.unsqueeze(1) * 0.4 + orbit_radius.view(-1, 1, 1) * torch.stack(
        [phase.cos(), phase.sin()], dim=-1)
    still = center0.unsqueeze(1).expand(b, frames, 2)
    center = torch.where(bounce.unsqueeze(-1), line, torch.where(orbit.unsqueeze(-1), orbit_xy, still))

    # pixel-centre grid in normalised coordinates, then each video's shape frame
    ys = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    gy, gx = ys.view(1, 1, -1, 1), xs.view(1, 1, 1, -1)
    center, angle, scale = (v.to(device) for v in (center, angle, scale))
    dx = gx - center[..., 0, None, None]
    dy = gy - center[..., 1, None, None]
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    s = scale[..., None, None]
    px, py = (cos * dx + sin * dy) / s, (-sin * dx + cos * dy) / s
    sdf = _shape_sdf(shape.to(device), px, py) * s                   # in half-frames
    pixel = 2.0 / min(height, width)
    alpha = (0.5 - sdf / pixel).clamp(0, 1).unsqueeze(1)              # (B, 1, F, H, W)

    palette = torch.tensor(list(COLOURS.values()), device=device)
    fg = palette[colour.to(device)].view(b, 3, 1, 1, 1)
    bg = torch.tensor(BACKGROUND, device=device).view(1, 3, 1, 1, 1)
    return (bg + alpha * (fg - bg)) * 2 - 1


def make_batch(
    batch: int,
    seed: int,
    frames: int = 9,
    height: int = 64,
    width: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch from `seed`: videos (B, 3, F, H, W) in [-1, 1] and labels (B, 3)."""
    generator = torch.Generator().manual_seed(seed)
    labels = sample_labels(batch, generator)
    return render_videos(labels, generator, frames, height, width, device), labels.to(device)


def main() -> None:
    """Write a strip of one video per motion to synthetic_videos.png."""
    from scaling_compiler.demo.sampling import save_video_strip

    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([[s % len(SHAPES), s, s % len(MOTIONS)] for s in range(8)])
    save_video_strip(render_videos(labels, generator), "synthetic_videos.png")


if __name__ == "__main__":
    main()
