"""Geometry of SPEC 8 (simplenet_fast/geometry.py): placements, maps back to image pixels,
tiling windows, padding masks, and the errors for bad settings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simplenet_fast.geometry import (InputGeometry, Tiling, default_resize, fill_unscored,
                                     mask_padded_map, mask_padding, real_pixel_mask, resized_size,
                                     zero_padding)


def random_size(generator, low=5, high=400):
    return tuple(int(v) for v in torch.randint(low, high, (2,), generator=generator))


# ---------------------------------------------------------------------------------- placements
def test_square_crop_is_torchvision_resize_and_center_crop(generator):
    """SPEC 1.1: the paper's square case is Resize(329) + CenterCrop(288), to the pixel."""
    geometry = InputGeometry(288, "crop", 329)
    for _ in range(50):
        h, w = random_size(generator, 1, 2000)
        placement = geometry.place(h, w)
        assert placement.resized == resized_size(h, w, 329)
        rh, rw = placement.resized
        assert placement.offset == (int(round((rh - 288) / 2)), int(round((rw - 288) / 2)))
        assert placement.real == placement.image_size == (288, 288)
    assert geometry.place(300, 300).offset == (20, 20)  # SPEC 1.1's offset 20


def half_up(a: int, b: int) -> int:
    """a / b rounded to the nearest int, halves up (Python's round() rounds halves to even)."""
    return math.floor(a / b + 0.5)


def test_rectangular_crop_covers_the_box_and_keeps_the_ratio(generator):
    for _ in range(50):
        size = random_size(generator, 16, 300)
        geometry = InputGeometry(size, "crop")
        assert geometry.resize == default_resize(size) == half_up(329 * min(size), 288)
        h, w = random_size(generator, 1, 3000)
        placement = geometry.place(h, w)
        rh, rw = placement.resized
        box = (half_up(size[0] * geometry.resize, min(size)),
               half_up(size[1] * geometry.resize, min(size)))
        assert rh >= box[0] and rw >= box[1]          # covers the crop's box ...
        assert rh == box[0] or rw == box[1]           # ... and no more than it must
        assert abs(rh / h - rw / w) <= 1.0 / min(h, w) + 1.0 / max(1, min(rh, rw))  # aspect kept
        top, left = placement.offset
        assert 0 <= top and top + size[0] <= rh and 0 <= left and left + size[1] <= rw
        assert abs((rh - size[0]) - 2 * top) <= 1 and abs((rw - size[1]) - 2 * left) <= 1


def test_pad_keeps_the_aspect_and_fills_one_side(generator):
    for _ in range(100):
        size = random_size(generator, 8, 300)
        h, w = random_size(generator, 1, 3000)
        placement = InputGeometry(size, "pad").place(h, w)
        rh, rw = placement.resized
        assert placement.real == (rh, rw) and placement.offset == (0, 0)
        assert rh <= size[0] and rw <= size[1] and (rh == size[0] or rw == size[1])
        scale = min(size[0] / h, size[1] / w)
        assert abs(rh - h * scale) <= 0.5 + 1e-9 or rh == 1
        assert abs(rw - w * scale) <= 0.5 + 1e-9 or rw == 1


def test_whole_fills_the_input():
    placement = InputGeometry((64, 96), "whole").place(300, 100)
    assert placement.resized == placement.real == (64, 96) and not placement.padded


def test_real_grid_counts_patches_that_touch_the_image():
    placement = InputGeometry((64, 96), "pad").place(100, 50)   # 64 x 32 of image pixels
    assert placement.real == (64, 32)
    assert placement.real_grid((8, 12)) == (8, 4)
    placement = InputGeometry((64, 96), "pad").place(100, 47)   # 30 columns: 3.75 cells
    assert placement.real_grid((8, 12)) == (8, 4)                # the straddling cell counts


# ---------------------------------------------------------------------------------- maps back
@pytest.mark.parametrize("size", [(64, 96), (57, 33)])
def test_whole_maps_back_as_bilinear_interpolation(generator, size):
    for _ in range(5):
        h, w = random_size(generator, 3, 500)
        model_map = torch.randn(*size, generator=generator)
        image_map, rows, cols = InputGeometry(size, "whole").place(h, w).to_image(model_map)
        expected = F.interpolate(model_map[None, None].double(), size=(h, w), mode="bilinear",
                                 align_corners=False)[0, 0]
        # float32 source coordinates on up to 500 px against float64 ones: SPEC 6's 1e-4
        torch.testing.assert_close(image_map.double(), expected, rtol=1e-4, atol=1e-4)
        assert bool(rows.all()) and bool(cols.all())


