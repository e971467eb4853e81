"""Images in, 8-bit model inputs out (SPEC.md sections 1.1 and 8), with pillow, numpy and torch only.

Every accepted input is decoded once (`decode`) and becomes a `uint8` model input
`[H, W, 3]` (HWC, RGB) by the model's `InputGeometry` (`simplenet_fast.geometry`: crop, whole or
pad, and tiling), together with the `Placement` that says where the image landed. Inputs stay
8-bit until they reach the model's device, where `(x / 255 - mean) / std` happens once per batch
(`SimpleNet._device_forward`): a 288 input is 249 KB as uint8 against 995 KB as float32, and the
host-to-device copy is 4x smaller.

Accepted inputs (one image each, unless said otherwise):

- a path (`str` / `pathlib.Path`) of an image file PIL can read, or of a folder: a folder means its
  image files (`image_files`: suffixes in `IMAGE_EXTENSIONS`, hidden files skipped, not
  recursive), sorted by name;
- a `PIL.Image.Image`;
- a numpy array `HxW`, or `HxWxC` with C = 1 (grey), 3 (RGB) or 4 (RGBA), of dtype uint8 or uint16;
- a torch tensor `CxHxW` (one image) or `BxCxHxW` (B images), C = 1 or 3, either float with
  values in [0, 1] or uint8 with values in 0..255;
- a `PreparedImage` (`prepare_image`: decoded, e.g. in a worker thread, for one geometry);
- a list or tuple of any of these, or any other iterable of them (a generator, a
  `torch.utils.data.DataLoader` yielding `[B, 3, H, W]` tensors or lists of paths).

Conversion to RGB follows the official code, PIL's `convert("RGB")`: grey is replicated, alpha is
dropped (not composited: RGBA and LA keep their colour values as they are), palettes are looked up,
CMYK goes through PIL's formula. Where we deliberately differ:

- **16-bit images** (PIL modes `I;16*`, and mode `I`, which older Pillow versions use for 16-bit
  PNGs; numpy uint16 arrays). PIL's `convert` clips them to 0..255, turning most of a 16-bit image
  white. We scale by the dtype's range instead: `v8 = round(v16 / 257)` (65535 / 255 = 257), so
  0 -> 0 and 65535 -> 255. A mode-`I` image (32-bit signed in PIL) must hold values in 0..65535.
- 32-bit float images (PIL mode `F`) have no defined range and are refused; pass a float tensor
  in [0, 1] instead.

Resampling: the image is resized to its placement's `resized` size with PIL's bilinear filter
(`Image.resize(..., Image.BILINEAR)`, antialiased when shrinking), then cut ("crop": at the
placement's offset, `int(round((side - crop) / 2))`, 20 for 329 -> 288) or pasted at the top-left
of a zero canvas ("pad"; the model sets the padding to its mean colour after normalisation). In
crop mode with a square `image_size` this is torchvision's `Resize(resize)` then
`CenterCrop(image_size)`, on which the official code and its published numbers rely. An image
whose size already matches is not resampled (torchvision returns it as it is, and so does PIL).

- **uint8 tensors** go through exactly the same PIL path as arrays and files: same bytes, same
  scores.
- **float tensors** are resampled with `torch.nn.functional.interpolate(mode="bilinear",
  antialias=True)`, which follows PIL's filter closely but is **not bit-identical** to it (PIL
  rounds to 8 bits between its two separable passes; expect differences of about one grey level).
  The input is then rounded to 8 bits (`round(x * 255)`), as PIL's output is: a float tensor made
  as `uint8 / 255` at a size that needs no resampling gives exactly the input of the uint8 image.
  Float tensors are processed on their own device and the input is moved to the CPU.

Not applied, as in the official code: EXIF orientation (use `PIL.ImageOps.exif_transpose` first if
your camera relies on it). Multi-frame files (animated GIF, APNG, multi-page TIFF) give their
first frame, as PIL decodes it.

Limits (errors, not crashes): files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`
x 2 pixels) are refused before they are decoded, and in crop mode any image whose resized size
(before the crop) would exceed `PIL.Image.MAX_IMAGE_PIXELS` is refused before it is resized, e.g.
a 1 x 100000 strip (329 x 32,900,000 at the paper's resize).
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .geometry import InputGeometry, Placement, crop_offset, resized_size

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".gif"})

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor, "PreparedImage"]
# A decoded image: a PIL image in mode "RGB" or "L" (grey stays one channel until the input is
# made: the same bytes as convert("RGB") first, at a third of the resize work), or a float tensor
# [1|3, h, w] with values in [0, 1].
Decoded = Union[Image.Image, Tensor]

_EXPECTED = ("an image path or folder, a PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or uint16 "
             "numpy array, a CxHxW / BxCxHxW (C = 1, 3) float tensor in [0, 1] or uint8 tensor, "
             "a PreparedImage, or a list of these")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ---------------------------------------------------------------------------------- decoding
def _to_8bit(values: np.ndarray, what: str) -> np.ndarray:
    """uint16 (or 0..65535 int32) -> uint8 by the 16-bit range: round(v / 257)."""
    if values.dtype.kind == "i":  # PIL mode "I": int32 that must hold 16-bit data
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{what}: a 32-bit integer (mode 'I') image is read as 16-bit data, "
                             f"so its values must lie in 0..65535; got {values.min()}..{values.max()}")
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _checked_array(array: np.ndarray, what: str) -> np.ndarray:
    """A numpy image checked and made 8-bit: uint8 HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA)."""
    if array.size == 0:
        raise ValueError(f"{what}: empty array of shape {array.shape}; expected an HxW or HxWxC image")
    if array.dtype.kind not in "u" or array.dtype.itemsize not in (1, 2):
        hint = ""
        if array.dtype.kind == "f":
            hint = " (for float images pass a CxHxW torch tensor with values in [0, 1])"
        raise ValueError(f"{what}: numpy images must be uint8 or uint16, got dtype {array.dtype}{hint}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        hint = " (a CxHxW array? transpose it to HxWxC)" if array.shape[0] in (1, 3, 4) else ""
        raise ValueError(f"{what}: a numpy image must be HxW or HxWxC with C = 1, 3 or 4, got shape "
                         f"{array.shape}{hint}")
    if array.ndim not in (2, 3):
        raise ValueError(f"{what}: a numpy image must be HxW or HxWxC, got {array.ndim} dims "
                         f"{array.shape}; for several images pass a list")
    if array.dtype.itemsize == 2:
        array = _to_8bit(array, what)
    return array


def _array_to_pil(pixels: np.ndarray, what: str) -> Image.Image:
    """`_checked_array` pixels -> a PIL image in mode "RGB" or "L" (`_pil_rgb`)."""
    # HxW uint8 -> "L", HxWx3 -> "RGB", HxWx4 -> "RGBA" (converted to "RGB")
    return _pil_rgb(Image.fromarray(np.ascontiguousarray(pixels)), what)


def _pil_rgb(image: Image.Image, what: str) -> Image.Image:
    """PIL `convert("RGB")` (grayscale "L" kept: see `Decoded`), except 16-bit data, which is
    scaled to 8 bits first (module doc)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what}: empty image of size {image.width}x{image.height}")
    if image.mode in _16BIT_MODES or image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray(_to_8bit(np.asarray(image), what))
    elif image.mode == "F":
        raise ValueError(f"{what}: 32-bit float images (PIL mode 'F') have no defined range; pass a "
                         "CxHxW float tensor with values in [0, 1] or an 8/16-bit image")
    if image.mode in ("RGB", "L"):
        # Grayscale stays one channel through the resize (1.18 -> 0.43 ms per 300x300 ELPV cell).
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"{what}: cannot convert PIL mode {image.mode!r} to RGB: {error}") from error


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[str]:
    """Clear errors for a file that cannot be opened or decoded; yields its name for messages."""
    where = f"image file {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{where} is empty (0 bytes)")
    try:
        yield where
    except Image.DecompressionBombError as error:
        raise ValueError(f"{where} is refused as a possible decompression bomb ({error}); if you "
                         "trust it, raise PIL.Image.MAX_IMAGE_PIXELS") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{where} is not an image PIL can identify (corrupt, or not an image)") from error
    except (IsADirectoryError, PermissionError) as error:
        raise ValueError(f"{where} cannot be read: {error}") from error
    except MemoryError:
        raise
    except Exception as error:  # truncated data, bad headers: OSError, SyntaxError, EOFError, and
        # the ValueError / struct.error / IndexError some plugins raise on damaged headers (PPM)
        raise ValueError(f"{where} cannot be decoded (truncated or corrupt?): {error}") from error


