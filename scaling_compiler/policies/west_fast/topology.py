"""WEST threshold maps: one per attention site, the whole sparsity hierarchy in one tensor.

`T[h, u, v]` is the smallest density p at which key block v enters head h's top-p key blocks
of query block u in every calibration sample (blocks ranked per query-block row, so every row
keeps blocks). The mask at density p is `T <= p`: topology (T) is decoupled from sparsity (p).

Files are safetensors (T in float16; the calibration's block mass and sampled rows in float32)
with a JSON metadata entry that describes the model fingerprint, the sites, their token grids and the calibration,
a cache entry's key fields, and a checksum of the tensors and that metadata (checked on load).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ... import cache
from ...kernels.bitmask import BLOCK_SIZE, num_blocks

FORMAT = "scalingattn-topology/1"
Grid = tuple[int, int, int]


class TopologyFileError(ValueError):
    """A topology file that cannot be used: unreadable, another format, or inconsistent."""


@dataclasses.dataclass
class SiteTopology:
    thresholds: torch.Tensor  # float32 (H, Nq, Nk): the mask at density p is thresholds <= p
    mass: torch.Tensor | None  # float32 (H, Nq, Nk): mean block significance over calibration (max when transferred)
    q_len: int
    kv_len: int
    token_grid: Grid | None  # (frames, height, width) of the video tokens
    text_spans: tuple[tuple[int, int], ...]
    source: str  # "calibrated" or "transferred from <grid>"
    # exact key-block mass of sampled query rows (FAST's fidelity curves); none when transferred
    row_mass: torch.Tensor | None = None  # float32 (H, R, Nk): each row sums to 1 (0 for a row with no key)
    row_blocks: torch.Tensor | None = None  # int64 (R,): the query block of each sampled row

    def mask_for_density(self, density: float) -> tuple[torch.Tensor, list[float]]:
        """Per head, the `floor(density * Nq * Nk)` blocks of lowest T, each row's first block among them.

        Blocks of equal T (one level holds many when the calibration samples disagree) are
        ordered by their mean calibration mass, so every head meets the density target.
        Returns the mask and each head's p (the largest T it keeps).
        """
        heads, nq, nk = self.thresholds.shape
        # each row's first block is taken first, so the count is exact: max(target, one per row)
        order_key = self._order_key().masked_fill(self._row_first(), float("-inf")).reshape(heads, -1)
        keep = max(nq, math.floor(density * nq * nk + 1e-9))
        kept = order_key.topk(keep, dim=1, largest=False).indices
        mask = torch.zeros(heads, nq * nk, dtype=torch.bool, device=self.thresholds.device)
        mask = mask.scatter_(1, kept, True).reshape(heads, nq, nk)
        levels = [float(self.thresholds[h][mask[h]].max()) for h in range(heads)]
        return mask, levels

    def _order_key(self) -> torch.Tensor:
        """T, with ties broken toward more calibration mass (by less than T's step of 1/Nk)."""
        if self.mass is None:
            return self.thresholds
        scaled = self.mass / self.mass.flatten(1).amax(dim=1).clamp_min(1e-30)[:, None, None]
        return self.thresholds - 0.5 / self.thresholds.shape[-1] * scaled

    def _row_first(self) -> torch.Tensor:
        """One-hot (H, Nq, Nk) of each query-block row's first block in T order."""
        first = torch.zeros_like(self.thresholds, dtype=torch.bool)
        return first.scatter_(-1, self._order_key().argmin(dim=-1, keepdim=True), True)

    def recall(self, block_mask: torch.Tensor) -> list[float] | None:
        """Per head, the mean over query rows of the calibration attention mass inside kept blocks."""
        if self.mass is None or self.source != "calibrated":
            return None
        keys = torch.full((self.mass.shape[-1],), BLOCK_SIZE, dtype=torch.float32, device=self.mass.device)
        keys[-1] = self.kv_len - BLOCK_SIZE * (len(keys) - 1)
        row_mass = self.mass * keys  # each block row sums to 1
        kept = (row_mass * block_mask.to(row_mass.device)).sum(-1) / row_mass.sum(-1).clamp_min(1e-30)
        return kept.mean(-1).tolist()

    def transfer(self, q_len: int, token_grid: Grid, text_spans: tuple[tuple[int, int], ...]) -> "SiteTopology":
        """Resize to another token grid (self-attention, Sq == Sk) on the 3-D block grid.

        Each target block takes the minimum T over the source blocks its tokens map to (its
        tokens' (frame, row, column) coordinates scaled to the source grid, the corners of each
        token's footprint): rounding toward inclusion, so the transferred mask at p keeps at
        least the blocks the source kept. The target cannot be finer than the source: where
        one source block covers several target blocks they share its T, so densities below
        about 1/Nk of the source are not resolved.
        """
        if self.token_grid is None:
            raise ValueError("cannot transfer a topology whose token grid is unknown")
        members = _source_blocks(q_len, token_grid, text_spans, self.q_len, self.token_grid, self.text_spans)
        thresholds = _resize(self.thresholds, members, torch.amin)
        mass = None if self.mass is None else _resize(self.mass, members, torch.amax)
        return SiteTopology(
            thresholds=thresholds, mass=mass, q_len=q_len, kv_len=q_len, token_grid=token_grid,
            text_spans=text_spans, source=f"transferred from {'x'.join(map(str, self.token_grid))}",
        )


@dataclasses.dataclass
class Topology:
    """Threshold maps of every rewritten site of one model, with what they were made from."""

    fingerprint: str  # of the model weights (see cache.weights_fingerprint)
    sites: dict[str, SiteTopology]
    calibration: dict[str, Any]  # settings: samples, seed, inputs
    key: dict[str, Any] | None = None  # a cache entry's key fields (cache.key_fields); None in other files
    checksum: str | None = None  # as read from a file (None: written before files had one)

    def save(self, path: str) -> None:
        """Write the file; its metadata holds a checksum of the tensor data and of the metadata itself."""
        tensors, sites_meta = {}, {}
        for name, site in self.sites.items():
            tensors[f"{name}/thresholds"] = site.thresholds.half().cpu().contiguous()
            if site.mass is not None:
                tensors[f"{name}/mass"] = site.mass.float().cpu().contiguous()
            if site.row_mass is not None:
                tensors[f"{name}/row_mass"] = site.row_mass.float().cpu().contiguous()
                tensors[f"{name}/row_blocks"] = site.row_blocks.cpu().contiguous()
            sites_meta[name] = {
                "q_len": site.q_len, "kv_len": site.kv_len, "token_grid": site.token_grid,
                "text_spans": site.text_spans, "source": site.source, "block_size": BLOCK_SIZE,
            }
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "calibration": self.calibration, "sites": sites_meta}
        if self.key is not None:
            metadata["key"] = self.key
        metadata = json.loads(json.dumps(metadata))  # tuples as lists: the checksum covers what is read back
        metadata["checksum"] = cache.checksum(tensors, metadata)
        save_file(tensors, path, metadata={"scalingattn": json.dumps(metadata)})

    @classmethod
    def load(cls, path: str) -> "Topology":
        """Read a topology file; raises TopologyFileError if it is unreadable, damaged or inconsistent.

        A file with a checksum (every file this version writes) must match it: a flipped bit in
        the tensor data or the metadata is an error, not a slightly different topology.
        """
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            metadata = json.loads(header["__metadata__"]["scalingattn"])
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
            raise TopologyFileError(f"{path}: not a readable topology file ({error})") from error
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            found = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
            raise TopologyFileError(f"{path}: format {found!r}, expected {FORMAT!r}")
        stored_checksum = metadata.pop("checksum", None)
        if stored_checksum is not None and stored_checksum != cache.checksum(tensors, metadata):
            raise TopologyFileError(f"{path}: checksum mismatch: its data or metadata changed after it was written")
        try:
            sites = {name: _site_from_file(name, meta, tensors) for name, meta in _typed(metadata, "sites", dict).items()}
            fingerprint, calibration = _typed(metadata, "fingerprint", str), _typed(metadata, "calibration", dict)
            key = metadata.get("key")
            if key is not None and not isinstance(key, dict):
                raise TopologyFileError(f"'key' is a {type(key).__name__}, not a dict")
        except TopologyFileError as error:
            raise TopologyFileError(f"{path}: {error}") from None
        return cls(fingerprint=fingerprint, sites=sites, calibration=calibration, key=key, checksum=stored_checksum)


