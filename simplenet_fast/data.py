"""Data readers: image folders, the MVTec AD layout, and the ELPV solar-cell protocol (SPEC 7).

- ``image_files(folder)``: sorted image paths of a folder.
- ``MVTecCategory(root)``: one MVTec AD category (``train/good``, ``test/<defect>``,
  ``ground_truth/<defect>/<name>_mask.png``); ``mvtec_categories(root)`` lists a dataset's.
- ``mask_to_model_view(mask, resize, image_size, resize_mode)``: a ground-truth mask put through
  the same geometry as the images (SPEC 1.1, 8), so it lines up pixel for pixel with the
  model-size anomaly maps. (Maps in the image's own pixels, ``score(map_size="input")``, line up
  with the masks as they are.)
- ``elpv_split(cell_type, seed)``: the ELPV train/test split of SPEC 7. The images come from the
  optional ``elpv-dataset`` package (CC BY-NC-SA 4.0: for evaluation, never shipped here).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from .geometry import RESIZE_MODES, InputGeometry, crop_offset, resized_size
from .preprocess import IMAGE_EXTENSIONS, _is_image, image_files

__all__ = [
    "IMAGE_EXTENSIONS", "image_files",
    "TestItem", "MVTecCategory", "mvtec_categories", "mask_to_model_view",
    "ElpvSplit", "elpv_split",
]

PathLike = Union[str, os.PathLike]
_NEAREST = getattr(Image, "Resampling", Image).NEAREST  # Pillow >= 9.1 spells it Resampling


# ----------------------------------------------------------------------------------------------
# Mask geometry (SPEC 1.1)


def _resized_size(height: int, width: int, resize: Union[int, Sequence[int]]) -> tuple[int, int]:
    """(H, W) after torchvision's ``Resize(resize)``: an int sets the short side and scales the
    long side as ``int(resize * long / short)``; a pair is an exact (H, W)."""
    if isinstance(resize, (int, np.integer)):
        if resize <= 0:
            raise ValueError(f"resize must be positive, got {resize}")
        return resized_size(height, width, int(resize))  # the images' own rule
    h, w = (int(v) for v in resize)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize must be positive, got {tuple(resize)}")
    return h, w


def _crop_box(height: int, width: int, crop: Union[int, Sequence[int]]
              ) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of torchvision's ``CenterCrop``: offset int(round(d / 2))
    (Python's round: 41 / 2 = 20.5 -> 20, the offset 20 of SPEC 1.1)."""
    if isinstance(crop, (int, np.integer)):
        ch, cw = int(crop), int(crop)
    else:
        ch, cw = (int(c) for c in crop)
    if ch > height or cw > width:
        raise ValueError(f"crop {ch}x{cw} is larger than the resized mask {height}x{width}")
    return crop_offset(height, ch), crop_offset(width, cw), ch, cw  # the images' own offsets


def _resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool mask resized with PIL's NEAREST filter, so that it stays binary."""
    if (height, width) == mask.shape:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255)  # 2-D uint8: mode "L"
    return np.asarray(img.resize((width, height), _NEAREST)) > 0


