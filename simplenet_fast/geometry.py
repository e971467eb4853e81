"""Geometry (SPEC.md section 8): how an image of any size becomes the model's input, and how the
model's maps go back to the image's own pixels.

An image of `h x w` pixels becomes a model input of `image_size = (H, W)` by one of three rules
(`resize_mode`):

- ``"crop"`` (the paper's, SPEC 1.1): the image is scaled, aspect kept, to the smallest size that
  covers a box of the crop's shape whose short side is `resize`, and the centre `(H, W)` is cut
  out. For a square crop this is exactly torchvision's ``Resize(resize)`` + ``CenterCrop(H)``
  (329 and 288 in the paper: 20 px cut off each side of a square image). The border the crop cuts
  off is never seen by the model.
- ``"whole"``: the whole image is resized to `(H, W)`; the aspect ratio is not kept.
- ``"pad"``: the image is scaled by `min(H / h, W / w)` (aspect kept) and placed at the **top-left**
  corner of the input; the rest is padding. Top-left keeps the image's origin at the origin of the
  input and of the patch grid, so no offset enters the arithmetic. The padding is the backbone's
  mean colour (0 after normalisation: `SimpleNet` zeroes it on the device, see
  `zero_padding`), it is left out of training, of the image score and of the map.

A `Placement` records where one image landed; `Placement.to_image` maps a model-size map back to
the image's pixels, and `Placement.real_grid` says which patches of the backbone's grid hold image
pixels.

**Which patches are real.** A patch of the stride-s grid covers input rows `[i*H/g, (i+1)*H/g)`
(g grid rows); it is real when that cell overlaps the image part of the input, i.e. for
`i < ceil(real_rows * g / H)`; likewise for columns. A patch that straddles the image's edge is
real: a defect at the very edge must be scored, and training images padded the same way teach the
discriminator what that edge looks like. Only patches that lie wholly in the padding are dropped.

**Tiling** (`Tiling`): an image is cut, at its native resolution, into `tile` windows every
`stride` pixels, the last window of each row and column flush with the image's border. Each window
becomes one model input: resized to `image_size` as a whole (``"whole"``) or fit inside it with its
aspect kept (``"pad"``); ``"crop"`` is refused with tiling, as it would drop every window's
border. All windows of an image share one scale (`image_size / tile`), so a model trained on tiles
sees every tile at the scale it was trained at: an image smaller than the tile along an axis gets
one window there, holding the whole side, and the rest of that window is padding (not scored).
The image's map is the per-pixel mean of the windows' maps (each mapped back to the window's
pixels); the image score is the max over windows.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["RESIZE_MODES", "InputGeometry", "Placement", "Tiling", "size_pair", "default_resize",
           "mask_padding", "zero_padding", "crop_offset", "resized_size", "MAX_SIDE"]

RESIZE_MODES = ("crop", "whole", "pad")
# SPEC 1.1: the paper resizes to 329 before a 288 crop. Crop mode without an explicit `resize`
# keeps that ratio for any size: resize = round(329 * short side / 288).
PAPER_RESIZE, PAPER_CROP = 329, 288
# Bound on every side a model (and so a model file) may declare: image_size, resize, tile. Sizes
# drive allocations that no tensor in a file accounts for.
MAX_SIDE = 8192


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_pair(value: Any, name: str = "image_size", limit: int = MAX_SIDE) -> tuple[int, int]:
    """An int (a square) or a (height, width) pair of ints, each in 1..limit, as a tuple."""
    if _is_int(value):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 \
            and all(_is_int(v) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    if not all(0 < v <= limit for v in pair):
        raise ValueError(f"{name} must be positive and at most {limit}, got {value!r}")
    return pair


def _round_div(a: int, b: int) -> int:
    """round(a / b) for non-negative ints, halves up, without float error."""
    return (2 * a + b) // (2 * b)


def default_resize(image_size: tuple[int, int]) -> int:
    """The crop mode's `resize` for `image_size`: the paper's 329 / 288 ratio on the short side."""
    return _round_div(PAPER_RESIZE * min(image_size), PAPER_CROP)


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the short side becomes `resize`, the long `int(resize*long/short)`."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def crop_offset(size: int, crop: int) -> int:
    """torchvision `CenterCrop`: `int(round((size - crop) / 2))` (Python's round, half to even)."""
    return int(round((size - crop) / 2.0))


# ---------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """Where the pixels of one image (or one tiling window) land in the model input.

    original:   (h, w) image pixels this input shows.
    resized:    (rh, rw) the size those pixels are resampled to.
    offset:     (top, left) of the input within the resized image ("crop"); (0, 0) otherwise.
    real:       (nh, nw) rows and columns of the input, from the top-left, that hold image
                pixels; the rest is padding. `image_size` unless the image was padded.
    image_size: (H, W) of the model input.
    """

    original: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    real: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def padded(self) -> bool:
        return self.real != self.image_size

    def real_grid(self, grid: Sequence[int]) -> tuple[int, int]:
        """(rows, cols) of the backbone's `grid` whose cells overlap image pixels (module doc)."""
        return tuple(-(-n * g // s) for n, g, s in zip(self.real, grid, self.image_size))

    def to_image(self, model_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A model-size map `[H, W]` in this image's own pixels: `(map [h, w], scored_rows [h],
        scored_cols [w])`.

        Each image pixel samples the model map bilinearly at the point its centre lands on
        (torch's `align_corners=False` rule, edges clamped): for "whole" this is
        `F.interpolate(map, (h, w), mode="bilinear")`. Only the real part of the model map is
        read, so padding never reaches an image pixel. A pixel is scored when it overlaps the
        real part of the input (so at least one pixel per axis is, however thin a crop's share
        of a long strip); in "crop" mode the border the crop cut off is not. Unscored pixels are
        0 here (see `fill_unscored`).
        """
        rows, scored_rows = _axis_to_image(self.original[0], self.resized[0], self.offset[0],
                                           self.real[0], model_map.device, model_map.dtype)
        cols, scored_cols = _axis_to_image(self.original[1], self.resized[1], self.offset[1],
                                           self.real[1], model_map.device, model_map.dtype)
        real = model_map[..., :self.real[0], :self.real[1]]
        return torch.matmul(torch.matmul(rows, real), cols.T), scored_rows, scored_cols


@functools.lru_cache(maxsize=256)
def _axis_matrix(length: int, resized: int, offset: int, real: int) -> tuple[Tensor, Tensor]:
    """[length, real] float64 bilinear sampling matrix of one axis, and the scored pixels [length].

    Pixel y of the image spans input coordinates `[y, y + 1) * resized / length - offset` (in
    pixel widths; PIL and torch map pixels this way) and its centre lies at the middle; it is
    scored when its span overlaps [0, real]. Sampling follows torch's align_corners=False rule:
    source index u = centre - 0.5, clamped at 0; i0 = floor(u) <= real - 1, i1 = min(i0 + 1,
    real - 1).
    """
    y = torch.arange(length, dtype=torch.float64)
    scale = resized / length
    position = (y + 0.5) * scale - offset
    scored = ((y + 1) * scale - offset > 0) & (y * scale - offset < real)
    u = (position - 0.5).clamp(min=0.0)
    i0 = u.floor().to(torch.int64).clamp(max=real - 1)
    i1 = (i0 + 1).clamp(max=real - 1)
    weight1 = u - i0
    matrix = torch.zeros(length, real, dtype=torch.float64)
    index = torch.arange(length)
    matrix.index_put_((index, i0), 1.0 - weight1, accumulate=True)
    matrix.index_put_((index, i1), weight1, accumulate=True)
    matrix[~scored] = 0.0
    return matrix, scored


def _axis_to_image(length: int, resized: int, offset: int, real: int, device: torch.device,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    matrix, scored = _axis_matrix(length, resized, offset, real)
    return matrix.to(device=device, dtype=dtype), scored.to(device)


def fill_unscored(image_map: Tensor, scored_rows: Tensor, scored_cols: Tensor
                  ) -> tuple[Tensor, Optional[Tensor]]:
    """`image_map` with unscored pixels set to its lowest scored value (SPEC 8: NaN-free, the
    lowest map value), and the scored mask `[h, w]` (None when every pixel is scored)."""
    if bool(scored_rows.all()) and bool(scored_cols.all()):
        return image_map, None
    scored = scored_rows[:, None] & scored_cols[None, :]
    values = image_map[scored]
    low = values.min() if values.numel() else image_map.new_zeros(())
    return torch.where(scored, image_map, low), scored


# ---------------------------------------------------------------------------------- tiling
def _axis_windows(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """(start, pixels of the image in the window) along one axis: every `stride`, the last flush
    with the border; one window holding the whole side when the side is at most a tile."""
    if length <= tile:
        return [(0, length)]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return [(s, tile) for s in starts]


@dataclass(frozen=True)
class Tiling:
    """Native-resolution tiling (module doc): `tile` x `tile` windows every `stride` pixels.

    `Tiling.of((tile, stride))` accepts ints or (height, width) pairs for each.
    """

    tile: tuple[int, int]
    stride: tuple[int, int]

    def __post_init__(self):
        tile = size_pair(self.tile, "tiling's tile")
        stride = size_pair(self.stride, "tiling's stride")
        if any(s > t for s, t in zip(stride, tile)):
            raise ValueError(f"tiling's stride {stride} must not exceed the tile {tile}: windows "
                             "would leave gaps that no window scores")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "stride", stride)

    @classmethod
    def of(cls, value: Any) -> Optional["Tiling"]:
        """None, a `Tiling`, or `(tile, stride)` with ints or (height, width) pairs."""
        if value is None or isinstance(value, Tiling):
            return value
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
            return cls(value[0], value[1])
        raise ValueError(f"tiling must be None or (tile, stride), each an int or a (height, width) "
                         f"pair, got {value!r}")

    def as_config(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.tile, self.stride

    def windows(self, height: int, width: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Row windows and column windows (start, image pixels); the image's windows are their
        product, all holding the same number of image pixels."""
        return (_axis_windows(height, self.tile[0], self.stride[0]),
                _axis_windows(width, self.tile[1], self.stride[1]))


# ---------------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class InputGeometry:
    """How images become model inputs: `image_size` (H, W), `resize_mode`, `resize` (crop only)
    and an optional `tiling`. Validated and normalised on construction."""

    image_size: tuple[int, int]
    resize_mode: str = "crop"
    resize: Optional[int] = None
    tiling: Optional[Tiling] = None

    def __post_init__(self):
        size = size_pair(self.image_size)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        tiling = Tiling.of(self.tiling)
        resize = self.resize
        if self.resize_mode == "crop":
            if tiling is not None:
                raise ValueError("resize_mode 'crop' cannot be used with tiling: it would cut off "
                                 "every window's border; use 'whole' or 'pad'")
            resize = default_resize(size) if resize is None else resize
            if not _is_int(resize) or not min(size) <= resize <= MAX_SIDE:
                raise ValueError(f"resize (the short side of the box the image is scaled to cover "
                                 f"before the crop) must be an int in {min(size)}..{MAX_SIDE} "
                                 f"(at least the crop's short side), got {resize!r}")
        elif resize is not None:
            raise ValueError(f"resize applies to resize_mode 'crop' only (got resize={resize!r} "
                             f"with resize_mode {self.resize_mode!r})")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "tiling", tiling)

    def place(self, height: int, width: int) -> Placement:
        """The placement of a whole `height x width` image (no tiling)."""
        if self.resize_mode == "crop":
            return self._crop(height, width)
        return self._scaled(height, width, (height, width))

    def place_window(self, height: int, width: int) -> Placement:
        """The placement of a tiling window holding `height x width` image pixels (at most a
        tile; fewer where the image is smaller than a tile): the tile's scale, padding below
        and right of the image pixels."""
        return self._scaled(height, width, self.tiling.tile)

    def _scaled(self, height: int, width: int, frame: tuple[int, int]) -> Placement:
        """"whole" / "pad": `frame` (the image, or a tile) resized to image_size, or fit inside it
        with its aspect kept; the image pixels sit at its top-left."""
        (H, W), (fh, fw) = self.image_size, frame
        if self.resize_mode == "whole":
            num, den = (H, fh), (W, fw)
        elif H * fw <= W * fh:  # pad, height binds: scale H / fh on both axes
            num, den = (H, fh), (H, fh)
        else:                   # pad, width binds: scale W / fw on both axes
            num, den = (W, fw), (W, fw)
        rh = min(H, max(1, _round_div(height * num[0], num[1])))
        rw = min(W, max(1, _round_div(width * den[0], den[1])))
        return Placement((height, width), (rh, rw), (0, 0), (rh, rw), (H, W))

    def _crop(self, height: int, width: int) -> Placement:
        """"crop": cover the box (resize on the crop's short side, the crop's shape), centre cut.
        For a square crop the resized size is torchvision's `Resize(resize)` (`resized_size`)."""
        H, W = self.image_size
        short = min(H, W)
        box_h, box_w = _round_div(H * self.resize, short), _round_div(W * self.resize, short)
        if box_h * width >= box_w * height:  # the height binds (box_h / height >= box_w / width)
            rh, rw = box_h, max(box_w, int(box_h * width / height))
        else:
            rh, rw = max(box_h, int(box_w * height / width)), box_w
        return Placement((height, width), (rh, rw), (crop_offset(rh, H), crop_offset(rw, W)),
                         (H, W), (H, W))

    def config(self) -> dict:
        return {"image_size": self.image_size, "resize_mode": self.resize_mode,
                "resize": self.resize,
                "tiling": None if self.tiling is None else self.tiling.as_config()}


# ---------------------------------------------------------------------------------- padding
def _real_masks(real: Tensor, rows: int, cols: int, size: tuple[int, int]
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row counts [B], col counts [B], row mask [B, rows, 1], col mask [B, 1, cols]) of the cells
    of a rows x cols grid over an input of `size` that overlap `real` [B, 2] image pixels."""
    n_rows = (real[:, 0] * rows + size[0] - 1) // size[0]
    n_cols = (real[:, 1] * cols + size[1] - 1) // size[1]
    row_mask = torch.arange(rows, device=real.device)[None, :, None] < n_rows[:, None, None]
    col_mask = torch.arange(cols, device=real.device)[None, None, :] < n_cols[:, None, None]
    return n_rows, n_cols, row_mask, col_mask


def zero_padding(x: Tensor, real: Tensor) -> Tensor:
    """Normalised inputs `[B, C, H, W]` with the padding (outside `real` [B, 2]) set to 0."""
    _, _, rows, cols = x.shape
    _, _, row_mask, col_mask = _real_masks(real, rows, cols, (rows, cols))
    return x * (row_mask & col_mask)[:, None].to(x.dtype)


def mask_padding(scores: Tensor, real: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Keep padded patches out of every result (module doc). Pure tensor ops: CUDA graphs and
    the ONNX export run it too.

    scores: [B, g_h, g_w] raw patch scores; real: [B, 2] int64 image rows/cols of each input.
    Returns (patch scores with padded patches set to the image's lowest real patch score, so that
    no max sees them; scores for the map with each padded patch replaced by its nearest real
    patch, so that the upsampling and blur never mix padding into real pixels).
    """
    batch, rows, cols = scores.shape
    n_rows, n_cols, row_mask, col_mask = _real_masks(real, rows, cols, image_size)
    row_index = torch.minimum(torch.arange(rows, device=real.device)[None, :], n_rows[:, None] - 1)
    col_index = torch.minimum(torch.arange(cols, device=real.device)[None, :], n_cols[:, None] - 1)
    nearest = scores.gather(1, row_index[:, :, None].expand(batch, rows, cols))
    nearest = nearest.gather(2, col_index[:, None, :].expand(batch, rows, cols))
    lowest = nearest.amin(dim=(1, 2), keepdim=True)  # nearest holds exactly the real scores
    return torch.where(row_mask & col_mask, scores, lowest), nearest


def mask_padded_map(amap: Tensor, real: Tensor) -> Tensor:
    """[B, H, W] model-size maps with padded pixels set to each map's lowest real value."""
    _, rows, cols = amap.shape
    _, _, row_mask, col_mask = _real_masks(real, rows, cols, (rows, cols))
    inside = row_mask & col_mask
    lowest = torch.where(inside, amap, torch.full_like(amap, float("inf"))).amin(dim=(1, 2),
                                                                              keepdim=True)
    return torch.where(inside, amap, lowest)


def real_pixel_mask(real: Tensor, image_size: tuple[int, int]) -> Tensor:
    """[B, H, W] bool: the input pixels that hold image pixels."""
    _, _, row_mask, col_mask = _real_masks(real, image_size[0], image_size[1], image_size)
    return row_mask & col_mask