def _typed(meta: dict, field: str, kind: type) -> Any:
    value = meta.get(field)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TopologyFileError(f"{field!r} is {value!r}, not a {kind.__name__}")
    return value


def _site_from_file(name: str, meta: Any, tensors: dict[str, torch.Tensor]) -> SiteTopology:
    """One site's map from its metadata and tensors, every field and tensor checked for type and shape."""
    if not isinstance(meta, dict):
        raise TopologyFileError(f"site {name!r}: metadata is a {type(meta).__name__}, not a dict")
    q_len, kv_len, source = _typed(meta, "q_len", int), _typed(meta, "kv_len", int), _typed(meta, "source", str)
    grid, spans = meta.get("token_grid"), meta.get("text_spans")
    if grid is not None and not (isinstance(grid, list) and len(grid) == 3 and all(type(n) is int for n in grid)):
        raise TopologyFileError(f"site {name!r}: token_grid {grid!r} is not three ints")
    if not (isinstance(spans, list) and all(isinstance(s, list) and len(s) == 2 and all(type(n) is int for n in s)
                                            for s in spans)):
        raise TopologyFileError(f"site {name!r}: text_spans {spans!r} are not pairs of ints")
    if q_len < 1 or kv_len < 1:
        raise TopologyFileError(f"site {name!r}: lengths {q_len}, {kv_len}")
    thresholds = tensors.get(f"{name}/thresholds")
    expected = (num_blocks(q_len), num_blocks(kv_len))
    if thresholds is None or thresholds.dim() != 3 or tuple(thresholds.shape[1:]) != expected:
        raise TopologyFileError(f"site {name!r} has no thresholds of block shape {expected}")
    mass = tensors.get(f"{name}/mass")
    row_mass, row_blocks = tensors.get(f"{name}/row_mass"), tensors.get(f"{name}/row_blocks")
    floats = [t for t in (thresholds, mass, row_mass) if t is not None]
    if not all(t.is_floating_point() for t in floats) or (row_blocks is not None and (
            row_blocks.is_floating_point() or row_blocks.dtype == torch.bool)):
        raise TopologyFileError(f"site {name!r} has tensors of the wrong dtype: {[t.dtype for t in floats]}")
    if mass is not None and mass.shape != thresholds.shape:
        raise TopologyFileError(f"site {name!r}: mass of shape {tuple(mass.shape)}, thresholds {tuple(thresholds.shape)}")
    if (row_mass is None) != (row_blocks is None) or (row_mass is not None and (
            row_blocks.dim() != 1 or row_mass.shape != (thresholds.shape[0], row_blocks.numel(), expected[1])
            or (row_blocks.numel() and not 0 <= int(row_blocks.min()) <= int(row_blocks.max()) < expected[0]))):
        raise TopologyFileError(f"site {name!r} has inconsistent sampled rows")
    return SiteTopology(
        thresholds=thresholds.float(), mass=None if mass is None else mass.float(), q_len=q_len, kv_len=kv_len,
        token_grid=tuple(grid) if grid else None, text_spans=tuple(tuple(s) for s in spans), source=source,
        row_mass=None if row_mass is None else row_mass.float(), row_blocks=row_blocks,
    )