def _open_path(path: Path) -> Image.Image:
    with _reading(path) as where:
        image = Image.open(path)
        try:
            image.load()  # decode now: truncated and corrupt files fail here, not later
        except BaseException:
            image.close()
            raise
    with image:  # our own checks below name the file themselves
        rgb = _pil_rgb(image, where)
        # the file closes on leaving the block, and with it an image that was not converted
        return rgb.copy() if rgb is image else rgb


def image_header_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file, read from its header (nothing is decoded)."""
    path = Path(path)
    with _reading(path):
        with Image.open(path) as image:
            return image.height, image.width


def _float_tensor(x: Tensor, what: str) -> Tensor:
    """A float [1|3, h, w] image tensor checked to hold finite values in [0, 1]."""
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: float image tensor contains NaN or Inf")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        hint = " (0..255 data? divide by 255, or pass a uint8 tensor)" if high > 1.0 else ""
        raise ValueError(f"{what}: float image tensors must hold values in [0, 1], got "
                         f"{low:.4g}..{high:.4g}{hint}")
    return x


def _checked_tensor(x: Tensor, what: str) -> Tensor:
    """An image tensor checked to be a non-empty CxHxW with C = 1 or 3."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{what}: an image tensor must be CxHxW or BxCxHxW with C = 1 or 3, got "
                         f"shape {list(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{what}: empty image tensor of shape {list(x.shape)}")
    return x


