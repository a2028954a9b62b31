"""Token orders: bijections on any grid, Hilbert neighbours, block compactness, text kept in place."""
import logging

import pytest
import torch

from scaling_compiler.policies.token_order import (
    ORDERS,
    TokenOrder,
    hilbert_order,
    inverse_permutation,
    mean_block_diameter,
    morton_order,
    raster_order,
    sequence_order,
)

log = logging.getLogger(__name__)

GRIDS = [(3, 5, 7), (21, 30, 52), (1, 1, 1), (2, 17, 4), (9, 32, 32), (1, 3, 1)]
TINY_DIT_GRID = (9, 32, 32)
WAN_480P_GRID = (21, 30, 52)  # Wan2.1 480p, 81 frames: 32,760 tokens


def _coords(perm: torch.Tensor, grid) -> torch.Tensor:
    return torch.stack(torch.unravel_index(perm, grid), dim=1)


def _jumps(perm: torch.Tensor, grid) -> torch.Tensor:
    """Euclidean distance between consecutive tokens of the order."""
    c = _coords(perm, grid).double()
    return (c[1:] - c[:-1]).norm(dim=1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("order", list(TokenOrder))
def test_order_is_a_bijection(grid, order):
    perm = ORDERS[order](grid)
    n = grid[0] * grid[1] * grid[2]
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_hilbert_steps_are_unit_moves_on_power_of_two_cubes(side):
    grid = (side, side, side)
    coords = _coords(hilbert_order(grid), grid)
    steps = (coords[1:] - coords[:-1]).abs().sum(1)  # Manhattan distance
    assert torch.all(steps == 1)


@pytest.mark.parametrize("grid", [(3, 5, 7), (2, 17, 4), TINY_DIT_GRID, WAN_480P_GRID])
def test_hilbert_stays_close_on_other_grids(grid, record_property):
    # Skipping out-of-grid points of the enclosing cube makes a few jumps; measured max jumps:
    # (3,5,7) 2.0, (2,17,4) 4.1, (9,32,32) 10.6, (21,30,52) 12.4 cells; mean 1.01 - 1.07.
    hilbert, morton = _jumps(hilbert_order(grid), grid), _jumps(morton_order(grid), grid)
    record_property("hilbert_max_jump", hilbert.max().item())
    log.info("grid %s: Hilbert max jump %.2f, mean %.3f; Morton max %.2f, mean %.3f", grid,
             hilbert.max().item(), hilbert.mean().item(), morton.max().item(), morton.mean().item())
    assert hilbert.mean() < 1.1
    assert (hilbert > 1).float().mean() < 0.05  # almost every step is to a face neighbour
    assert hilbert.mean() < morton.mean()


@pytest.mark.parametrize("grid", [WAN_480P_GRID, TINY_DIT_GRID])
def test_hilbert_blocks_are_most_compact(grid):
    # measured: (21,30,52) Hilbert 8.83, Morton 10.22, raster 51.6; (9,32,32) 9.02, 9.12, 31.1
    diameters = {order: mean_block_diameter(ORDERS[order](grid), grid) for order in TokenOrder}
    log.info("grid %s: mean block diameters %s", grid, diameters)
    assert diameters[TokenOrder.HILBERT] < diameters[TokenOrder.MORTON]
    assert diameters[TokenOrder.HILBERT] < diameters[TokenOrder.RASTER] / 3


def test_block_diameter_of_raster_rows():
    # a 1 x 4 x 32 grid in raster order is one 128-token block spanning the full 4 x 32 face
    assert mean_block_diameter(raster_order((1, 4, 32)), (1, 4, 32)) == pytest.approx((3**2 + 31**2) ** 0.5)


@pytest.mark.parametrize("text_spans", [(), ((0, 77),), ((300, 377),), ((40, 50), (200, 260))])
def test_sequence_order_keeps_text_in_place(text_spans):
    grid = (3, 5, 20)
    seq_len = 300 + sum(end - start for start, end in text_spans)
    perm = sequence_order(seq_len, grid, text_spans, "hilbert")
    is_text = torch.zeros(seq_len, dtype=torch.bool)
    for start, end in text_spans:
        is_text[start:end] = True
    positions = torch.arange(seq_len)
    assert torch.equal(perm[is_text], positions[is_text])
    video = positions[~is_text]
    # the video positions hold the video tokens in Hilbert order
    assert torch.equal(perm[~is_text], video[hilbert_order(grid)])
    assert torch.equal(perm.sort().values, positions)


@pytest.mark.parametrize("order", list(TokenOrder))
def test_inverse_round_trip(order):
    grid, text_spans = (2, 17, 4), ((136, 150),)
    perm = sequence_order(150, grid, text_spans, order)
    inv = inverse_permutation(perm)
    tokens = torch.randn(1, 2, 150, 8)
    assert torch.equal(tokens[:, :, perm][:, :, inv], tokens)
    assert torch.equal(perm[inv], torch.arange(150))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="video tokens"):
        sequence_order(100, (2, 5, 5), ((0, 10),))
    with pytest.raises(ValueError, match="grid"):
        hilbert_order((0, 4, 4))
    with pytest.raises(ValueError):
        sequence_order(50, (2, 5, 5), (), "zigzag")
