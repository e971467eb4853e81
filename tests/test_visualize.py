"""Overlays: matplotlib's jet in numpy, alpha blending, mask contours, PNG files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from simplenet_fast.visualize import CONTOUR_COLOR, jet, mask_boundary, overlay, save_overlay

# matplotlib.cm.jet(x) for a few x, copied from matplotlib 3.x (float RGB).
MATPLOTLIB_JET = {
    0.0: (0.0, 0.0, 0.5),
    0.25: (0.0, 0.5039215686274509, 1.0),
    0.5: (0.4901960784313725, 1.0, 0.4775458570524984),
    0.75: (1.0, 0.5816993464052289, 0.0),
    1.0: (0.5, 0.0, 0.0),
}


def test_jet_ends_are_dark_blue_and_dark_red():
    assert tuple(jet(0.0)) == (0, 0, 127)
    assert tuple(jet(1.0)) == (127, 0, 0)


@pytest.mark.parametrize("x", sorted(MATPLOTLIB_JET))
def test_jet_matches_matplotlib_bytes(x):
    # matplotlib's bytes=True truncates 255 * the float table.
    expected = tuple(int(255 * c) for c in MATPLOTLIB_JET[x])
    assert tuple(jet(x)) == expected


def test_jet_shape_clipping_and_nan():
    values = np.array([[-3.0, 0.0], [1.0, 7.0]])
    out = jet(values)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], jet(0.0))
    np.testing.assert_array_equal(out[1, 1], jet(1.0))
    np.testing.assert_array_equal(jet(np.nan), [0, 0, 0])
    # 256 bins as matplotlib: values in the same bin share a colour, the next bin differs.
    np.testing.assert_array_equal(jet(0.5), jet(0.5 + 0.9 / 256))
    assert not np.array_equal(jet(0.30), jet(0.30 + 1.0 / 256))


def test_jet_never_gives_the_contour_colour():
    table = jet(np.linspace(0, 1, 1024))
    assert not (table == np.array(CONTOUR_COLOR)).all(axis=-1).any()


def test_mask_boundary_is_the_ring_of_a_square():
    mask = np.zeros((10, 10), bool)
    mask[3:7, 2:8] = True  # 4 x 6
    ring = mask_boundary(mask)
    assert ring.sum() == 2 * 6 + 2 * 2
    assert ring[3, 2] and ring[6, 7] and ring[3, 5]
    assert not ring[4, 4] and not ring[5, 6]   # interior
    assert not ring[2, 2] and not ring[0, 0]   # outside
    wide = mask_boundary(mask, width=2)
    assert wide.sum() == mask.sum() and wide[4, 4]  # 4 rows: every pixel is within 2 steps
    full = mask_boundary(np.ones((5, 5), bool))
    assert full.sum() == 16 and not full[2, 2]  # the image border counts as outside


def test_overlay_blends_and_draws_the_contour():
    image = np.full((20, 30, 3), 100, np.uint8)
    image[..., 1] = 40
    amap = np.zeros((20, 30), np.float32)
    amap[10, 15] = 2.0          # vmax: jet(1) = (127, 0, 0)
    amap[0, 0] = -1.0           # below vmin: clipped to jet(0) = (0, 0, 127)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 5:25] = True
    out = np.asarray(overlay(image, amap, mask=mask, vmin=0.0, vmax=2.0, alpha=0.25))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    # 0.75 * image + 0.25 * jet, rounded.
    assert tuple(out[10, 15]) == (round(75 + 0.25 * 127), 30, 75)
    assert tuple(out[0, 0]) == (75, 30, round(75 + 0.25 * 127))
    # A map value of 0 is jet(0); a mask interior pixel is only blended, not painted.
    assert tuple(out[7, 10]) == (75, 30, round(75 + 0.25 * 127))
    assert tuple(out[5, 10]) == CONTOUR_COLOR      # top edge of the mask
    assert tuple(out[14, 24]) == CONTOUR_COLOR     # corner
    assert tuple(out[4, 10]) != CONTOUR_COLOR      # just outside


def test_overlay_alpha_ends_and_default_scale():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    amap = rng.random((8, 8))
    np.testing.assert_array_equal(np.asarray(overlay(image, amap, alpha=0.0)), image)
    colour = np.asarray(overlay(image, amap, alpha=1.0))
    # Default vmin / vmax: the map's own range.
    np.testing.assert_array_equal(colour, jet((amap - amap.min()) / (amap.max() - amap.min())))
    # A constant map is drawn at the bottom of the scale, not as NaN.
    flat = np.asarray(overlay(image, np.ones((8, 8)), alpha=1.0))
    assert (flat == jet(0.0)).all()


def test_side_by_side_puts_the_plain_image_left():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    amap = rng.random((5, 7))
    both = np.asarray(overlay(image, amap, side_by_side=True))
    assert both.shape == (5, 14, 3)
    np.testing.assert_array_equal(both[:, :7], image)
    np.testing.assert_array_equal(both[:, 7:], np.asarray(overlay(image, amap)))


def test_overlay_accepts_tensors_grey_and_float_images():
    grey = torch.full((6, 6), 50, dtype=torch.uint8)
    out = np.asarray(overlay(grey, torch.zeros(6, 6), alpha=0.5, vmin=0, vmax=1))
    assert tuple(out[0, 0]) == (25, 25, round(25 + 63.5))
    chw = torch.full((3, 6, 6), 0.5)
    out2 = np.asarray(overlay(chw, np.zeros((6, 6)), alpha=0.0))
    assert (out2 == 128).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"anomaly_map": np.zeros((5, 5))}, "anomaly_map must be"),
    ({"mask": np.zeros((3, 3), bool)}, "mask must be"),
    ({"alpha": 1.5}, "alpha"),
    ({"image": np.zeros((6, 6, 3), np.int32)}, "uint8"),
])
def test_overlay_rejects_bad_inputs(kwargs, message):
    args = {"image": np.zeros((6, 6, 3), np.uint8), "anomaly_map": np.zeros((6, 6))}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        overlay(**args)


def test_save_overlay_writes_the_same_pixels_as_png(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    amap = rng.random((12, 16))
    mask = amap > 0.7
    path = save_overlay(tmp_path / "sub" / "o.png", image, amap, mask=mask, alpha=0.4)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (16, 12) and img.mode == "RGB"
        written = np.asarray(img)
    np.testing.assert_array_equal(written, np.asarray(overlay(image, amap, mask, alpha=0.4)))


def test_jet_of_nan_does_not_change_later_colours():
    jet(np.nan)
    jet(np.array(np.nan))
    assert tuple(jet(0.0)) == (0, 0, 127)
