"""Large scoring jobs (`simplenet_fast.distributed.score_files`, `simplenet-fast score`): memory
against the number of images, and one process against several.

    python bench/bench_scale.py memory               # 1,000 / 10,000 / 100,000 images
    python bench/bench_scale.py memory --sizes 200,2000
    python bench/bench_scale.py scaling              # 1 process x 2 threads vs 2 x 1 (torchrun)
    python bench/bench_scale.py scaling --images 2000 --repeats 3

memory: small generated PNGs (40x40, written once into --folder, default a temporary folder;
    smaller sets are hard links to the first images of the largest). Each size is scored in a
    fresh interpreter (`--worker`) by `score_files` with a tiny model (two convolutions, 32 px:
    the job's own memory is what is measured, not a backbone's) after one warm-up image; the
    kernel's exact peak of resident memory (VmHWM, reset after the warm-up) gives the peak the
    job added. Flat memory means the same peak at every size, up to the input listing itself
    (~100 bytes a path, on rank 0 while it lists).
scaling: EfficientNet-Lite0 with the CLI's ELPV-chosen head at 224 px (random weights: speed
    does not depend on them) on 300x300 grey PNGs (ELPV cells are 300x300 grey), decoding
    included. The same command in one process with OMP_NUM_THREADS=2 and under `torchrun
    --nproc-per-node 2` with OMP_NUM_THREADS=1 each, alternating, --repeats times; both use
    OMP_WAIT_POLICY=PASSIVE (spinning threads distort any timing on a shared machine). Reported:
    the job's own images/s (listing to assembled CSV, model loading and interpreter start-up
    excluded) and the wall time of the whole command; the two CSVs must be identical (checked).

Output: a table; --json adds the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(**env: str) -> dict:
    """subprocess arguments that make a child import the very simplenet_fast this process finds
    (an installed build, or the one on PYTHONPATH; never the source tree by accident, which has
    no compiled extension in a fresh clone)."""
    import importlib.util
    home = Path(importlib.util.find_spec("simplenet_fast").origin).resolve().parent.parent
    return {"env": dict(os.environ, **env, PYTHONPATH=os.pathsep.join(
        [str(home), os.environ.get("PYTHONPATH", "")])), "cwd": home}


# ---------------------------------------------------------------------------------- images
def write_images(folder: Path, n: int, side: int, grey: bool = False, seed: int = 0) -> Path:
    """`n` smooth random PNGs (a 6x6 noise field upscaled), reusing those already there."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = folder / f"img{i:07d}.png"
        base = rng.integers(0, 256, (6, 6) if grey else (6, 6, 3), dtype=np.uint8)
        if not path.exists():
            Image.fromarray(base).resize((side, side), Image.BILINEAR).save(path)
    return folder


def linked_subset(source: Path, target: Path, n: int) -> Path:
    """The first `n` images of `source` as hard links in `target` (a folder per size)."""
    target.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        link = target / f"img{i:07d}.png"
        if not link.exists():
            os.link(source / f"img{i:07d}.png", link)
    return target


