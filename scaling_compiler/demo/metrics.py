"""Video quality against a reference video: PSNR and SSIM, per video, in plain torch.

The protocol of the sparse-attention papers: generate the same prompt from the same noise
with dense and with sparse attention and compare the two videos. Both functions take
videos in [-1, 1] shaped (B, C, F, H, W) (the sampler's output) and return one float64
value per video, shape (B,); average them yourself. Computation is float64 whatever the
inputs' dtype.

- `psnr`: 10 * log10(data_range^2 / MSE), the MSE taken over the whole video (all channels,
  frames and pixels). Identical videos give +inf.
- `ssim`: the SSIM of Wang et al. (2004) as in their reference code: an 11x11 Gaussian
  window with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over the "valid" window positions
  only (no padding), computed per frame and channel and averaged over pixels, frames and
  channels. Frames must be at least 11 x 11 pixels.

data_range defaults to 2.0, the width of [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 5:
        raise ValueError(f"expected two videos of equal shape (B, C, F, H, W), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(
    a: torch.Tensor,  # (B, C, F, H, W)
    b: torch.Tensor,  # (B, C, F, H, W)
    data_range: float = 2.0,
) -> torch.Tensor:  # (B,) float64, dB; +inf where a == b
    """Peak signal-to-noise ratio of each video of `a` against the same video of `b`."""
    _check(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """(size, size) float64 Gaussian summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: torch.Tensor,  # (B, C, F, H, W)
    b: torch.Tensor,  # (B, C, F, H, W)
    data_range: float = 2.0,
) -> torch.Tensor:  # (B,) float64 in [-1, 1]; 1 where a == b
    """Structural similarity of each video of `a` against the same video of `b`."""
    _check(a, b)
    batch, channels, frames, height, width = a.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"ssim needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {height}x{width}")
    # every (video, channel, frame) becomes one single-channel image: (B*C*F, 1, H, W)
    x = a.double().reshape(-1, 1, height, width)
    y = b.double().reshape(-1, 1, height, width)
    window = gaussian_window().to(x.device)[None, None]  # (1, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:  # local Gaussian mean, valid positions only
        return F.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(batch, -1).mean(dim=1)  # same count of positions per frame: a plain mean