def mask_to_model_view(mask: Union[np.ndarray, Image.Image],
                       resize: Union[int, Sequence[int], None],
                       image_size: Union[int, Sequence[int], None],
                       resize_mode: str = "crop") -> np.ndarray:
    """A ground-truth mask in the geometry the model sees its image in (SPEC 1.1, 8).

    The mask goes where its image goes (`simplenet_fast.geometry`), resampled with PIL's NEAREST
    filter so that it stays binary; the result is a bool [H, W] array (``image_size``) that lines
    up with the model-size anomaly map:

    - ``"crop"``: scaled as the image (``resize``: the short side of the box it covers; for a
      square ``image_size``, torchvision's short-side resize) and centre-cropped with the offset
      ``int(round((h - crop) / 2))``. Either step may be skipped with None (``resize=None,
      image_size=None`` returns the mask unchanged), and ``resize`` may be an exact (H, W).
    - ``"whole"``: resized to ``image_size`` (``resize`` must be None).
    - ``"pad"``: scaled into ``image_size`` at the top-left; the padding is False.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L")) > 0
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    mask = mask != 0
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if resize_mode != "crop" or (isinstance(resize, (int, np.integer)) and image_size is not None):
        if image_size is None:
            raise ValueError(f"resize_mode {resize_mode!r} needs the model's image_size")
        placement = InputGeometry(image_size, resize_mode,
                                  None if resize is None else int(resize)).place(*mask.shape)
        resized = _resize_nearest(mask, *placement.resized)
        (top, left), (height, width) = placement.offset, placement.image_size
        out = np.zeros((height, width), dtype=bool)
        part = resized[top:top + height, left:left + width]
        out[:part.shape[0], :part.shape[1]] = part
        return out
    if resize is not None:
        mask = _resize_nearest(mask, *_resized_size(*mask.shape, resize))
    if image_size is not None:
        top, left, ch, cw = _crop_box(*mask.shape, image_size)
        mask = mask[top:top + ch, left:left + cw]
    return np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------------------------
# MVTec AD


@dataclass(frozen=True)
class TestItem:
    """One test image: ``label`` 0 (good) or 1 (defect), its defect type (the folder name) and
    its ground-truth mask file (``None`` for good images)."""

    __test__ = False  # not a pytest test class despite the name

    path: Path
    label: int
    defect_type: str
    mask_path: Optional[Path]


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} (expected the MVTec AD layout "
                                "<category>/train/good, <category>/test/<defect_type>, "
                                "<category>/ground_truth/<defect_type>)")
    return path


def _find_mask(gt_dir: Path, image: Path) -> Optional[Path]:
    """``<gt_dir>/<stem>_mask.png``, or the same stem with another image suffix."""
    exact = gt_dir / f"{image.stem}_mask.png"
    if exact.is_file():
        return exact
    if gt_dir.is_dir():
        for p in sorted(gt_dir.glob(f"{image.stem}_mask.*")):
            if _is_image(p):
                return p
    return None


class MVTecCategory:
    """One category of the MVTec AD layout, e.g. ``MVTecCategory("mvtec_ad/bottle")``::

        <root>/train/good/*.png
        <root>/test/good/*.png, <root>/test/<defect_type>/*.png
        <root>/ground_truth/<defect_type>/<name>_mask.png

    ``require_masks=True`` (the default) makes ``test_items`` raise when a defective image has no
    mask; with ``False`` such items get ``mask_path=None`` (image-level evaluation only) and
    ``load_mask`` raises for them.
    """

    def __init__(self, root: PathLike, require_masks: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"MVTec AD category folder not found: {self.root}")
        _require_dir(self.root / "train" / "good", "training folder")
        _require_dir(self.root / "test", "test folder")
        self.require_masks = require_masks

    @property
    def name(self) -> str:
        return self.root.name

    def __repr__(self) -> str:
        return f"MVTecCategory({str(self.root)!r})"

    def train_files(self) -> list[Path]:
        """Sorted paths of ``train/good``."""
        return image_files(self.root / "train" / "good")

    def defect_types(self) -> list[str]:
        """Sorted folder names under ``test`` (``good`` included)."""
        return sorted(p.name for p in (self.root / "test").iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def test_items(self) -> list[TestItem]:
        """Every test image, by defect type then file name; ``good`` images get label 0."""
        types = self.defect_types()
        if not types:
            raise FileNotFoundError(f"no defect-type folders in {self.root / 'test'}")
        items: list[TestItem] = []
        missing: list[Path] = []
        for defect in types:
            for path in image_files(self.root / "test" / defect):
                if defect == "good":
                    items.append(TestItem(path, 0, defect, None))
                    continue
                gt_dir = self.root / "ground_truth" / defect
                mask = _find_mask(gt_dir, path)
                if mask is None:
                    missing.append(gt_dir / f"{path.stem}_mask.png")
                items.append(TestItem(path, 1, defect, mask))
        if missing and self.require_masks:
            shown = ", ".join(str(p) for p in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FileNotFoundError(
                f"{len(missing)} defective test image(s) of {self.root} have no ground-truth mask: "
                f"{shown}{more} (pass require_masks=False for image-level evaluation only)")
        return items

    def load_mask(self, item: TestItem, size: Union[int, Sequence[int], None] = None,
                  crop: Union[int, Sequence[int], None] = None,
                  resize_mode: str = "crop") -> np.ndarray:
        """The ground truth of ``item`` as a bool array, True on defect pixels.

        Without geometry: at the image's own size (what ``score(map_size="input")`` maps line up
        with); good images give all False. ``size`` (crop mode's resize, or None), ``crop`` (the
        model's image_size) and ``resize_mode`` give ``mask_to_model_view(mask, size, crop,
        resize_mode)``, which lines up with the model-size anomaly map. Raises ValueError when the
        mask's size differs from its image's.
        """
        with Image.open(item.path) as img:
            width, height = img.size
        if item.label == 0:
            mask = np.zeros((height, width), dtype=bool)
        else:
            if item.mask_path is None:
                raise FileNotFoundError(f"no ground-truth mask for the defective image {item.path}")
            with Image.open(item.mask_path) as m:
                mask = np.asarray(m.convert("L")) > 0
            if mask.shape != (height, width):
                raise ValueError(f"mask {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but "
                                 f"its image {item.path} is {width}x{height}")
        if size is None and crop is None:
            return mask
        return mask_to_model_view(mask, size, crop, resize_mode)


def mvtec_categories(root: PathLike) -> list[str]:
    """Sorted names of the categories under an MVTec AD root (folders with ``train/good`` and
    ``test``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MVTec AD root folder not found: {root}")
    names = sorted(p.name for p in root.iterdir()
                   if p.is_dir() and (p / "train" / "good").is_dir() and (p / "test").is_dir())
    if not names:
        raise FileNotFoundError(f"no MVTec AD categories in {root}: expected "
                                f"{root}/<category>/train/good and {root}/<category>/test")
    return names


# ----------------------------------------------------------------------------------------------
# ELPV (SPEC 7)

ELPV_CELL_TYPES = ("mono", "poly")
ELPV_TRAIN_FRACTION = 0.7


@dataclass(frozen=True)
class ElpvSplit:
    """One ELPV split: uint8 [N, 300, 300] grayscale images, test labels 0 normal / 1 defective,
    and the rows of the dataset (``elpv_dataset.utils.load_dataset`` order) each image came from.
    """

    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_index: np.ndarray
    test_index: np.ndarray


def _load_elpv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, probabilities, types) of the whole dataset (about 240 MB, a few seconds)."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as e:
        raise ImportError("the ELPV protocol needs the elpv-dataset package: "
                          "pip install elpv-dataset (or pip install 'simplenet_fast[elpv]')") from e
    images, probs, types = load_dataset()
    images = np.asarray(images)
    images.setflags(write=False)  # shared by every split: nobody may modify the cache
    return images, np.asarray(probs, dtype=np.float64), np.asarray(types).astype(str)


_elpv_dataset = functools.lru_cache(maxsize=1)(_load_elpv)  # loaded on first use, then cached


def _elpv_indices(probs: np.ndarray, types: np.ndarray, cell_type: str, seed: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_index, test_index, test_labels) of the SPEC 7 protocol.

    Among the cells of ``cell_type``: the normal ones (p = 0), in dataset order, are permuted by
    ``np.random.default_rng(seed).permutation``; the first ``int(round(0.7 * n_normal))`` train,
    the rest test with label 0. Every cell with p >= 2/3 tests with label 1; p = 1/3 is left out.
    Both index sets are returned in dataset order (normals first in the test set).
    """
    if cell_type not in ELPV_CELL_TYPES:
        raise ValueError(f"cell_type must be 'mono' or 'poly', got {cell_type!r}")
    of_type = types == cell_type
    normal = np.flatnonzero(of_type & (probs == 0.0))
    # 2/3 is stored as 0.6666666666666666; the tolerance keeps the rule independent of that.
    defective = np.flatnonzero(of_type & (probs >= 2.0 / 3.0 - 1e-6))
    perm = np.random.default_rng(seed).permutation(normal.size)
    n_train = int(round(ELPV_TRAIN_FRACTION * normal.size))
    train = np.sort(normal[perm[:n_train]])
    test_normal = np.sort(normal[perm[n_train:]])
    test = np.concatenate([test_normal, defective])
    labels = np.concatenate([np.zeros(test_normal.size, np.int64),
                             np.ones(defective.size, np.int64)])
    return train, test, labels


def elpv_split(cell_type: str, seed: int = 0) -> ElpvSplit:
    """Train/test split of the ELPV solar-cell dataset for one cell type (SPEC 7).

    Train: a seeded 70% (``int(round(0.7 * n))``) of the cells with defect probability 0.
    Test: the other 30% of those (label 0) and every cell with probability >= 2/3 (label 1).
    Cells with probability 1/3 are left out. Sizes: mono trains on 412 cells and tests 176
    normal against 369 defective; poly trains on 644 and tests 276 against 452.

    Needs ``pip install elpv-dataset``; the dataset is loaded on first use and cached. Its images
    are CC BY-NC-SA 4.0: use them for evaluation, do not redistribute them.
    """
    images, probs, types = _elpv_dataset()
    train, test, labels = _elpv_indices(probs, types, cell_type, int(seed))
    return ElpvSplit(train_images=images[train], test_images=images[test], test_labels=labels,
                     train_index=train, test_index=test)