# ---------------------------------------------------------------------------------- memory
def worker_memory(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_memory import _model, _peak_kib, _reset_peak, _rss_kib

    from simplenet_fast.distributed import score_files

    config = argparse.Namespace(backbone="tiny", image_size=32, resize=36, pretrain=96, target=80,
                                hidden=64)
    model = _model(config)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        linked_subset(Path(args.folder), warm, 1)
        score_files(model, warm, Path(tmp) / "warm.csv", batch_size=args.batch_size)
        reset = _reset_peak()
        before_rss, before_peak = _rss_kib(), _peak_kib()
        start = time.perf_counter()
        summary = score_files(model, args.folder, Path(tmp) / "scores.csv",
                              batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        peak = _peak_kib()
        assert summary.scored == args.images, summary
        csv_mib = (Path(tmp) / "scores.csv").stat().st_size / 2**20
    return {"images": args.images, "batch_size": args.batch_size, "peak_was_reset": reset,
            "before_mib": before_rss / 1024, "peak_mib": peak / 1024,
            "peak_added_mib": (peak - max(before_peak, before_rss)) / 1024,
            "end_mib": _rss_kib() / 1024, "csv_mib": csv_mib, "seconds": seconds,
            "images_per_s": args.images / seconds}


def run_worker(extra: list[str], timeout: float = 7200) -> dict:
    command = [sys.executable, str(HERE / "bench_scale.py"), "memory", "--worker", *extra]
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **_child())
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(folder: Path, sizes: list[int], batch_size: int) -> list[dict]:
    write_images(folder / "all", max(sizes), 40)
    rows = []
    for n in sizes:
        subset = linked_subset(folder / "all", folder / f"n{n}", n)
        rows.append(run_worker(["--folder", str(subset), "--images", str(n), "--batch-size",
                                str(batch_size)]))
    return rows


# ---------------------------------------------------------------------------------- scaling
_RATE = re.compile(r"in ([0-9.]+) s \(([0-9.]+) images/s")


def scaling_run(model: Path, folder: Path, out: Path, processes: int) -> dict:
    child = _child(OMP_NUM_THREADS=str(2 // processes), OMP_WAIT_POLICY="PASSIVE")
    args = ["score", str(model), str(folder), "--csv", str(out), "--quiet", "--batch-size", "16"]
    command = ([sys.executable, "-m", "simplenet_fast", *args] if processes == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(processes), "-m", "simplenet_fast", *args])
    start = time.perf_counter()
    result = subprocess.run(command, **child, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    seconds, rate = (float(v) for v in _RATE.search(result.stdout).groups())
    return {"processes": processes, "threads": 2 // processes, "job_s": seconds,
            "images_per_s": rate, "wall_s": wall}


def scaling_table(folder: Path, images: int, repeats: int) -> dict:
    import torch

    from simplenet_fast import SimpleNet

    write_images(folder / "grey300", images, 300, grey=True)
    model = folder / "lite0.pt"
    torch.manual_seed(0)
    SimpleNet("efficientnet_lite0", weights=None).save(model)  # its declared defaults
    runs = []
    for _ in range(repeats):
        for processes in (1, 2):
            out = folder / f"scores_{processes}.csv"
            runs.append(scaling_run(model, folder / "grey300", out, processes))
        same = (folder / "scores_1.csv").read_bytes() == (folder / "scores_2.csv").read_bytes()
        if not same:
            raise RuntimeError("1 and 2 processes wrote different CSVs")
    best = {p: max(r["images_per_s"] for r in runs if r["processes"] == p) for p in (1, 2)}
    return {"images": images, "runs": runs, "identical_csv": True, "best_images_per_s": best,
            "ratio_2x1_over_1x2": best[2] / best[1],
            "load_average": os.getloadavg()}


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "scaling"])
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--folder", default=None,
                        help="where the generated images go (kept between runs); default: a "
                             "temporary folder")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_memory(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp).resolve()  # children run in the package's home
        print(f"load average before: {os.getloadavg()}", flush=True)
        if args.what == "memory":
            sizes = [int(s) for s in args.sizes.split(",")]
            rows = memory_table(folder, sizes, args.batch_size)
            print(f"{'images':>8} {'peak added MiB':>15} {'RSS before MiB':>15} "
                  f"{'CSV MiB':>8} {'images/s':>9}")
            for r in rows:
                print(f"{r['images']:>8} {r['peak_added_mib']:>15.1f} {r['before_mib']:>15.1f} "
                      f"{r['csv_mib']:>8.1f} {r['images_per_s']:>9.0f}")
            result: dict = {"memory": rows}
        else:
            result = scaling_table(folder, args.images, args.repeats)
            for r in result["runs"]:
                print(f"{r['processes']} process(es) x {r['threads']} thread(s): "
                      f"{r['images_per_s']:7.1f} images/s (job {r['job_s']:.1f} s, whole "
                      f"command {r['wall_s']:.1f} s)")
            print(f"best 2x1 / best 1x2: {result['ratio_2x1_over_1x2']:.2f}; identical CSVs: "
                  f"{result['identical_csv']}")
        print(f"load average after: {os.getloadavg()}")
        if args.json:
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