def site_problem(site_map: SiteTopology, heads: int, q_len: int, kv_len: int, token_grid: Grid | None,
                 text_spans: tuple[tuple[int, int], ...]) -> str | None:
    """Why `site_map` cannot serve a site of this shape, or None: a cached map must describe the very
    site (its grid, heads and lengths) and hold sane values (T in (0, 1], finite non-negative mass)."""
    found = (site_map.thresholds.shape[0], site_map.q_len, site_map.kv_len, site_map.token_grid, site_map.text_spans)
    wanted = (heads, q_len, kv_len, token_grid and tuple(token_grid), tuple(map(tuple, text_spans)))
    if found != wanted:
        return f"made for (heads, q_len, kv_len, grid, text spans) {found}, not {wanted}"
    thresholds = site_map.thresholds
    if not bool(((thresholds > 0) & (thresholds <= 1)).all()):  # NaN fails both comparisons
        return f"thresholds outside (0, 1] ({int((~((thresholds > 0) & (thresholds <= 1))).sum())} of {thresholds.numel()})"
    # calibration takes each row's minimum over samples of rank-based T, and every sample ranks a
    # block first (T = 1/Nk): a row without one was not made by calibration
    first = 1.0 / thresholds.shape[-1]
    if not torch.allclose(thresholds.amin(-1), torch.full_like(thresholds[..., 0], first), rtol=1e-3, atol=0):
        return f"rows whose first block is not at T = 1/{thresholds.shape[-1]}"
    for label, tensor in (("mass", site_map.mass), ("row_mass", site_map.row_mass)):
        if tensor is not None and not bool((tensor >= 0).all() & tensor.isfinite().all()):
            return f"{label} not finite and non-negative"
    return None


