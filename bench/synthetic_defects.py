"""Synthetic solar-cell defects for validation: no test cell is ever looked at.

The ELPV validation set of `elpv_benchmark.py --select` needs defective cells that are not test
cells. The p = 1/3 cells (left out by the protocol) are one source, but most of them look normal
(the annotators were unsure), so they separate configurations weakly. This module darkens
held-out *normal* training cells with the three defect kinds electroluminescence imaging is used
to find (cracks, regions cut off by a crack, interrupted fingers), each at a random position
(borders included, where a centre crop would hide it) and a random severity, from faint to
obvious, so that a validation AUROC has room to move.

Each defect multiplies the grey values under a soft mask by a darkening factor: EL images show
electrically inactive silicon as dark, and nothing a defect does makes a cell brighter. Its
ground-truth mask (for pixel AUROC and AUPRO) is where the soft mask is at least half on
(`MASK_LEVEL`): the defect's region, however faint its darkening.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECT_KINDS = ("crack", "dark_region", "finger_breaks")
MASK_LEVEL = 0.5  # soft-mask weight from which a pixel belongs to the defect's ground truth


def _polyline(rng: np.random.Generator, width: int, height: int) -> list[tuple[float, float]]:
    """A crack's path from anywhere on the image: 1-4 straight pieces, each turning by at most
    40 degrees (it may run off the image)."""
    point = rng.uniform(0, (width, height))
    angle = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(rng.integers(1, 5)):
        angle += np.deg2rad(rng.uniform(-40, 40))
        point = point + rng.uniform(25, 110) * np.array([np.cos(angle), np.sin(angle)])
        points.append(tuple(point))
    return points


def _mask(kind: str, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A soft [0, 255] mask of where the defect darkens the image."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "crack":
        draw.line(_polyline(rng, width, height), fill=255, width=int(rng.integers(1, 4)))
        return mask.filter(ImageFilter.GaussianBlur(0.8))
    if kind == "dark_region":
        # A crack across a corner or an edge cuts that part off: a polygon bounded by the crack
        # and the image's border, at one of its corners.
        corner = rng.integers(0, 4)
        cx, cy = [(0, 0), (width, 0), (width, height), (0, height)][corner]
        reach = rng.uniform(0.15, 0.5) * min(height, width)
        sx, sy = (1 if cx == 0 else -1), (1 if cy == 0 else -1)
        draw.polygon([(cx, cy), (cx + sx * reach * rng.uniform(0.6, 1.4), cy),
                      (cx + sx * reach * rng.uniform(0.2, 0.8), cy + sy * reach * rng.uniform(0.2, 0.8)),
                      (cx, cy + sy * reach * rng.uniform(0.6, 1.4))], fill=255)
        return mask.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 4.0)))
    if kind == "finger_breaks":
        # Interrupted fingers: short dark strokes perpendicular to the busbars (vertical here:
        # the busbars of these cells are horizontal), clustered in one area.
        x0, y0 = rng.uniform(10, (width - 10, height - 10))
        for _ in range(rng.integers(2, 7)):
            x = x0 + rng.uniform(-30, 30)
            y = y0 + rng.uniform(-20, 20)
            draw.line([(x, y), (x, y + rng.uniform(10, 45))], fill=255, width=int(rng.integers(1, 3)))
        return mask.filter(ImageFilter.GaussianBlur(0.6))
    raise ValueError(f"unknown defect kind {kind!r}; known: {DEFECT_KINDS}")


def add_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(a copy of a uint8 grey image, square or not, darkened by one defect of a random kind,
    its bool ground-truth mask)."""
    if image.ndim != 2 or min(image.shape) < 21 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image of at least 21x21, got {image.shape} {image.dtype}")
    kind = DEFECT_KINDS[rng.integers(len(DEFECT_KINDS))]
    weight = np.asarray(_mask(kind, rng, *image.shape), np.float32) / 255
    darkening = rng.uniform(0.4, 0.9)  # grey value kept under the defect: faint to obvious
    out = image.astype(np.float32) * (1 - weight * (1 - darkening))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), weight >= MASK_LEVEL


def defective_copies(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(one synthetic defect per image, their masks), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    copies, masks = zip(*(add_defect(image, rng) for image in images))
    return np.stack(copies), np.stack(masks)