def _array_pixels(source: Any, what: str) -> Optional[np.ndarray]:
    """The checked 8-bit pixels (`_checked_array`) of a numpy image or of a uint8 image tensor;
    None for any other source."""
    if isinstance(source, np.ndarray):
        return _checked_array(source, what)
    if isinstance(source, Tensor) and source.dtype == torch.uint8:
        return _checked_array(_checked_tensor(source, what).detach().cpu().permute(1, 2, 0).numpy(),
                              what)
    return None


def _decode_tensor(x: Tensor, what: str) -> Decoded:
    """A tensor that is not uint8 (those are `_array_pixels`): float in [0, 1], else an error."""
    x = _checked_tensor(x, what)
    if x.is_floating_point():
        return _float_tensor(x, what)
    raise ValueError(f"{what}: image tensors must be float (values in [0, 1]) or uint8, got {x.dtype}")


def decode(source: ImageSource, what: str = "image") -> Decoded:
    """One image source -> its decoded pixels (`Decoded`), at the image's own size."""
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source))
    if isinstance(source, Image.Image):
        return _pil_rgb(source, what)
    pixels = _array_pixels(source, what)
    if pixels is not None:
        return _array_to_pil(pixels, what)
    if isinstance(source, Tensor):
        return _decode_tensor(source, what)
    raise TypeError(f"{what}: expected {_EXPECTED}; got {type(source).__name__}")


def decoded_size(image: Decoded) -> tuple[int, int]:
    """(height, width) of a decoded image."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def decoded_window(image: Decoded, top: int, left: int, height: int, width: int) -> Decoded:
    """The `height x width` part of a decoded image at (top, left)."""
    if isinstance(image, Image.Image):
        return image.crop((left, top, left + width, top + height))
    return image[:, top:top + height, left:left + width]


def decoded_rgb(image: Decoded) -> np.ndarray:
    """uint8 [h, w, 3] RGB pixels of a decoded image (a float tensor is rounded to 8 bits)."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    else:
        array = _to_uint8_hwc(image).numpy()
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------------- placing
def _check_resized(placement: Placement, what: str) -> None:
    """Refuse a resized size larger than PIL's decompression-bomb limit: the whole resized image
    is materialised before the crop, and an extreme aspect ratio (a 1 x 100000 strip, 100 KB as a
    PNG) would otherwise ask for gigabytes (329 x 32,900,000 RGB)."""
    (height, width), (new_h, new_w) = placement.original, placement.resized
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and new_h * new_w > limit:
        raise ValueError(f"{what}: a {height}x{width} image would be resized to {new_h}x{new_w} "
                         f"before the crop, over PIL.Image.MAX_IMAGE_PIXELS = {limit} pixels; crop "
                         "it to a less extreme aspect ratio first")


def _to_uint8_hwc(x: Tensor) -> Tensor:
    """float [1|3, h, w] in [0, 1] -> uint8 [h, w, 3] on the CPU: round(x * 255)."""
    out = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out.expand(3, -1, -1).permute(1, 2, 0).cpu().contiguous()


