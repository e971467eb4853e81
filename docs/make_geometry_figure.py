"""Draw docs/geometry.png: one rectangular image under each resize mode (SPEC 8).

    python docs/make_geometry_figure.py            # needs the "lite" extra (ImageNet Lite0)

A synthetic part (a brushed, 240 x 400 plate with holes; no real data set is shipped) gets a
scratch near its right border. For each of "crop", "whole" and "pad", an EfficientNet-Lite0
SimpleNet at 224 x 224 trains on 24 normal plates (10 epochs, seed 0) and scores the scratched one
with `map_size="input"`. Top row: the model's input. Bottom row: the whole image with its map
(jet, one colour scale for the three) in the image's own pixels; what the model never saw (the
border a crop cuts off) is left grey. Saved with a 256-colour palette to stay small.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from simplenet_fast import SimpleNet
from simplenet_fast.visualize import jet

HEIGHT, WIDTH = 240, 400
MODES = ("crop", "whole", "pad")
OUT = Path(__file__).resolve().parent / "geometry.png"


def plate(rng: np.random.Generator, scratch: bool = False) -> np.ndarray:
    """A grey plate: brushed texture, a soft light gradient, four holes; optionally a scratch."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    brushed = rng.normal(0, 1, (HEIGHT, 1)) * 6 + rng.normal(0, 3, (HEIGHT, WIDTH))
    base = 150 + 25 * (x / WIDTH) - 15 * (y / HEIGHT) + brushed + rng.normal(0, 3)
    for cy, cx in ((40, 50), (40, 350), (200, 50), (200, 350)):
        base[(y - cy) ** 2 + (x - cx) ** 2 < 14 ** 2] = 60
    if scratch:  # a thin dark diagonal scratch, 12 px from the right border
        t = np.linspace(0, 1, 200)
        rows = (90 + 70 * t).astype(int)
        cols = (WIDTH - 12 - 18 * t).astype(int)
        for dr in (-1, 0, 1):
            base[rows + dr, cols] = 70
    grey = np.clip(base, 0, 255).astype(np.uint8)
    return np.stack([grey, grey, (grey * 0.95).astype(np.uint8)], axis=-1)


def main() -> int:
    rng = np.random.default_rng(0)
    normals = [plate(rng) for _ in range(24)]
    defective = plate(rng, scratch=True)
    maps, inputs, scored = {}, {}, {}
    for mode in MODES:
        torch.manual_seed(0)
        model = SimpleNet("efficientnet_lite0", resize_mode=mode)
        model.fit(normals, epochs=10, seed=0, progress=False)
        result = model.score(defective, map_size="input")
        maps[mode] = result.anomaly_map[0].numpy()
        scored[mode] = (np.ones((HEIGHT, WIDTH), bool) if result.scored_mask is None
                        else result.scored_mask[0].numpy())
        prepared = model.prepare(defective)
        shown = prepared.input.numpy().copy()
        real_h, real_w = prepared.placement.real  # the model sees its mean colour in the padding
        mean = np.round(255 * np.asarray(model.backbone.mean)).astype(np.uint8)
        shown[real_h:], shown[:, real_w:] = mean, mean
        inputs[mode] = shown
        print(f"{mode}: image score {float(result.pred_score[0]):.3f}", file=sys.stderr)
    low = min(float(maps[m][scored[m]].min()) for m in MODES)
    high = max(float(maps[m][scored[m]].max()) for m in MODES)

    pad, label_h = 12, 22
    panel_w = WIDTH
    canvas = Image.new("RGB", (3 * panel_w + 4 * pad, 2 * label_h + 224 + HEIGHT + 3 * pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, mode in enumerate(MODES):
        left = pad + i * (panel_w + pad)
        draw.text((left, 4), f'"{mode}": the model\'s 224 x 224 input', fill=(0, 0, 0))
        canvas.paste(Image.fromarray(inputs[mode]), (left + (panel_w - 224) // 2, label_h))
        colour = jet((maps[mode] - low) / (high - low)).astype(np.float64)
        image = defective.astype(np.float64)
        blend = np.round(0.5 * image + 0.5 * colour)
        grey = image.mean(axis=2, keepdims=True) * np.ones(3)
        shown = np.where(scored[mode][..., None], blend, 0.6 * grey + 40).astype(np.uint8)
        top = label_h + 224 + pad
        draw.text((left, top), "its map on the whole image" + (
            " (grey: never seen)" if not scored[mode].all() else ""), fill=(0, 0, 0))
        canvas.paste(Image.fromarray(shown), (left, top + label_h - 4))
    canvas.quantize(256, dither=Image.Dither.NONE).save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