def test_crop_border_is_not_scored_and_holds_the_lowest_value(generator):
    geometry = InputGeometry((64, 96), "crop", 80)
    placement = geometry.place(200, 300)
    model_map = torch.rand(64, 96, generator=generator) + 1.0
    image_map, rows, cols = placement.to_image(model_map)
    filled, scored = fill_unscored(image_map, rows, cols)
    # the scored region is the crop window mapped back to the image's pixels
    (rh, rw), (top, left) = placement.resized, placement.offset
    scale_y, scale_x = 200 / rh, 300 / rw
    first_row, last_row = int(torch.nonzero(rows)[0]), int(torch.nonzero(rows)[-1])
    assert abs(first_row - top * scale_y) <= 1 and abs(last_row + 1 - (top + 64) * scale_y) <= 1
    first_col, last_col = int(torch.nonzero(cols)[0]), int(torch.nonzero(cols)[-1])
    assert abs(first_col - left * scale_x) <= 1 and abs(last_col + 1 - (left + 96) * scale_x) <= 1
    assert scored.shape == (200, 300) and not bool(scored.all())
    assert bool(torch.isfinite(filled).all())
    lowest = filled[scored].min()
    assert bool((filled[~scored] == lowest).all())
    assert float(lowest) >= 1.0  # values interpolate the model map: within its range