def _place_pixels(image: Decoded, placement: Placement) -> Tensor:
    """Resample to `placement.resized`; uint8 [rh, rw, 3] (PIL) or float [C, rh, rw] (tensor)."""
    new_h, new_w = placement.resized
    if isinstance(image, Image.Image):
        if (image.height, image.width) != (new_h, new_w):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        return image
    x = image.float()[None]
    if tuple(x.shape[-2:]) != (new_h, new_w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
    return x[0]


def model_input(image: Decoded, placement: Placement, what: str = "image") -> Tensor:
    """A decoded image -> uint8 model input [H, W, 3] by `placement` (module doc)."""
    _check_resized(placement, what)
    resized = _place_pixels(image, placement)
    (top, left), (height, width) = placement.offset, placement.image_size
    if isinstance(resized, Image.Image):
        if not placement.padded:
            resized = resized.crop((left, top, left + width, top + height))
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True))
        if pixels.dim() == 2:  # "L" (see Decoded)
            pixels = pixels[:, :, None].expand(-1, -1, 3)
    else:
        pixels = _to_uint8_hwc(resized[:, top:top + height, left:left + width])
    if not placement.padded:
        return pixels.contiguous()
    canvas = torch.zeros(height, width, 3, dtype=torch.uint8)
    real_h, real_w = placement.real
    canvas[:real_h, :real_w] = pixels
    return canvas


def _window_input(pixels: np.ndarray, placement: Placement) -> Tensor:
    """Model input [H, W, 3] cut from `_checked_array` pixels that need no resampling: the
    window at the placement's offset, grey replicated and alpha dropped as `convert("RGB")`."""
    (top, left), (height, width) = placement.offset, placement.image_size
    window = pixels[top:top + height, left:left + width]
    rgb = (np.broadcast_to(window[:, :, None], (*window.shape, 3)) if window.ndim == 2
           else window[:, :, :3])
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C", copy=True))  # one copy


# ---------------------------------------------------------------------------------- one image
@dataclass
class PreparedImage:
    """One image made ready for a model's `InputGeometry` (`prepare_image`).

    Without tiling: `input`, the uint8 model input [H, W, 3], and `placement`, where the image
    landed in it. With tiling: `decoded`, the decoded image that `windows()` cuts the inputs from.
    `decoded` is also kept when the image was prepared with `keep_image=True` (for drawing
    overlays on the original, `image()`).
    """

    what: str
    size: tuple[int, int]
    geometry: InputGeometry
    input: Optional[Tensor] = None
    placement: Optional[Placement] = None
    decoded: Optional[Decoded] = None

    def windows(self) -> Iterator[tuple[int, int, Tensor, Placement]]:
        """(top, left, uint8 input [H, W, 3], placement) of every tiling window, row by row."""
        row_windows, col_windows = self.geometry.tiling.windows(*self.size)
        placement = self.geometry.place_window(row_windows[0][1], col_windows[0][1])
        for top, height in row_windows:
            for left, width in col_windows:
                window = decoded_window(self.decoded, top, left, height, width)
                yield top, left, model_input(window, placement, self.what), placement

    def image(self) -> np.ndarray:
        """The original image, uint8 [h, w, 3] RGB (needs `keep_image=True` without tiling)."""
        if self.decoded is None:
            raise ValueError(f"{self.what}: the original image was not kept; prepare it with "
                             "keep_image=True")
        return decoded_rgb(self.decoded)


def prepare_image(source: ImageSource, geometry: InputGeometry, what: Optional[str] = None,
                  keep_image: bool = False) -> PreparedImage:
    """Decode one image and make it ready for `geometry` (see `PreparedImage`). Thread-safe: a
    pool of workers may prepare images while the model scores others. `what` names the image in
    errors; None: its path, for a file (every error then names the file), else "image"."""
    if what is None:
        what = str(source) if isinstance(source, (str, os.PathLike)) else "image"
    if isinstance(source, PreparedImage):
        if source.geometry != geometry:
            raise ValueError(f"{source.what} was prepared for {source.geometry}, not for this "
                             f"model's {geometry}")
        if keep_image and source.decoded is None:
            raise ValueError(f"{source.what}: the original image was not kept; prepare it with "
                             "keep_image=True")
        return source
    pixels = _array_pixels(source, what)
    if pixels is not None and geometry.tiling is None and not keep_image:
        placement = geometry.place(*pixels.shape[:2])
        if placement.resized == placement.original and not placement.padded:
            # Nothing to resample: the crop is a slice of the array (the same bytes as the PIL
            # route, without its four copies: 0.18 -> 0.07 ms per 329 px image, 2-core EPYC).
            return PreparedImage(what, placement.original, geometry,
                                 _window_input(pixels, placement), placement)
    decoded = decode(source, what) if pixels is None else _array_to_pil(pixels, what)
    size = decoded_size(decoded)
    if geometry.tiling is not None:
        return PreparedImage(what, size, geometry, decoded=decoded)
    placement = geometry.place(*size)
    return PreparedImage(what, size, geometry, model_input(decoded, placement, what), placement,
                         decoded if keep_image else None)


