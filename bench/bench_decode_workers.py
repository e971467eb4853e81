"""Scoring image files with decoding threads: `model.score(paths, workers=N)` against N = 0.

    python bench/bench_decode_workers.py [--device cuda] [--count 256] [--workers 0 2 4 8 16]

Writes `--count` files of two kinds into a temporary folder: 1024x1024 RGB JPEGs (quality 90,
camera-like) and 300x300 grey PNGs (ELPV-like), then times `score(paths, batch_size=32,
workers=N)` end to end (decode, resize, crop, upload, backbone, fused head, map) with
WideResNet-50-2 at 288 px and the paper head (random weights: speed does not depend on them),
bf16 with a CUDA graph on a GPU, float32 on the CPU. Each case: one warm-up call, then the
median of `--reps` calls; the scores of every N are checked equal to N = 0's. Prints one table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_common import wide_resnet_model  # noqa: E402


def write_files(folder: Path, count: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32) / 1024
    kinds: dict[str, list[Path]] = {"1024px RGB JPEG": [], "300px grey PNG": []}
    for i in range(count):
        smooth = 128 + 60 * np.sin(2 * np.pi * (rng.uniform(1, 4) * xx + rng.uniform(1, 4) * yy))
        rgb = np.clip(smooth[..., None] + rng.normal(0, 6, (1024, 1024, 3)), 0, 255).astype(np.uint8)
        jpeg = folder / f"photo{i:04d}.jpg"
        Image.fromarray(rgb).save(jpeg, quality=90)
        kinds["1024px RGB JPEG"].append(jpeg)
        png = folder / f"cell{i:04d}.png"
        Image.fromarray(rgb[::3, ::3, 0][:300, :300].copy()).save(png)
        kinds["300px grey PNG"].append(png)
    return kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--count", type=int, default=256, help="files of each kind")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = wide_resnet_model().to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        model.precision = "bfloat16"
    print(f"device {torch.cuda.get_device_name() if on_cuda else 'cpu'}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), precision "
          f"{model.precision}, cuda_graph {on_cuda}, {args.count} files per kind", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        kinds = write_files(Path(folder), args.count)
        print(f"files written in {time.perf_counter() - start:.0f} s", flush=True)
        for kind, paths in kinds.items():
            reference = None
            for workers in args.workers:
                def call():
                    result = model.score(paths, batch_size=32, cuda_graph=on_cuda, workers=workers)
                    if on_cuda:
                        torch.cuda.synchronize()
                    return result
                result = call()  # warm-up: graph capture, file cache
                if reference is None:
                    reference = result.pred_score
                same = torch.equal(result.pred_score, reference)
                times = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                seconds = statistics.median(times)
                rows.append((kind, workers, seconds, len(paths) / seconds, same))
                print(f"  {kind:16s} workers {workers:2d}: {seconds:7.3f} s, "
                      f"{len(paths) / seconds:8.1f} img/s, scores equal to workers 0: {same}",
                      flush=True)
    base = {kind: s for kind, w, s, _, _ in rows if w == args.workers[0]}
    print(f"\n=== score(paths, batch_size=32, workers=N), {args.count} files, median of "
          f"{args.reps} ===")
    print(f"{'files':16s} {'N':>3s} {'s':>8s} {'img/s':>8s} {'speed-up':>8s} same")
    for kind, workers, seconds, rate, same in rows:
        print(f"{kind:16s} {workers:3d} {seconds:8.3f} {rate:8.1f} {base[kind] / seconds:7.2f}x {same}")
    return 0 if all(same for *_, same in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