def thresholds_from_significance(significance: torch.Tensor) -> torch.Tensor:
    """T for one sample: (..., Nq, Nk) block significance -> rank-based entry density.

    Per query-block row, the block of rank r (0 = most mass) enters the top-p set at
    p = (r + 1) / Nk.
    """
    nk = significance.shape[-1]
    order = significance.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(nk, device=order.device).expand_as(order))
    return (ranks + 1).float() / nk


def _resize(blocks: torch.Tensor, members: list[torch.Tensor], reduce) -> torch.Tensor:
    """(H, Nq_s, Nk_s) -> (H, Nq_t, Nk_t): reduce over the source blocks of each target block."""
    rows = torch.stack([reduce(blocks[:, m, :], dim=1) for m in members], dim=1)
    return torch.stack([reduce(rows[:, :, m], dim=2) for m in members], dim=2)


def _source_blocks(
    n_target: int, grid_target: Grid, spans_target: tuple, n_source: int, grid_source: Grid, spans_source: tuple
) -> list[torch.Tensor]:
    """For each target block, the source blocks its tokens map to."""
    if len(spans_target) != len(spans_source):
        raise ValueError(f"text spans differ: {spans_target} vs {spans_source}")
    source_tokens = torch.empty(n_target, 8, dtype=torch.long)
    is_text = torch.zeros(n_target, dtype=torch.bool)
    for (t0, t1), (s0, s1) in zip(spans_target, spans_source):
        offsets = torch.arange(t1 - t0).clamp_max(s1 - s0 - 1)
        source_tokens[t0:t1] = (s0 + offsets)[:, None]
        is_text[t0:t1] = True
    video_target = (~is_text).nonzero().squeeze(1)
    video_source = _video_positions(n_source, spans_source)
    if len(video_target) != math.prod(grid_target) or len(video_source) != math.prod(grid_source):
        raise ValueError("video token count does not match the token grid")
    coords = torch.stack(torch.unravel_index(torch.arange(len(video_target)), grid_target), dim=1)  # (N, 3)
    scale = torch.tensor(grid_source, dtype=torch.float64) / torch.tensor(grid_target, dtype=torch.float64)
    low = (coords * scale).floor().long()
    high = ((coords + 1) * scale - 1e-9).floor().long().clamp_min(low)
    high = torch.minimum(high, torch.tensor(grid_source) - 1)
    corners = []
    for pick in range(8):
        corner = torch.stack([high[:, a] if pick >> a & 1 else low[:, a] for a in range(3)], dim=1)
        flat = (corner[:, 0] * grid_source[1] + corner[:, 1]) * grid_source[2] + corner[:, 2]
        corners.append(video_source[flat])
    source_tokens[video_target] = torch.stack(corners, dim=1)
    return [(source_tokens[start : start + BLOCK_SIZE] // BLOCK_SIZE).unique() for start in range(0, n_target, BLOCK_SIZE)]


def _video_positions(n: int, spans: tuple) -> torch.Tensor:
    is_text = torch.zeros(n, dtype=torch.bool)
    for start, end in spans:
        is_text[start:end] = True
    return (~is_text).nonzero().squeeze(1)
