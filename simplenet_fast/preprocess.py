"""Images in, 8-bit centre crops out (SPEC.md section 1, step 1), with pillow, numpy and torch only.

Every accepted input becomes a `uint8` crop `[image_size, image_size, 3]` (HWC, RGB). Crops stay
8-bit until they reach the model's device, where `(x / 255 - mean) / std` happens once per batch
(`SimpleNet._device_forward`): a 288 crop is 249 KB as uint8 against 995 KB as float32, and the
host-to-device copy is 4x smaller.

Accepted inputs (one image each, unless said otherwise):

- a path (`str` / `pathlib.Path`) of an image file PIL can read, or of a folder: a folder means its
  image files (`image_files`: suffixes in `IMAGE_EXTENSIONS`, hidden files skipped, not
  recursive), sorted by name;
- a `PIL.Image.Image`;
- a numpy array `HxW`, or `HxWxC` with C = 1 (grey), 3 (RGB) or 4 (RGBA), of dtype uint8 or uint16;
- a torch tensor `CxHxW` (one image) or `BxCxHxW` (B images), C = 1 or 3, either float with
  values in [0, 1] or uint8 with values in 0..255;
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

Geometry (torchvision's `Resize(resize)` then `CenterCrop(image_size)`, on which the official
code and its published numbers rely): the short side becomes `resize` and the long side
`int(resize * long / short)`, with PIL's bilinear filter (`Image.resize(..., Image.BILINEAR)`,
antialiased when shrinking); then the centre `image_size` square is cut at offset
`int(round((side - image_size) / 2))` (20 for 329 -> 288). An image whose size already matches is
not resampled (torchvision returns it as it is, and so does PIL).

- **uint8 tensors** go through exactly the same PIL path as arrays and files: same bytes, same
  scores.
- **float tensors** are resampled with `torch.nn.functional.interpolate(mode="bilinear",
  antialias=True)`, which follows PIL's filter closely but is **not bit-identical** to it (PIL
  rounds to 8 bits between its two separable passes; expect differences of about one grey level).
  The crop is then rounded to 8 bits (`round(x * 255)`), as PIL's output is: a float tensor made
  as `uint8 / 255` at a size that needs no resampling gives exactly the crop of the uint8 image.
  Float tensors are processed on their own device and the crop is moved to the CPU.

Not applied, as in the official code: EXIF orientation (use `PIL.ImageOps.exif_transpose` first if
your camera relies on it). Multi-frame files (animated GIF, APNG, multi-page TIFF) give their
first frame, as PIL decodes it.

Limits (errors, not crashes): files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`
x 2 pixels) are refused before they are decoded, and any image whose resized size (short side
`resize`, before the crop) would exceed `PIL.Image.MAX_IMAGE_PIXELS` is refused before it is
resized, e.g. a 1 x 100000 strip (329 x 32,900,000 at the paper's resize).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".gif"})

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]

_EXPECTED = ("an image path or folder, a PIL image, an HxW / HxWxC (C = 1, 3, 4) uint8 or uint16 "
             "numpy array, a CxHxW / BxCxHxW (C = 1, 3) float tensor in [0, 1] or uint8 tensor, "
             "or a list of these")
_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# ---------------------------------------------------------------------------------- geometry
def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision `Resize(int)`: the short side becomes `resize`, the long `int(resize*long/short)`."""
    if width <= height:
        return int(resize * height / width), resize
    return resize, int(resize * width / height)


def crop_offset(size: int, crop: int) -> int:
    """torchvision `CenterCrop`: `int(round((size - crop) / 2))` (Python's round, half to even)."""
    return int(round((size - crop) / 2.0))


def _check_resized(height: int, width: int, resize: int, what: str) -> tuple[int, int]:
    """`resized_size`, refusing results larger than PIL's decompression-bomb limit: the whole
    resized image is materialised before the crop, and an extreme aspect ratio (a 1 x 100000
    strip, 100 KB as a PNG) would otherwise ask for gigabytes (329 x 32,900,000 RGB)."""
    new_h, new_w = resized_size(height, width, resize)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and new_h * new_w > limit:
        raise ValueError(f"{what}: a {height}x{width} image would be resized to {new_h}x{new_w} "
                         f"(short side {resize}), over PIL.Image.MAX_IMAGE_PIXELS = {limit} "
                         "pixels; crop it to a less extreme aspect ratio first")
    return new_h, new_w


def _check_geometry(image_size: int, resize: int) -> None:
    if not isinstance(image_size, int) or not isinstance(resize, int) or image_size <= 0:
        raise ValueError(f"image_size and resize must be positive ints, got {image_size!r}, {resize!r}")
    if resize < image_size:
        raise ValueError(f"resize (short side, {resize}) must be >= image_size (crop, {image_size})")


# ---------------------------------------------------------------------------------- one image
def _to_8bit(values: np.ndarray, what: str) -> np.ndarray:
    """uint16 (or 0..65535 int32) -> uint8 by the 16-bit range: round(v / 257)."""
    if values.dtype.kind == "i":  # PIL mode "I": int32 that must hold 16-bit data
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{what}: a 32-bit integer (mode 'I') image is read as 16-bit data, "
                             f"so its values must lie in 0..65535; got {values.min()}..{values.max()}")
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
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
    array = np.ascontiguousarray(array)
    return Image.fromarray(array)  # HxW uint8 -> "L", HxWx3 -> "RGB", HxWx4 -> "RGBA"


