"""Token orders of a (frames, height, width) video token grid: raster, Morton and 3-D Hilbert.

Block-sparse attention cuts the flattened sequence into 128-token blocks. In raster order a
block is a few image rows of one frame (long and thin); along a space-filling curve it is a
compact 3-D box, so a 128x128 block of the attention matrix pairs two small regions and its
attention mass is more uniform, which makes block selection sharper (DFSAttn's premise).

A permutation is a LongTensor ``perm`` over raster indices with ``ordered = tokens[perm]``:
``perm[j]`` is the raster index of the j-th token in the new order, and
``tokens = ordered[inverse_permutation(perm)]``.

Morton and Hilbert orders are taken over the enclosing power-of-two cube (side ``2**bits``
with ``2**bits >= max(grid)``); points outside the grid are skipped, so on non-power-of-two
grids the curve jumps where it leaves and re-enters the grid.
"""
from __future__ import annotations

import enum
import math
from typing import Sequence

import torch

from ..kernels.bitmask import BLOCK_SIZE

Grid = tuple[int, int, int]  # (frames, height, width)


class TokenOrder(str, enum.Enum):
    RASTER = "raster"  # frame-major, then rows, then columns: the model's own order
    MORTON = "morton"  # Z-order: interleaved coordinate bits
    HILBERT = "hilbert"  # 3-D Hilbert curve: consecutive tokens are grid neighbours


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm] = arange``, so that ``tokens[perm][inv] == tokens``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv


def raster_order(grid: Grid) -> torch.Tensor:
    """The identity: tokens as the model lays them out."""
    return torch.arange(_grid_size(grid), dtype=torch.long)


def morton_order(grid: Grid) -> torch.Tensor:
    """Z-order over the enclosing power-of-two cube (bits of frame, row, column interleaved)."""
    coords, bits = _coords(grid), _cube_bits(grid)
    return torch.argsort(_interleave(coords.unbind(1), bits))


def hilbert_order(grid: Grid) -> torch.Tensor:
    """3-D Hilbert curve over the enclosing power-of-two cube, out-of-grid points skipped."""
    coords, bits = _coords(grid), _cube_bits(grid)
    return torch.argsort(hilbert_index(coords, bits))


ORDERS = {TokenOrder.RASTER: raster_order, TokenOrder.MORTON: morton_order, TokenOrder.HILBERT: hilbert_order}


def hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:  # (N, 3) int -> (N,) int64
    """Position along the 3-D Hilbert curve of side ``2**bits`` of each point, all points at once.

    Skilling's algorithm ("Programming the Hilbert curve", AIP Conf. Proc. 707, 2004): the
    coordinates are transformed in place into the "transpose" of the Hilbert index, whose bits,
    read as ``x0[b-1] x1[b-1] x2[b-1] x0[b-2] ... x2[0]``, are the index. From the most
    significant bit q down: where bit q of axis i is set, the lower bits of axis 0 are inverted,
    otherwise the lower bits of axes 0 and i are exchanged (this undoes the curve's rotations
    and reflections); then the result is Gray-coded. Each branch becomes a ``torch.where`` over
    all points, so the cost is O(3 * bits) vector ops.
    """
    x = [c.to(torch.long).clone() for c in coords.unbind(1)]
    q = 1 << (bits - 1)
    while q > 1:  # undo the rotations/reflections, most significant level first
        p = q - 1
        for i in range(3):
            set_ = (x[i] & q) != 0
            if i == 0:
                x[0] = torch.where(set_, x[0] ^ p, x[0])
                continue
            swap = (x[0] ^ x[i]) & p  # exchange the low bits of axes 0 and i
            x[0], x[i] = torch.where(set_, x[0] ^ p, x[0] ^ swap), torch.where(set_, x[i], x[i] ^ swap)
        q >>= 1
    for i in range(1, 3):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave([xi ^ t for xi in x], bits)


def sequence_order(
    seq_len: int,
    grid: Grid,
    text_spans: Sequence[tuple[int, int]] = (),
    order: TokenOrder | str = TokenOrder.HILBERT,
) -> torch.Tensor:
    """Permutation of a whole attention sequence: video tokens reordered, text tokens in place.

    In joint text+video attention the text tokens (``text_spans``, [start, end) ranges) keep
    their positions; the video tokens fill the remaining positions in ``order``.
    """
    is_text = torch.zeros(seq_len, dtype=torch.bool)
    for start, end in text_spans:
        is_text[start:end] = True
    video = (~is_text).nonzero().squeeze(1)
    if video.numel() != _grid_size(grid):
        raise ValueError(f"grid {tuple(grid)} has {_grid_size(grid)} tokens but the sequence has "
                         f"{video.numel()} video tokens ({seq_len} minus text spans {tuple(text_spans)})")
    perm = torch.arange(seq_len, dtype=torch.long)
    perm[video] = video[ORDERS[TokenOrder(order)](grid)]
    return perm


def mean_block_diameter(perm: torch.Tensor, grid: Grid, chunk_blocks: int = 256) -> float:
    """Mean over 128-token blocks of ``ordered = tokens[perm]`` of the largest 3-D distance
    between two tokens of the block (Euclidean, in grid cells). ``perm`` orders video tokens only.

    The compactness measure of an order: raster blocks of a 52-wide grid span ~3 rows of 52
    tokens (diameter ~52), Hilbert blocks are boxes of a few cells a side.
    """
    coords = _coords(grid)[perm].double()
    diameters = []
    for start in range(0, coords.shape[0], chunk_blocks * BLOCK_SIZE):
        part = coords[start : start + chunk_blocks * BLOCK_SIZE]
        full = part.shape[0] // BLOCK_SIZE * BLOCK_SIZE
        blocks = [part[:full].reshape(-1, BLOCK_SIZE, 3)]
        if full < part.shape[0]:
            blocks.append(part[full:][None])  # the tail block
        diameters += [torch.cdist(b, b).amax(dim=(1, 2)) for b in blocks]
    return torch.cat(diameters).mean().item()


def _grid_size(grid: Grid) -> int:
    if len(grid) != 3 or any(not isinstance(n, int) or n < 1 for n in grid):
        raise ValueError(f"grid must be three positive ints (frames, height, width), got {grid!r}")
    return math.prod(grid)


def _cube_bits(grid: Grid) -> int:
    """Bits per axis of the enclosing power-of-two cube (at least 1)."""
    return max(1, (max(grid) - 1).bit_length())


def _coords(grid: Grid) -> torch.Tensor:  # (N, 3) int64 (frame, row, column) in raster order
    idx = torch.arange(_grid_size(grid), dtype=torch.long)
    return torch.stack(torch.unravel_index(idx, grid), dim=1)


def _interleave(axes: Sequence[torch.Tensor], bits: int) -> torch.Tensor:
    """Concatenate bit b of every axis, most significant bit first: axis 0's bit leads."""
    code = torch.zeros_like(axes[0])
    for b in range(bits - 1, -1, -1):
        for a in axes:
            code = (code << 1) | ((a >> b) & 1)
    return code
