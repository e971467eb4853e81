"""This checkout's `model.score` against another checkout's, in one process, calls interleaved.

    python bench/compare_versions_cpu.py OTHER_CHECKOUT [--threads 1 2] [--calls 300]

On a shared machine two benchmark runs one after the other see different loads; interleaving
the two versions call by call in one process gives both the same load, so their ratio holds even
when the milliseconds do not. OTHER_CHECKOUT is a source tree with a built extension (e.g. `git
worktree add ../old main` and `/work/devbuild.sh ../old`); its package is imported under another
name from a temporary copy.

Model: EfficientNet-Lite0 (random weights: speed does not depend on them) with its ELPV-chosen
head 384/384/256 at 224 and 288 px, the whole 300x300 grey cell (ELPV's size) as input, batch 1;
both versions get the same weights, and their scores and maps are checked to be identical
before anything is timed. Prints min, 10th percentile and median ms per call and new / old.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import simplenet_fast

SIZES = (224, 288)
LITE0_HEAD = dict(pretrain_embed_dim=384, target_embed_dim=384, hidden=256)


def import_other(checkout: Path, folder: str):
    """The other checkout's `simplenet_fast`, imported as `simplenet_fast_other` (its imports
    are relative, so a renamed copy is a separate package)."""
    shutil.copytree(checkout / "simplenet_fast", Path(folder) / "simplenet_fast_other")
    sys.path.insert(0, folder)
    return importlib.import_module("simplenet_fast_other")


def whole_cell_model(package, size: int):
    """Lite0 scoring the whole (square) cell: "whole" where the version knows resize modes, a
    crop of the image resized to the crop's own size (the same pixels) where it does not."""
    kwargs = dict(weights=None, image_size=size, **LITE0_HEAD)
    if "resize_mode" in inspect.signature(package.SimpleNet).parameters:
        kwargs["resize_mode"] = "whole"
    else:
        kwargs["resize"] = size
    return package.SimpleNet("efficientnet_lite0", **kwargs)


def cell() -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:300, 0:300] / 300.0
    base = 120 + 60 * np.sin(2 * np.pi * (2 * x + 3 * y)) + rng.normal(0, 20, (300, 300))
    return np.clip(base, 0, 255).astype(np.uint8)


def compare(other, size: int, calls: int) -> dict:
    torch.manual_seed(0)
    old = whole_cell_model(other, size)
    new = whole_cell_model(simplenet_fast, size)
    new.load_state_dict(old.state_dict())
    image = cell()
    a, b = old.score(image, batch_size=1), new.score(image, batch_size=1)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)
    times: dict = {"old": [], "new": []}
    for _ in range(3):  # warm-up: folds, allocator, oneDNN primitives
        old.score(image, batch_size=1)
        new.score(image, batch_size=1)
    for i in range(calls):
        order = (("old", old), ("new", new)) if i % 2 else (("new", new), ("old", old))
        for name, model in order:
            start = time.perf_counter()
            model.score(image, batch_size=1)
            times[name].append(1e3 * (time.perf_counter() - start))
    stats = {}
    for name, values in times.items():
        values.sort()
        stats[name] = (values[0], values[len(values) // 10], values[len(values) // 2])
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (with its extension built)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        other = import_other(args.other.resolve(), folder)
        print(f"old: {args.other} ; new: {Path(simplenet_fast.__file__).parent.parent}")
        print(f"{'threads':>7} {'size':>4} {'old min/p10/median ms':>24} {'new min/p10/median ms':>24}"
              f" {'new/old median':>14} {'p10':>6}")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for size in SIZES:
                s = compare(other, size, args.calls)
                old, new = s["old"], s["new"]
                print(f"{threads:>7} {size:>4} {'/'.join(f'{v:.1f}' for v in old):>24} "
                      f"{'/'.join(f'{v:.1f}' for v in new):>24} {new[2] / old[2]:>14.3f} "
                      f"{new[1] / old[1]:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
