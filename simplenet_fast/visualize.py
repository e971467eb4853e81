"""Pictures of where the defect is: jet-coloured anomaly maps over the image, mask contours.

Pillow and numpy only (matplotlib is not a dependency): `jet` reproduces matplotlib's "jet"
colormap byte for byte (its segment data, its 256-entry lookup table, and `bytes=True`'s
truncating conversion), so overlays look like the ones users know from anomalib and the papers.

Draw on the image the map lines up with: the original image with `score(map_size="input")` maps
(what the CLI does), or the model input `[H, W, 3]` (`SimpleNet.prepare(image).input`) with
model-size maps (see `SimpleNet.score`).
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ._io import atomic_open

__all__ = ["jet", "overlay", "save_overlay", "mask_boundary", "heatmap_range", "CONTOUR_COLOR"]

# matplotlib's _jet_data (lib/matplotlib/_cm.py): (x, y_below, y_above) per channel.
_JET_DATA = {
    "red": ((0.00, 0, 0), (0.35, 0, 0), (0.66, 1, 1), (0.89, 1, 1), (1.00, 0.5, 0.5)),
    "green": ((0.000, 0, 0), (0.125, 0, 0), (0.375, 1, 1), (0.640, 1, 1), (0.910, 0, 0),
              (1.000, 0, 0)),
    "blue": ((0.00, 0.5, 0.5), (0.11, 1, 1), (0.34, 1, 1), (0.65, 0, 0), (1.00, 0, 0)),
}
_LUT_SIZE = 256
CONTOUR_COLOR = (255, 255, 255)  # white: never produced by jet, nor by jet blended on an image


def _lookup_table(data, n: int) -> np.ndarray:
    """matplotlib.colors._create_lookup_table with gamma 1: the channel at x = i / (n - 1)."""
    adata = np.asarray(data, dtype=np.float64)
    x = adata[:, 0] * (n - 1)
    y0, y1 = adata[:, 1], adata[:, 2]
    xind = (n - 1) * np.linspace(0, 1, n)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    lut = np.concatenate([[y1[0]], distance * (y0[ind] - y1[ind - 1]) + y1[ind - 1], [y0[-1]]])
    return np.clip(lut, 0.0, 1.0)


_JET_FLOAT = np.stack([_lookup_table(_JET_DATA[c], _LUT_SIZE) for c in ("red", "green", "blue")],
                      axis=-1)                                  # [256, 3] in [0, 1]
_JET_BYTES = (_JET_FLOAT * 255).astype(np.uint8)               # matplotlib's bytes=True: truncates


def jet(values: Any) -> np.ndarray:
    """matplotlib's jet of `values` (any shape, expected in [0, 1]) as uint8 RGB `[..., 3]`.

    As matplotlib: a value v picks entry `int(v * 256)` of the 256-colour table (1.0 gives the
    last); values below 0 get the first colour, above 1 the last; NaN gives black.
    jet(0) = (0, 0, 127) dark blue, jet(0.5) = (124, 255, 121) green, jet(1) = (127, 0, 0) dark red.
    """
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    index = np.clip(np.floor(np.where(nan, 0.0, v) * _LUT_SIZE), 0, _LUT_SIZE - 1).astype(np.intp)
    out = np.take(_JET_BYTES, index, axis=0)  # a copy, even for a 0-d index (a view otherwise)
    if nan.any():
        out[nan] = 0
    return out


def mask_boundary(mask: Any, width: int = 1) -> np.ndarray:
    """Pixels of `mask` (bool [H, W]) within `width` pixels of a non-mask pixel (4-neighbour
    steps), the image border counting as outside: the contour drawn by `overlay`."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {m.shape}")
    if width < 1:
        raise ValueError(f"contour width must be >= 1, got {width}")
    inner = m
    for _ in range(width):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if isinstance(x, Image.Image):
        x = np.asarray(x.convert("RGB"))
    return np.asarray(x)


def _image_rgb(image: Any) -> np.ndarray:
    img = _as_numpy(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # CxHxW tensor -> HxWxC
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3 (or HxW, or a 3xHxW tensor), got shape {img.shape}")
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and img.min() >= 0 and img.max() <= 1:
            img = np.round(img * 255.0)
        else:
            raise ValueError(f"image must be uint8 (or float in [0, 1]), got {img.dtype}")
        img = img.astype(np.uint8)
    return img


def overlay(image: Any, anomaly_map: Any, mask: Any = None, vmin: Optional[float] = None,
            vmax: Optional[float] = None, alpha: float = 0.5,
            contour_color: Sequence[int] = CONTOUR_COLOR, contour_width: int = 1,
            side_by_side: bool = False) -> Image.Image:
    """The image with its jet-coloured anomaly map blended in and the mask's contour drawn.

    image: uint8 HxWx3 (or HxW grey; a 3xHxW tensor; a PIL image), the model's view.
    anomaly_map: HxW floats (numpy or torch), same size as the image.
    mask: optional HxW bool, e.g. `result.pred_mask[i]`; its boundary pixels (`mask_boundary`)
        are painted `contour_color`, nothing else of it is drawn.
    vmin, vmax: map values shown as the ends of the colour scale (clipped beyond); default the
        map's own min and max, which makes every map look "hot" somewhere. To compare images, pass
        the same values for all, e.g. from the calibration (see `simplenet_fast.cli`).
    alpha: weight of the colour: pixel = round((1 - alpha) * image + alpha * jet(map)).
    side_by_side: put the plain image on the left of the overlay (twice as wide), so that what
        the colour covers stays visible.
    Returns an RGB `PIL.Image` of the image's size (width doubled with `side_by_side`).
    """
    img = _image_rgb(image)
    amap = _as_numpy(anomaly_map).astype(np.float64)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly_map must be [H, W] = {list(img.shape[:2])} like the image, got "
                         f"{list(amap.shape)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    finite = amap[np.isfinite(amap)]
    low = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    high = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    scaled = (amap - low) / (high - low) if high > low else np.zeros_like(amap)
    colour = jet(scaled).astype(np.float64)
    out = np.round((1.0 - alpha) * img.astype(np.float64) + alpha * colour)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if mask is not None:
        m = _as_numpy(mask)
        if m.shape != img.shape[:2]:
            raise ValueError(f"mask must be [H, W] = {list(img.shape[:2])}, got {list(m.shape)}")
        out[mask_boundary(m, contour_width)] = np.asarray(contour_color, dtype=np.uint8)
    if side_by_side:
        out = np.concatenate([img, out], axis=1)
    return Image.fromarray(out)  # uint8 HxWx3: mode "RGB"


def save_overlay(path: str | os.PathLike, image: Any, anomaly_map: Any, mask: Any = None,
                 **kwargs) -> str:
    """`overlay(...)` written as a PNG to `path` (parent folders created); returns the path.
    The file appears complete or not at all (written under a temporary name, then renamed)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    picture = overlay(image, anomaly_map, mask, **kwargs)
    with atomic_open(path, "wb") as f:
        picture.save(f, format="PNG")
    return path


def heatmap_range(thresholds) -> Optional[tuple[float, float]]:
    """(vmin, vmax) putting the pixel threshold at the middle of the colour scale, over the width
    of the calibration maps' range (anomalib's normalisation); None without calibration data.
    `thresholds`: a `simplenet_fast.thresholds.Thresholds`."""
    t, low, high = thresholds.pixel, thresholds.pixel_min, thresholds.pixel_max
    if t is None or low is None or high is None:
        return None
    width = (high - low) if high > low else 1.0
    return t - 0.5 * width, t + 0.5 * width
