"""anomaly_map: bilinear upsample, then scipy's gaussian_filter with mode='reflect' (SPEC 1.10)."""
import numpy as np
import pytest
import torch

from conftest import DEVICES
from simplenet_fast import anomaly_map

ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is a test-only dependency")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,sigma", [((2, 40, 40), 4.0), ((1, 37, 5), 4.0), ((3, 3, 2), 4.0),
                                         ((1, 64, 48), 1.5), ((2, 9, 11), 0.5)])
def test_blur_matches_scipy_gaussian_filter(shape, sigma, device):
    """At the scores' own size the map is the blur alone. Axes shorter than the 16-pixel radius
    fold back repeatedly, exactly as scipy does."""
    maps = torch.rand(*shape, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps.numpy()])
    actual = anomaly_map(maps.to(device), shape[1:], sigma).cpu().numpy()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


def test_reflect_is_scipys_not_torchs():
    """A ramp distinguishes 'reflect' (edge repeated) from torch's 'mirror'-like pad."""
    ramp = torch.arange(20, dtype=torch.float64).reshape(1, 1, 20).expand(1, 20, 20).contiguous()
    expected = ndimage.gaussian_filter(ramp[0].numpy(), 4.0, mode="reflect")
    mirror = ndimage.gaussian_filter(ramp[0].numpy(), 4.0, mode="mirror")
    actual = anomaly_map(ramp, (20, 20), 4.0)[0].numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-12)
    assert np.abs(actual - mirror).max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_anomaly_map_upsamples_then_blurs(device):
    scores = torch.randn(2, 10, 12, dtype=torch.float64)
    size = (80, 96)
    upsampled = torch.nn.functional.interpolate(scores[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    expected = np.stack([ndimage.gaussian_filter(m, 4.0) for m in upsampled.numpy()])
    actual = anomaly_map(scores.to(device), size)
    assert actual.shape == (2, *size) and actual.device.type == device
    np.testing.assert_allclose(actual.cpu().numpy(), expected, atol=1e-12)


def test_anomaly_map_keeps_dtype_and_handles_empty_batch():
    assert anomaly_map(torch.zeros(2, 4, 4), 16).dtype == torch.float32
    assert anomaly_map(torch.zeros(0, 4, 4), (8, 9)).shape == (0, 8, 9)
    torch.testing.assert_close(anomaly_map(torch.ones(1, 3, 3), 7, sigma=0.0), torch.ones(1, 7, 7))


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(4, 4), 8), r"\[B, h, w\]"),
    ((np.zeros((1, 4, 4)), 8), r"\[B, h, w\] tensor"),
    ((torch.zeros(1, 4, 4, dtype=torch.int64), 8), "floating point"),
    ((torch.zeros(1, 4, 4), (0, 8)), "positive"),
    ((torch.zeros(1, 4, 4), (8, 8, 8)), r"\(H, W\)"),
])
def test_anomaly_map_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        anomaly_map(*args)


def test_anomaly_map_rejects_bad_sigma():
    for sigma in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            anomaly_map(torch.zeros(1, 4, 4), 8, sigma=sigma)
