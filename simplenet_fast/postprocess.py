"""Patch scores to anomaly maps (SPEC.md section 1, step 10), on the scores' device."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: radius = int(4 * sigma + 0.5)


# Constants are cached per device: a host-to-device copy cannot happen inside CUDA graph capture,
# so the first (eager) call fills the cache and captured calls only read it.
@functools.lru_cache(maxsize=64)
def _gaussian_taps(sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """scipy's 1-D Gaussian kernel, normalised in float64 (33 taps for sigma 4)."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=256)
def _reflect_index(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices of scipy mode='reflect' padding (dcba|abcd|dcba): the edge sample repeats.

    torch's pad(mode='reflect') is scipy's 'mirror' (dcb|abcd|cba), so it cannot be used (SPEC
    1.10). The period-2n fold also covers radii longer than the axis.
    """
    i = torch.arange(-radius, length + radius) % (2 * length)
    return torch.where(i >= length, 2 * length - 1 - i, i).to(device)


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """Separable Gaussian blur of [B, H, W] with scipy's 'reflect' boundary, truncate 4."""
    if sigma <= 0:
        return maps
    taps = _gaussian_taps(float(sigma), maps.device, maps.dtype)
    radius = taps.numel() // 2
    b, h, w = maps.shape
    out = maps
    for axis, length in ((1, h), (2, w)):
        index = _reflect_index(length, radius, maps.device)
        padded = out.index_select(axis, index)
        # Move the blurred axis last and convolve every line with the same 1-D kernel.
        lines = padded.movedim(axis, -1)
        shape = lines.shape
        blurred = F.conv1d(lines.reshape(-1, 1, shape[-1]), taps.view(1, 1, -1))
        out = blurred.reshape(*shape[:-1], length).movedim(-1, axis)
    return out


def anomaly_map(patch_scores: Tensor, size: tuple[int, int] | int, sigma: float = 4.0) -> Tensor:
    """[B, h, w] patch scores -> [B, H, W] map: bilinear upsample (align_corners=False), then blur.

    The blur follows scipy.ndimage.gaussian_filter(sigma, truncate=4, mode='reflect'), as the
    official code does on the CPU; here it runs on the scores' device.
    """
    if not isinstance(patch_scores, Tensor) or patch_scores.dim() != 3:
        raise ValueError(f"patch_scores must be a [B, h, w] tensor, got "
                         f"{list(patch_scores.shape) if isinstance(patch_scores, Tensor) else type(patch_scores).__name__}")
    if not patch_scores.is_floating_point():
        raise ValueError(f"patch_scores must be floating point, got {patch_scores.dtype}")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if sigma > max(size):
        # Bounded so that a huge sigma cannot allocate 8*sigma+1 taps and stall for minutes.
        raise ValueError(f"sigma must be <= the map's longer side ({max(size)}), got {sigma}: a "
                         "wider blur only flattens the map")
    if patch_scores.shape[0] == 0:
        return patch_scores.new_empty(0, *size)
    upsampled = F.interpolate(patch_scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return gaussian_blur(upsampled, sigma)
