"""PNG pictures of a PassReport, for people who would rather look than read.

- `masks_<site>.png`: each sparse site's block mask per head (columns) at a few steps (rows);
  a dark cell is a kept 128x128 block, a light one a skipped block.
- `density.png`: the kept fraction of every (layer, step, head): one band per sparse site
  (layer), a column per step and a row per head, dark for sparse, bright for dense. With FAST
  this is its budget surface as the masks realise it.

Pillow draws them (diffusers, which we require, requires it); it is imported only here.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .kernels.bitmask import num_blocks, unpack_block_mask
from .sites import SitePlan

if TYPE_CHECKING:
    from PIL import Image

    from .report import PassReport, SiteReport

log = logging.getLogger(__name__)

MASK_STEPS = 4  # steps shown per site: first, last and evenly between
KEPT, SKIPPED, BACKGROUND, INK = (33, 60, 120), (228, 228, 228), (255, 255, 255), (0, 0, 0)
PANEL_PIXELS = 128  # a site's mask panel is about this wide, whatever its block count
GAP, LABEL = 6, 14
# viridis at five stops, interpolated linearly: density 0 -> dark purple, 1 -> yellow
_VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                        dtype=torch.float64)


def save_report_pictures(report: "PassReport", directory: Path) -> list[Path]:
    """Write the masks of each sparse site and the (layer, step, head) density; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for site in report.sparse_sites:
        plan = report.plans.get(site.name)
        picture = _masks_picture(report, site, plan) if plan is not None else None
        if picture is None:
            log.info("scalingattn: %s chooses its masks at run time: no mask picture", site.name)
            continue
        path = directory / f"masks_{_file_name(site.name)}.png"
        picture.save(path)
        written.append(path)
    density = _density_picture(report)
    if density is not None:
        path = directory / "density.png"
        density.save(path)
        written.append(path)
    return written


def shown_steps(steps: int, count: int = MASK_STEPS) -> list[int]:
    """Up to `count` distinct step indices from the first to the last, evenly spread."""
    return sorted(set(torch.linspace(0, steps - 1, min(count, steps)).round().long().tolist()))


def _masks_picture(report: "PassReport", site: "SiteReport", plan: SitePlan) -> "Image.Image | None":
    name, kv_len = site.name, site.kv_len
    timesteps = report.step_timesteps
    steps = shown_steps(len(timesteps)) if timesteps is not None else [0]
    densities = plan.step_head_densities(site.shape[2], kv_len)
    if densities is not None and bool((densities == densities[:1]).all()):
        steps = steps[:1]  # every step keeps the same fractions: the plan's masks do not vary by step
    rows = []
    for step in steps:
        words = plan.masks_at(float(timesteps[step])) if timesteps is not None else None
        if words is None:
            return None
        rows.append((step, unpack_block_mask(words.cpu(), num_blocks(kv_len))))  # (H, Nq, Nk)
    heads, nq, nk = rows[0][1].shape
    cell = max(1, min(16, PANEL_PIXELS // max(nq, nk)))
    left = 110
    title = f"{name}: kept blocks (dark) per head"
    width = max(left + heads * (nk * cell + GAP), _text_width(title) + 4)
    height = 2 * LABEL + len(rows) * (nq * cell + GAP + LABEL)
    image, draw = _canvas(width, height)
    draw.text((2, 0), title, fill=INK)
    for h in range(heads):
        draw.text((left + h * (nk * cell + GAP), LABEL), f"head {h}", fill=INK)
    for r, (step, mask) in enumerate(rows):
        top = 2 * LABEL + r * (nq * cell + GAP + LABEL)
        label = f"step {step}" + (f" t={float(timesteps[step]):.4g}" if timesteps is not None else "")
        draw.text((2, top + LABEL), label, fill=INK)
        for h in range(heads):
            panel = _cells(mask[h], cell)
            image.paste(panel, (left + h * (nk * cell + GAP), top + LABEL))
    return image


def _cells(mask: torch.Tensor, cell: int) -> "Image.Image":
    """A bool (Nq, Nk) mask as an image of cell x cell pixels per block."""
    from PIL import Image

    colours = torch.where(mask[..., None], torch.tensor(KEPT), torch.tensor(SKIPPED)).to(torch.uint8)
    pixels = colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1).contiguous()
    return Image.fromarray(pixels.numpy(), "RGB")


def density_cube(report: "PassReport") -> tuple[list[str], list[torch.Tensor]]:
    """Per sparse site with fixed masks (the layers), its kept fraction per (step, head), float64."""
    names, cubes = [], []
    for site in report.sparse_sites:
        plan = report.plans.get(site.name)
        densities = plan.step_head_densities(site.shape[2], site.kv_len) if plan is not None else None
        if densities is None:  # masks chosen at run time
            continue
        names.append(site.name)
        cubes.append(densities)  # (steps, H)
    return names, cubes


def _density_picture(report: "PassReport") -> "Image.Image | None":
    from PIL import Image

    names, cubes = density_cube(report)
    if not cubes:
        return None
    steps = max(c.shape[0] for c in cubes)
    cell = max(2, min(12, 600 // steps))
    left = 130
    title = f"kept fraction per (layer, step, head); policy {report.policy}, schedule {report.schedule or '-'}"
    width = max(left + steps * cell + 40, _text_width(title) + 4)
    bands = [c.shape[1] * cell + GAP for c in cubes]
    height = 3 * LABEL + sum(bands) + LABEL
    image, draw = _canvas(width, height)
    draw.text((2, 0), title, fill=INK)
    draw.text((left, LABEL), f"step 0 .. {steps - 1} ->   (a row per head)", fill=INK)
    top = 2 * LABEL
    for name, cube, band in zip(names, cubes, bands):
        full = cube.expand(steps, -1) if cube.shape[0] == 1 else cube  # a static plan: the same every step
        colours = _colour(full.T)  # (H, steps, 3)
        pixels = colours.repeat_interleave(cell, 0).repeat_interleave(cell, 1).contiguous()
        image.paste(Image.fromarray(pixels.numpy(), "RGB"), (left, top))
        draw.text((2, top), name[-20:], fill=INK)
        top += band
    # the colour scale: 0 (left) to 1 (right)
    scale = _colour(torch.linspace(0, 1, 100, dtype=torch.float64)[None, :]).repeat_interleave(8, 0).contiguous()
    image.paste(Image.fromarray(scale.numpy(), "RGB"), (left, top + 2))
    draw.text((left + 104, top), "0 .. 1", fill=INK)
    return image


def _colour(values: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3): `values` in [0, 1] on the viridis scale."""
    position = values.clamp(0, 1).double() * (len(_VIRIDIS) - 1)
    low = position.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (position - low)[..., None]
    return (_VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac).round().to(torch.uint8)


def _text_width(text: str) -> int:
    from PIL import ImageFont

    return int(ImageFont.load_default().getlength(text))


def _canvas(width: int, height: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _file_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site)
