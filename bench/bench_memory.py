"""Memory of `SimpleNet.score`: peak resident memory against the internal batch size, and resident
memory over many repeated calls (a leak shows as a slope).

    python bench/bench_memory.py                       # WideResNet-50-2 at 288, the paper's setting
    python bench/bench_memory.py --backbone efficientnet_lite0 --image-size 288 --resize 329
    python bench/bench_memory.py --quick               # small and fast (what the slow test runs)
    python bench/bench_memory.py --tiled               # tiling: a 4000x3000 image, Lite0, 512 tiles

Every measurement runs in a fresh interpreter (`--worker ...`) and reads the kernel's exact peak of
resident memory (VmHWM, reset after the warm-up through /proc/self/clear_refs), so that the peak
belongs to that measurement alone:

- peak:  build the model (random weights: nothing is downloaded), warm it up on one image, then
         score N images with `batch_size=b`. Reported: the peak the scoring added above the
         warmed-up process, for several b at a fixed N and for several N at a fixed b. Bounded
         memory means the first grows with b and the second stays flat (up to the results
         themselves, which hold N anomaly maps: N * S * S * 4 bytes).
- calls: score one image `--calls` times (500 by default), sampling the resident set every
         `--every` calls after a warm-up; reported: first and last sample, the largest, and the
         least-squares slope in KiB per call.
- tiled: (`--tiled`) EfficientNet-Lite0 with `tiling=(--tile, --stride)` scores one PNG file of
         H x W pixels (decode included) with `batch_size=b` windows per forward pass, for
         several sizes and b. Bounded memory means the peak grows with b and with the image only
         by what holds the whole image: the decoded pixels (3 bytes per pixel) and its map
         (4 bytes per pixel, accumulated and returned), not by the number of windows.

Output: a table, and with --json the raw numbers. Models use random weights; memory does not
depend on their values.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------- worker side
def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _peak_kib() -> int:
    """Peak resident set of this process image (VmHWM). Not ru_maxrss: Linux carries that over
    from the image before exec, i.e. from the parent that forked us (pytest: a gigabyte)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0), so that the next peak is ours."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model(args):
    import torch
    from torch import nn

    from simplenet_fast import SimpleNet

    torch.manual_seed(0)
    if args.backbone == "tiny":  # two convolutions: isolates the head, the maps and the glue
        class Tiny(nn.Module):
            channels = (16, 32)

            def __init__(self):
                super().__init__()
                self.a = nn.Conv2d(3, 16, 8, stride=8)
                self.b = nn.Conv2d(16, 32, 2, stride=2)

            def forward(self, x):
                f2 = torch.relu(self.a(x))
                return [f2, torch.relu(self.b(f2))]

        backbone = Tiny()
    else:
        backbone = args.backbone
    return SimpleNet(backbone, weights=None, image_size=args.image_size, resize_mode="crop",
                     resize=args.resize, pretrain_embed_dim=args.pretrain,
                     target_embed_dim=args.target, hidden=args.hidden)


def _images(n: int, side: int, seed: int = 0):
    import numpy as np

    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (side, side + 7, 3), dtype=np.uint8) for _ in range(n)]


def _measured_score(model, images, batch_size: int) -> tuple[object, dict]:
    """`model.score(images, batch_size)` with the peak of resident memory it adds (the model
    already warmed up) and its seconds."""
    gc.collect()
    reset = _reset_peak()
    before_rss, before_peak = _rss_kib(), _peak_kib()
    start = time.perf_counter()
    result = model.score(images, batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = _peak_kib()
    return result, {"peak_added_mib": (peak - max(before_peak, before_rss)) / 1024,
                    "peak_mib": peak / 1024, "before_mib": before_rss / 1024,
                    "peak_was_reset": reset, "seconds": seconds}


def worker_peak(args) -> dict:
    import torch

    model = _model(args)
    model.score(_images(1, args.resize), batch_size=1)  # lazy inits, the fold, the thread pool
    images = _images(args.images, args.resize, seed=1)
    result, measured = _measured_score(model, images, args.batch_size)
    assert len(result) == args.images and bool(torch.isfinite(result.pred_score).all())
    return {"batch_size": args.batch_size, "images": args.images, **measured,
            "results_mib": sum(t.numel() * t.element_size() for t in
                               (result.anomaly_map, result.patch_scores, result.pred_score)) / 2**20,
            "images_per_s": args.images / measured["seconds"]}


def worker_tiled(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from simplenet_fast import SimpleNet

    torch.manual_seed(0)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=args.image_size,
                      tiling=(args.tile, args.stride))
    height, width = args.height, args.width
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    image = (120 + 40 * np.sin(x / 37.0) * np.cos(y / 53.0)).astype(np.uint8)[..., None]
    image = np.repeat(image, 3, axis=2)
    image[::97, :, 1] = rng.integers(0, 256, (len(range(0, height, 97)), width), dtype=np.uint8)
    path = os.path.join(args.tmp, f"tiled_{height}x{width}.png")
    Image.fromarray(image).save(path, compress_level=1)
    del image, y, x
    model.score(np.zeros((args.tile, args.tile, 3), np.uint8), batch_size=1)  # lazy inits
    result, measured = _measured_score(model, path, args.batch_size)
    rows, cols = model.tiling.windows(height, width)
    assert tuple(result.anomaly_map.shape) == (1, height, width)
    assert bool(torch.isfinite(result.anomaly_map).all())
    return {"height": height, "width": width, "batch_size": args.batch_size,
            "windows": len(rows) * len(cols), **measured,
            "image_mib": height * width * 3 / 2**20, "map_mib": height * width * 4 / 2**20}


def worker_calls(args) -> dict:
    model = _model(args)
    image = _images(1, args.resize)
    samples = []
    for i in range(args.warmup + args.calls):
        model.score(image, batch_size=1)
        done = i + 1 - args.warmup
        if done >= 0 and done % args.every == 0:
            gc.collect()
            samples.append((done, _rss_kib()))
    xs = [x for x, _ in samples]
    ys = [y for _, y in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in samples)
             / max(sum((x - mean_x) ** 2 for x in xs), 1e-9))
    return {"calls": args.calls, "warmup": args.warmup, "samples_kib": samples,
            "first_mib": ys[0] / 1024, "last_mib": ys[-1] / 1024, "max_mib": max(ys) / 1024,
            "growth_mib": (ys[-1] - ys[0]) / 1024,
            # from the second sample on: the allocator settles in the first tens of calls
            "steady_growth_mib": (ys[-1] - ys[1]) / 1024 if len(ys) > 2 else 0.0,
            "slope_kib_per_call": slope}