def test_pad_map_reads_only_the_real_part(generator):
    placement = InputGeometry((64, 96), "pad").place(100, 50)
    model_map = torch.randn(64, 96, generator=generator)
    poisoned = model_map.clone()
    poisoned[:, placement.real[1]:] = float("nan")   # the padding: never read
    image_map, rows, cols = placement.to_image(poisoned)
    assert image_map.shape == (100, 50) and bool(torch.isfinite(image_map).all())
    expected = F.interpolate(model_map[None, None, :, :32], size=(100, 50), mode="bilinear",
                             align_corners=False)[0, 0]
    # float32 rounding of the source coordinates: a CI run saw 1.3e-5 on values of order 1
    torch.testing.assert_close(image_map, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------- padding
def test_mask_padding_keeps_padding_out_of_scores_and_maps(generator):
    for _ in range(10):
        batch, rows, cols = 3, int(torch.randint(2, 9, ())), int(torch.randint(2, 9, ()))
        size = (rows * 8, cols * 8)
        scores = torch.randn(batch, rows, cols, generator=generator)
        real = torch.stack([torch.randint(1, size[0] + 1, (batch,), generator=generator),
                            torch.randint(1, size[1] + 1, (batch,), generator=generator)], 1)
        patch, nearest = mask_padding(scores, real, size)
        for b in range(batch):
            rr, rc = -(-int(real[b, 0]) // 8), -(-int(real[b, 1]) // 8)
            inside = scores[b, :rr, :rc]
            assert float(patch[b].max()) == float(inside.max())    # never raised by padding
            assert bool((patch[b, :rr, :rc] == inside).all())
            assert bool((patch[b, rr:] == inside.min()).all()) and bool((patch[b, :, rc:] == inside.min()).all())
            # nearest real patch: edge replication of the real block
            expected = inside[torch.arange(rows).clamp(max=rr - 1)][:, torch.arange(cols).clamp(max=rc - 1)]
            assert torch.equal(nearest[b], expected)
        amap = torch.randn(batch, *size, generator=generator)
        masked = mask_padded_map(amap, real)
        pixels = real_pixel_mask(real, size)
        for b in range(batch):
            assert torch.equal(masked[b][pixels[b]], amap[b][pixels[b]])
            assert bool((masked[b][~pixels[b]] == amap[b][pixels[b]].min()).all())
        x = torch.randn(batch, 3, *size, generator=generator)
        zeroed = zero_padding(x, real)
        assert bool((zeroed.permute(1, 0, 2, 3)[:, ~pixels] == 0).all())
        assert torch.equal(zeroed.permute(1, 0, 2, 3)[:, pixels], x.permute(1, 0, 2, 3)[:, pixels])


# ---------------------------------------------------------------------------------- tiling
def test_tiling_windows_cover_the_image_with_the_last_flush(generator):
    for _ in range(50):
        tile = random_size(generator, 4, 200)
        stride = tuple(int(torch.randint(1, t + 1, ())) for t in tile)
        h, w = random_size(generator, 1, 700)
        rows, cols = Tiling(tile, stride).windows(h, w)
        for (windows, side, t, s) in ((rows, h, tile[0], stride[0]), (cols, w, tile[1], stride[1])):
            covered = torch.zeros(side, dtype=torch.bool)
            for start, pixels in windows:
                covered[start:start + pixels] = True
                assert pixels == min(t, side)
            assert bool(covered.all())
            assert windows[0][0] == 0 and windows[-1][0] + windows[-1][1] == side
            starts = [start for start, _ in windows]
            assert all(0 < b - a <= s for a, b in zip(starts, starts[1:]))


def test_tiling_accepts_ints_and_pairs():
    assert Tiling.of((512, 384)).as_config() == ((512, 512), (384, 384))
    assert Tiling.of(((256, 512), (128, 384))).as_config() == ((256, 512), (128, 384))
    assert Tiling.of(None) is None


def test_window_placement_keeps_the_tile_scale():
    geometry = InputGeometry(64, "whole", tiling=(128, 96))
    assert geometry.place_window(128, 128).real == (64, 64)   # a full window: no padding
    placement = geometry.place_window(50, 128)                 # an image only 50 rows high
    assert placement.resized == (25, 64) and placement.padded  # same scale, padded below


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=0), "image_size must be positive"),
    (dict(image_size=-5), "image_size must be positive"),
    (dict(image_size=(64, 0)), "image_size must be positive"),
    (dict(image_size=(64, 64, 3)), "image_size must be an int or a"),
    (dict(image_size=64.0), "image_size must be an int or a"),
    (dict(image_size=True), "image_size must be an int or a"),
    (dict(image_size="64"), "image_size must be an int or a"),
    (dict(image_size=10_000), "at most 8192"),
    (dict(image_size=64, resize_mode="stretch"), "resize_mode must be one of"),
    (dict(image_size=64, resize_mode="whole", resize=72), "resize applies to resize_mode 'crop'"),
    (dict(image_size=(64, 96), resize_mode="crop", resize=60), r"at least the crop's short side"),
    (dict(image_size=64, resize_mode="crop", tiling=(128, 64)), "cannot be used with tiling"),
    (dict(image_size=64, resize_mode="whole", tiling=(0, 64)), "tile must be positive"),
    (dict(image_size=64, resize_mode="whole", tiling=(-8, 4)), "tile must be positive"),
    (dict(image_size=64, resize_mode="whole", tiling=(128, 0)), "stride must be positive"),
    (dict(image_size=64, resize_mode="whole", tiling=(128, 129)), "must not exceed the tile"),
    (dict(image_size=64, resize_mode="whole", tiling=((128, 64), (32, 65))), "must not exceed"),
    (dict(image_size=64, resize_mode="whole", tiling=128), "tiling must be None or"),
    (dict(image_size=64, resize_mode="whole", tiling=(128, 64, 32)), "tiling must be None or"),
    (dict(image_size=64, resize_mode="whole", tiling=(128.0, 64)), "tile must be an int"),
])
def test_bad_geometry_is_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InputGeometry(**kwargs)


def test_a_crop_thinner_than_a_pixel_still_scores_the_pixel_it_lies_in():
    """A 1 x 3000 strip in crop mode: the crop covers about half of one original column; that
    column is scored (the rule is overlap, not the pixel centre)."""
    placement = InputGeometry((40, 24), "crop").place(1, 3000)
    image_map, rows, cols = placement.to_image(torch.rand(40, 24) + 1)
    assert int(rows.sum()) == 1 and 1 <= int(cols.sum()) <= 2
    filled, scored = fill_unscored(image_map, rows, cols)
    assert bool(scored.any()) and float(filled.min()) >= 1.0