def preprocess_image(source: ImageSource, image_size: Any = 288, resize: Optional[int] = None,
                     what: Optional[str] = None, resize_mode: str = "crop") -> Tensor:
    """One image -> uint8 model input `[H, W, 3]` (module doc). `what` names it in errors (None:
    as `prepare_image`).

    image_size: an int or (height, width); resize: crop mode's short side before the crop (None:
    the paper's 329 / 288 ratio, 329 at 288); resize_mode: "crop", "whole" or "pad"
    (`simplenet_fast.geometry`).
    """
    geometry = InputGeometry(image_size, resize_mode, resize)
    return prepare_image(source, geometry, what).input


# ---------------------------------------------------------------------------------- many images
def _is_image_name(name: str) -> bool:
    # Hidden files are skipped: macOS "._name.png" resource forks carry an image suffix but are
    # not images.
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _is_image(path: Path) -> bool:
    return _is_image_name(path.name) and path.is_file()


def image_paths(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """`image_files` as plain strings, listed with `os.scandir`: no `stat` per file, and ~100
    bytes a path where a `Path` takes ~500, for folders of millions of images
    (`simplenet_fast.distributed`). Same order as `image_files` (by path components: each
    folder's entries sorted by name, a subfolder's images where its name sorts); links to
    folders are not followed."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"expected a folder of images, got a file: {folder}")
    files: list[str] = []

    def walk(directory: str) -> None:
        images, folders = [], []
        with os.scandir(directory) as entries:
            for entry in entries:
                if recursive and entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif _is_image_name(entry.name) and entry.is_file():
                    images.append(entry.path)
        # One parent: sorting the paths sorts the names, with no per-path key held meanwhile.
        images.sort()
        folders.sort()
        i = 0
        for sub in folders:  # a subfolder's images go where its name sorts among the files
            while i < len(images) and images[i] < sub:
                files.append(images[i])
                i += 1
            walk(sub)
        files.extend(images[i:])

    walk(str(folder))
    if not files:
        where = "in or below" if recursive else "in"
        kinds = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"no image files ({kinds}) {where} {folder}")
    return files


def image_files(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted paths of the image files (suffixes in ``IMAGE_EXTENSIONS``, any letter case) in
    ``folder``, or below it with ``recursive=True``. Hidden files are skipped.

    Raises ``FileNotFoundError`` if the folder does not exist or holds no image, and
    ``NotADirectoryError`` if it is a file.
    """
    return [Path(p) for p in image_paths(folder, recursive)]


def iter_sources(images: Any, what: str = "images") -> Iterator[tuple[str, ImageSource]]:
    """Flatten `images` lazily into (name for errors, one-image source) pairs.

    Folders expand to their files, BxCxHxW tensors to their B images, lists and other iterables
    to their items; nothing is decoded here. Raises ValueError when `images` holds no image.
    """
    count = 0
    for item in _walk(images, what, top=True):
        count += 1
        yield item
    if count == 0:
        raise ValueError(f"{what}: no images given (expected {_EXPECTED})")


def _walk(images: Any, what: str, top: bool = False) -> Iterator[tuple[str, ImageSource]]:
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            for file in image_files(path):
                yield str(file), file
        else:
            yield str(path), path
    elif isinstance(images, (Image.Image, np.ndarray)):
        yield what, images
    elif isinstance(images, PreparedImage):
        yield images.what, images
    elif isinstance(images, Tensor):
        if images.dim() == 4:
            for i in range(images.shape[0]):
                yield f"{what}[{i}]", images[i]
        else:
            yield what, images
    elif isinstance(images, (list, tuple)):
        if top and len(images) == 0:
            raise ValueError(f"{what}: empty list; expected at least one image")
        for i, item in enumerate(images):
            yield from _walk(item, f"{what}[{i}]")
    elif isinstance(images, Iterable) and not isinstance(images, (bytes, dict)):
        for i, item in enumerate(images):
            yield from _walk(item, f"{what}[batch {i}]")
    else:
        raise TypeError(f"{what}: expected {_EXPECTED}; got {type(images).__name__}")


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` consecutive items (the last may be shorter), drawn lazily."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_Item, _Result = TypeVar("_Item"), TypeVar("_Result")


def _check_workers(workers: Any) -> int:
    """`workers` checked: an int >= 0 (decoding threads; 0: the calling thread)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0: decode in the calling thread), got "
                         f"{workers!r}")
    return workers


def prefetched(fn: Callable[[_Item], _Result], items: Iterable[_Item], workers: int, ahead: int
               ) -> Iterator[_Result]:
    """`fn(item)` for every item, in order. `workers` 0: lazily, in the calling thread. Else
    `workers` threads compute up to `ahead` results beyond the one being consumed (PIL releases
    the GIL while it decodes and resizes, so decoding runs in parallel, and beside the model).

    `items` is drawn in the calling thread (a generator or a DataLoader need not be thread-safe),
    and every exception, `fn`'s or the iteration's, comes out where its item would have; nothing
    is drawn after it. Leaving early cancels what has not started.
    """
    if workers == 0:
        yield from map(fn, items)
        return
    iterator = iter(items)
    pending: deque[Future] = deque()
    exhausted = False  # no more items, or the iteration failed

    def draw() -> None:
        nonlocal exhausted
        try:
            item = next(iterator)
        except StopIteration:
            exhausted = True
            return
        except Exception as error:  # raised in order, when the consumer reaches it
            future: Future = Future()
            future.set_exception(error)
            pending.append(future)
            exhausted = True
            return
        pending.append(pool.submit(fn, item))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simplenet_fast-decode")
    try:
        while not exhausted and len(pending) <= ahead:
            draw()
        while pending:
            result = pending.popleft().result()
            if not exhausted:
                draw()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_prepared(images: Any, geometry: InputGeometry, keep_image: bool = False,
                  workers: int = 0, ahead: int = 0) -> Iterator[PreparedImage]:
    """`prepare_image` of every image of `images`, lazily: one image decoded at a time, or, with
    `workers` > 0, by that many threads up to `ahead` images (at least `workers`) ahead of the
    one being consumed (`prefetched`)."""
    workers = _check_workers(workers)
    return prefetched(lambda pair: prepare_image(pair[1], geometry, pair[0], keep_image),
                      iter_sources(images), workers, max(ahead, workers))


def iter_batches(images: Any, batch_size: int, image_size: Any = 288, resize: Optional[int] = None,
                 resize_mode: str = "crop") -> Iterator[Tensor]:
    """uint8 batches `[b, H, W, 3]`, b <= batch_size, decoding lazily per batch (no tiling).

    At most `batch_size` inputs are held at a time, so a list of 10,000 paths never loads at once.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    geometry = InputGeometry(image_size, resize_mode, resize)
    inputs: list[Tensor] = []
    for prepared in iter_prepared(images, geometry):
        inputs.append(prepared.input)
        if len(inputs) == batch_size:
            yield torch.stack(inputs)
            inputs = []
    if inputs:
        yield torch.stack(inputs)


def count_images(images: Any) -> int | None:
    """How many images `images` holds when that is known without decoding or consuming anything
    (single images, 4-D tensors, lists of them); None for folders, nested lists and iterables."""
    count = 0
    for item in images if isinstance(images, (list, tuple)) else [images]:
        if isinstance(item, Tensor) and item.dim() == 4:
            count += item.shape[0]
        elif isinstance(item, (Image.Image, np.ndarray, Tensor)) or (
                isinstance(item, (str, os.PathLike)) and not os.path.isdir(item)):
            count += 1
        else:
            return None
    return count


def normalise(batch: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 `[B, H, W, 3]` -> float `[B, 3, H, W]`: `(x / 255 - mean) / std`, on the batch's device.

    The result is a permuted view's arithmetic, so it comes out in channels-last strides; callers
    that want NCHW call `.contiguous()`. `mean`, `std`: float tensors broadcastable to [1, 3, 1, 1].
    """
    x = batch.permute(0, 3, 1, 2).to(mean.dtype)
    return (x / 255.0 - mean) / std


__all__ = ["preprocess_image", "prepare_image", "PreparedImage", "decode", "model_input",
           "image_header_size", "iter_sources", "iter_prepared", "iter_batches", "batched",
           "prefetched",
           "count_images", "image_files", "image_paths", "normalise", "resized_size",
           "crop_offset", "IMAGE_EXTENSIONS"]
