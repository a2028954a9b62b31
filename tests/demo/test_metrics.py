"""PSNR and SSIM of videos (scaling_compiler.demo.metrics) against their definitions."""
import math

import pytest
import torch

from scaling_compiler.demo.metrics import psnr, ssim

# (B, C, F, H, W): odd and non-square frames, the 11x11 minimum, a 1-frame video
SHAPES = [(2, 3, 2, 13, 17), (1, 1, 3, 11, 11), (1, 3, 1, 16, 12), (2, 2, 2, 19, 14)]


def random_video(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def ssim_reference(a, b, data_range=2.0):
    """Wang et al.'s SSIM written out: a loop over every valid 11x11 window position of every
    (video, channel, frame), Gaussian-weighted statistics in float64, mean over all of them."""
    size, sigma, k1, k2 = 11, 1.5, 0.01, 0.03
    g = [math.exp(-((i - 5) ** 2) / (2 * sigma**2)) for i in range(size)]
    w = torch.tensor([[gi * gj for gj in g] for gi in g], dtype=torch.float64)
    w = w / w.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    result = []
    for video_a, video_b in zip(a.double(), b.double()):
        values = []
        for image_a, image_b in zip(video_a.flatten(0, 1), video_b.flatten(0, 1)):  # (H, W) per channel, frame
            height, width = image_a.shape
            for i in range(height - size + 1):
                for j in range(width - size + 1):
                    x, y = image_a[i : i + size, j : j + size], image_b[i : i + size, j : j + size]
                    mx, my = (w * x).sum(), (w * y).sum()
                    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                    cxy = (w * (x - mx) * (y - my)).sum()
                    values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        result.append(torch.stack(values).mean())
    return torch.stack(result)


def test_psnr_identical_is_inf():
    x = random_video(SHAPES[0], 0)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_psnr_matches_known_mse(shape):
    x = random_video(shape, 1)
    # a constant offset d per video gives MSE d^2 (psnr does not clamp to the data range)
    offsets = torch.tensor([0.1, 0.02])[: shape[0]].double()
    y = x + offsets.view(-1, 1, 1, 1, 1)
    expected = 10 * torch.log10(2.0**2 / offsets**2)
    torch.testing.assert_close(psnr(x, y), expected, rtol=1e-10, atol=1e-9)
    # and a random perturbation against its measured MSE, with another data range
    z = x + 0.05 * random_video(shape, 2)
    mse = ((x - z) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, z, data_range=1.0), 10 * torch.log10(1.0 / mse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_of_identical_videos_is_one(shape):
    x = random_video(shape, 3)
    torch.testing.assert_close(ssim(x, x), torch.ones(shape[0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_ssim_decreases_with_noise():
    x = random_video((1, 3, 2, 24, 24), 4).clamp(-0.5, 0.5)  # leave room for noise
    noise = random_video(x.shape, 5)
    values = [float(ssim(x, x + level * noise)) for level in (0.0, 0.01, 0.05, 0.2, 0.5)]
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("shape", SHAPES)
def test_ssim_matches_loop_reference(shape):
    a = random_video(shape, 6)
    b = (a + 0.3 * random_video(shape, 7)).clamp(-1, 1)
    # both are float64 sums of ~121 terms: agreement to 1e-6 leaves a wide margin over rounding (~1e-14)
    torch.testing.assert_close(ssim(a, b), ssim_reference(a, b), rtol=0, atol=1e-6)
    # float32 inputs are promoted to float64, so the result matches the float64 reference too
    torch.testing.assert_close(ssim(a.float(), b.float()), ssim_reference(a.float(), b.float()), rtol=0, atol=1e-6)


def test_rejects_bad_shapes():
    x = random_video((1, 3, 2, 13, 17), 8)
    with pytest.raises(ValueError):
        psnr(x, x[..., :-1])
    with pytest.raises(ValueError):
        ssim(x[0], x[0])
    with pytest.raises(ValueError):
        ssim(x[..., :10, :], x[..., :10, :])