def _pil_rgb(image: Image.Image, what: str) -> Image.Image:
    """PIL `convert("RGB")` (grayscale "L" deferred to _crop_pil), except 16-bit data, which is
    scaled to 8 bits first (module doc)."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{what}: empty image of size {image.width}x{image.height}")
    if image.mode in _16BIT_MODES or image.mode.startswith("I;16") or image.mode == "I":
        image = Image.fromarray(_to_8bit(np.asarray(image), what))
    elif image.mode == "F":
        raise ValueError(f"{what}: 32-bit float images (PIL mode 'F') have no defined range; pass a "
                         "CxHxW float tensor with values in [0, 1] or an 8/16-bit image")
    if image.mode in ("RGB", "L"):
        # Grayscale stays one channel through the resize and crop, and becomes RGB in
        # _crop_pil: the same bytes as convert("RGB") first (R = G = B = L), at a third of the
        # resize work (1.18 -> 0.43 ms per 300x300 ELPV cell).
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"{what}: cannot convert PIL mode {image.mode!r} to RGB: {error}") from error


def _crop_pil(image: Image.Image, image_size: int, resize: int, what: str = "image") -> Tensor:
    """RGB or L PIL image -> uint8 [S, S, 3]: bilinear short-side resize, centre crop (module doc)."""
    height, width = image.height, image.width
    new_h, new_w = _check_resized(height, width, resize, what)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = crop_offset(new_h, image_size), crop_offset(new_w, image_size)
    image = image.crop((left, top, left + image_size, top + image_size))
    crop = np.array(image, dtype=np.uint8, copy=True)
    if crop.ndim == 2:  # "L" (see _pil_rgb)
        crop = np.repeat(crop[:, :, None], 3, axis=2)
    return torch.from_numpy(crop)


def _open_path(path: Path, image_size: int, resize: int) -> Tensor:
    where = f"image file {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{where} is empty (0 bytes)")
    try:
        image = Image.open(path)
        try:
            image.load()  # decode now: truncated and corrupt files fail here, not later
        except BaseException:
            image.close()
            raise
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
    with image:  # our own checks below name the file themselves
        return _crop_pil(_pil_rgb(image, where), image_size, resize, where)


def _crop_float_tensor(x: Tensor, image_size: int, resize: int, what: str) -> Tensor:
    """float [1|3, H, W] in [0, 1] -> uint8 [S, S, 3] via interpolate(antialias=True) (module doc)."""
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what}: float image tensor contains NaN or Inf")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        hint = " (0..255 data? divide by 255, or pass a uint8 tensor)" if high > 1.0 else ""
        raise ValueError(f"{what}: float image tensors must hold values in [0, 1], got "
                         f"{low:.4g}..{high:.4g}{hint}")
    height, width = x.shape[-2:]
    new_h, new_w = _check_resized(height, width, resize, what)
    x = x.float()[None]
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False,
                          antialias=True)
    top, left = crop_offset(new_h, image_size), crop_offset(new_w, image_size)
    x = x[0, :, top:top + image_size, left:left + image_size]
    crop = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return crop.expand(3, -1, -1).permute(1, 2, 0).cpu().contiguous()


def _crop_tensor(x: Tensor, image_size: int, resize: int, what: str) -> Tensor:
    """One CxHxW tensor (float in [0, 1] or uint8) -> uint8 [S, S, 3]."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"{what}: an image tensor must be CxHxW or BxCxHxW with C = 1 or 3, got "
                         f"shape {list(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{what}: empty image tensor of shape {list(x.shape)}")
    if x.dtype == torch.uint8:
        array = x.detach().cpu().permute(1, 2, 0).numpy()
        return _crop_pil(_pil_rgb(_array_to_pil(array, what), what), image_size, resize, what)
    if x.is_floating_point():
        return _crop_float_tensor(x, image_size, resize, what)
    raise ValueError(f"{what}: image tensors must be float (values in [0, 1]) or uint8, got {x.dtype}")


def preprocess_image(source: ImageSource, image_size: int = 288, resize: int = 329,
                     what: str = "image") -> Tensor:
    """One image -> uint8 crop `[image_size, image_size, 3]` (module doc). `what` names it in errors."""
    _check_geometry(image_size, resize)
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), image_size, resize)
    if isinstance(source, Image.Image):
        return _crop_pil(_pil_rgb(source, what), image_size, resize, what)
    if isinstance(source, np.ndarray):
        return _crop_pil(_pil_rgb(_array_to_pil(source, what), what), image_size, resize, what)
    if isinstance(source, Tensor):
        return _crop_tensor(source, image_size, resize, what)
    raise TypeError(f"{what}: expected {_EXPECTED}; got {type(source).__name__}")


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


def iter_batches(images: Any, batch_size: int, image_size: int = 288, resize: int = 329
                 ) -> Iterator[Tensor]:
    """uint8 batches `[b, image_size, image_size, 3]`, b <= batch_size, decoding lazily per batch.

    At most `batch_size` crops are held at a time, so a list of 10,000 paths never loads at once.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_geometry(image_size, resize)
    crops: list[Tensor] = []
    for what, source in iter_sources(images):
        crops.append(preprocess_image(source, image_size, resize, what))
        if len(crops) == batch_size:
            yield torch.stack(crops)
            crops = []
    if crops:
        yield torch.stack(crops)


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


__all__ = ["preprocess_image", "iter_sources", "iter_batches", "image_files", "image_paths",
           "count_images", "normalise", "resized_size", "crop_offset", "IMAGE_EXTENSIONS"]