# ---------------------------------------------------------------------------------- driver side
def _config_args(args) -> list[str]:
    return ["--backbone", args.backbone, "--image-size", str(args.image_size), "--resize",
            str(args.resize), "--pretrain", str(args.pretrain), "--target", str(args.target),
            "--hidden", str(args.hidden)]


def run_worker(kind: str, config: list[str], extra: list[str], timeout: float = 900) -> dict:
    """One measurement in a fresh interpreter; returns its JSON."""
    command = [sys.executable, os.path.join(HERE, "bench_memory.py"), "--worker", kind, *config, *extra]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_table(config: list[str], batch_sizes: list[int], images: int) -> list[dict]:
    rows = [run_worker("peak", config, ["--batch-size", str(b), "--images", str(images)])
            for b in batch_sizes]
    # Same batch size, more images: the peak must not follow N.
    b = batch_sizes[0]
    rows += [run_worker("peak", config, ["--batch-size", str(b), "--images", str(n)])
             for n in (images * 2, images * 4)]
    return rows


def tiled_table(args) -> int:
    import tempfile

    image_size = args.image_size if args.image_size != 288 else 224  # Lite0's default
    sizes = [(args.height // 2, args.width // 2), (args.height, args.width)]
    print(f"SimpleNet.score memory with tiling: efficientnet_lite0 at {image_size}, tiles "
          f"{args.tile} every {args.stride} px, one PNG per call (decode included)")
    print(f"{'image':>11} {'windows':>7} {'batch':>5} {'peak added MiB':>15} {'image MiB':>9} "
          f"{'map MiB':>8} {'s':>6}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for height, width in sizes:
            for batch in (4, 16):
                r = run_worker("tiled", [], ["--image-size", str(image_size), "--tile",
                                             str(args.tile), "--stride", str(args.stride),
                                             "--height", str(height), "--width", str(width),
                                             "--batch-size", str(batch), "--tmp", tmp])
                rows.append(r)
                print(f"{f'{height}x{width}':>11} {r['windows']:>7} {batch:>5} "
                      f"{r['peak_added_mib']:>15.1f} {r['image_mib']:>9.1f} {r['map_mib']:>8.1f} "
                      f"{r['seconds']:>6.1f}")
    if args.json:
        print(json.dumps({"tiled": rows}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["peak", "calls", "tiled"])
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--resize", type=int, default=329)
    parser.add_argument("--pretrain", type=int, default=1536)
    parser.add_argument("--target", type=int, default=1536)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--tiled", action="store_true",
                        help="the tiling table: Lite0, --tile/--stride windows of H x W images")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--stride", type=int, default=384)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--tmp", default=None, help="folder for the tiled bench's PNG files")
    parser.add_argument("--quick", action="store_true",
                        help="tiny backbone at 64 px, small head: seconds, not minutes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.image_size, args.resize = "tiny", 64, 72
        args.pretrain, args.target, args.hidden = 96, 80, 64
    if args.worker == "peak":
        print(json.dumps(worker_peak(args)))
        return 0
    if args.worker == "calls":
        print(json.dumps(worker_calls(args)))
        return 0
    if args.worker == "tiled":
        print(json.dumps(worker_tiled(args)))
        return 0
    if args.tiled:
        return tiled_table(args)

    config = _config_args(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"SimpleNet.score memory: {args.backbone} at {args.image_size} (resize {args.resize}), "
          f"head {args.pretrain}/{args.target}/{args.hidden}, torch threads from the environment")
    peaks = peak_table(config, batch_sizes, args.images)
    print(f"{'batch_size':>10} {'images':>6} {'peak added MiB':>15} {'results MiB':>12} {'images/s':>9}")
    for r in peaks:
        print(f"{r['batch_size']:>10} {r['images']:>6} {r['peak_added_mib']:>15.1f} "
              f"{r['results_mib']:>12.2f} {r['images_per_s']:>9.2f}")
    calls = run_worker("calls", config, ["--calls", str(args.calls), "--warmup", str(args.warmup),
                                         "--every", str(args.every)], timeout=3600)
    print(f"RSS over {calls['calls']} score calls (after {calls['warmup']} warm-up calls): "
          f"{calls['first_mib']:.1f} -> {calls['last_mib']:.1f} MiB (max {calls['max_mib']:.1f}), "
          f"{calls['steady_growth_mib']:.2f} MiB after call {args.every}, "
          f"slope {calls['slope_kib_per_call']:.2f} KiB/call")
    if args.json:
        print(json.dumps({"peak": peaks, "calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
