"""End-to-end GPU timing of SimpleNet on WideResNet-50-2 at 288 x 288 (paper head 1536/1536/1024),
batch 1 and 32, float32 and bfloat16. A plain script, so that one call on a lent GPU runs it whole:

    python bench/bench_gpu_e2e.py [--out results.json] [--reps 10] [--device cuda]
    python bench/bench_gpu_e2e.py --device cpu --smoke      (tiny sizes: this script's own logic)

Timed (median wall ms per call, each call ends with torch.cuda.synchronize()):
  fused      `model.score(images, batch_size=B, fused=True)`, eager and `cuda_graph=True`;
             `images` is a list of B pre-decoded 329x329x3 uint8 arrays, so the time covers the
             centre crop (PIL), pinning, the upload, normalise, backbone, fused head, image
             score and anomaly map (upsample + blur, on the GPU).
  reference  the same with `fused=False` (the pure-PyTorch reference head).
  official   the paper code's inference, dead work included (e2e_common.official_style), float32
             eager. Batch 1 and 8 only (at 32 the upsampled features alone are 16 GB); "vs
             official" compares images/s with the official row of the same batch, or of its
             largest batch.
  device     `model._device_forward` on a uint8 batch already on the GPU (no crop, pin or upload),
             fused, eager (check=False) and replayed from a CUDA graph: device compute alone.
  host       the host side alone: the B images made into model inputs and stacked into pinned
             memory, as `score` does before the upload. fused ~ host + device + the launches and
             result assembly around them; a cProfile of the batch-1 target case follows the table.
TF32 is off (float32 means float32, SPEC 6; PyTorch's default lets cuDNN convolutions use TF32).
Peak GPU memory is torch.cuda.max_memory_allocated() over the timed calls (after a reset).

Checked before timing, on the same 32 images: fused against reference pred_score (SPEC 6: relative
L2 within 1e-4 float32, 2e-2 bf16) and anomaly map, graph against eager (same tolerance), the official-style baseline
against the reference (float32, 1e-4), and the image-score
ranking (exact, and among pairs whose reference scores differ by more than the tolerance). A failed
check exits with status 2 after everything is timed; 0 otherwise (1: no GPU / crash).
Targets (bf16, CUDA graph, fused, end to end): >= 2,000 images/s at batch 32, <= 2 ms at batch 1.
The results are written to --out, and printed as one `RESULTS_JSON:` line before the final table.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simplenet_fast  # noqa: E402
from e2e_common import (make_images, official_style, ranking_check, relative_error,  # noqa: E402
                        wide_resnet_model)
from simplenet_fast import SimpleNet  # noqa: E402
from simplenet_fast.model import _stage_inputs  # noqa: E402
from simplenet_fast.preprocess import iter_batches, iter_prepared  # noqa: E402

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
TARGET_B32_IMG_S = 2000.0
TARGET_B1_MS = 2.0
DEVICE = torch.device("cuda")


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int, max_s: float) -> tuple[float, int]:
    """Median wall ms of fn() (which synchronises), at least 3 reps, stopping after max_s."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    begin = time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - begin < max_s):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), len(times)


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None


def make_models(cfg: dict) -> dict[str, SimpleNet]:
    base = wide_resnet_model(cfg["image_size"], cfg["resize"], cfg["dims"])
    models = {}
    for precision in cfg["precisions"]:
        model = copy.deepcopy(base)
        model.precision = precision
        models[precision] = model.to(DEVICE).eval()
    return models


def check_precision(model: SimpleNet, images, batch: int, precision: str, on_cuda: bool) -> dict:
    tol = TOLERANCE[precision]
    row: dict = {"precision": precision, "batch": batch, "tolerance": tol}
    fused = model.score(images, batch_size=batch, fused=True)
    ref = model.score(images, batch_size=batch, fused=False)
    row["err_score"] = relative_error(fused.pred_score, ref.pred_score)
    row["err_map"] = relative_error(fused.anomaly_map, ref.anomaly_map)
    row.update(ranking_check(fused.pred_score, ref.pred_score, tol))
    ok = row["err_score"] <= tol and row["err_map"] <= tol and row["rank_swaps_beyond_tol"] == 0
    if on_cuda:
        graph = model.score(images, batch_size=batch, fused=True, cuda_graph=True)
        row["err_graph_vs_eager"] = relative_error(graph.pred_score, fused.pred_score)
        ok = ok and row["err_graph_vs_eager"] <= tol
        model._graphs.clear()
    if precision == "float32":
        off_scores, off_maps = official_style(model, images[:min(batch, 8)], min(batch, 8))
        n = len(off_scores)
        row["err_official_score"] = relative_error(torch.from_numpy(off_scores), ref.pred_score[:n])
        row["err_official_map"] = relative_error(torch.from_numpy(off_maps), ref.anomaly_map[:n])
        ok = ok and row["err_official_score"] <= 1e-4 and row["err_official_map"] <= 1e-4
    row["check"] = "ok" if ok else "FAILED"
    return row


def bench(name: str, fn, batch: int, reps: int, warmup: int, max_s: float, **labels) -> dict:
    row = {"pipeline": name, "batch": batch, **labels}
    try:
        fn()  # first call outside the timing: graph capture, cuDNN choices, pinned pools
        synchronize()
        reset_peak()
        ms, n = timed(fn, reps, warmup, max_s)
        row.update(ms=ms, img_s=batch * 1e3 / ms, reps=n, peak_mb=peak_mb())
    except Exception as error:
        traceback.print_exc()
        row.update(ms=None, img_s=None, error=f"{type(error).__name__}: {error}")
    print("  ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write all numbers to this JSON file")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per case (at most)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (image 64, head 64/64/32, batch 1 and 4): a test of the code paths")
    parser.add_argument("--max-case-s", type=float, default=3.0, help="time cap per case (min 3 reps)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    on_cuda = DEVICE.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (SPEC 6)
    torch.backends.cudnn.allow_tf32 = False
    if args.smoke:
        cfg = dict(image_size=64, resize=73, dims=(64, 64, 32), batches=[1, 4], official_batches=[1, 4],
                   precisions=["float32", "bfloat16"])
        args.reps = min(args.reps, 3)
    else:
        cfg = dict(image_size=288, resize=329, dims=(1536, 1536, 1024), batches=[1, 32],
                   official_batches=[1, 8], precisions=["float32", "bfloat16"])
    t0 = time.perf_counter()
    info = simplenet_fast.build_info()
    device_name = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}, build_info: {info}, config: {cfg}")
    results: dict = {"device": device_name, "torch": torch.__version__, "build_info": info, "config": cfg,
                     "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                              "cudnn": torch.backends.cudnn.allow_tf32},
                     "checks": [], "rows": []}
    models = make_models(cfg)
    big = max(cfg["batches"])
    images = make_images(big, cfg["resize"], seed=1)
    if on_cuda:
        for model in models.values():  # bf16: the one-off channels-last conversion, before timing
            model.score(images[:1], batch_size=1, fused=True)

    # ---------------------------------------------------------------- correctness
    for precision, model in models.items():
        print(f"check {precision} batch {big} ...", flush=True)
        try:
            row = check_precision(model, images, big, precision, on_cuda)
        except Exception as error:
            traceback.print_exc()
            row = {"precision": precision, "check": f"ERROR {type(error).__name__}: {error}"}
        print("  ", row, flush=True)
        results["checks"].append(row)

    # ---------------------------------------------------------------- timing
    rows = results["rows"]
    for precision, model in models.items():
        for batch in cfg["batches"]:
            imgs = images[:batch]
            for name, fused in (("fused", True), ("reference", False)):
                slow = not fused and batch > 1
                for graph in ((False, True) if on_cuda else (False,)):
                    print(f"case {name} {precision} B={batch} graph={graph} ...", flush=True)
                    rows.append(bench(
                        name, lambda m=model, i=imgs, b=batch, f=fused, g=graph: (
                            m.score(i, batch_size=b, fused=f, cuda_graph=g), synchronize()),
                        batch, 3 if slow else args.reps, 0 if slow else 1, args.max_case_s,
                        precision=precision, graph=graph))
                    model._graphs.clear()
            print(f"case host {precision} B={batch} ...", flush=True)
            rows.append(bench("host", lambda m=model, i=imgs: _stage_inputs(
                [p.input for p in iter_prepared(i, m.geometry)], pinned=on_cuda),
                batch, args.reps, 1, args.max_case_s, precision=precision, graph=False))
            # device path alone: uint8 batch already on the device
            dev_batch = next(iter_batches(imgs, batch, cfg["image_size"], cfg["resize"])).to(DEVICE)

            def device_eager(m=model, x=dev_batch):
                with torch.inference_mode():
                    m._device_forward(x, True, check=False)
                synchronize()

            def device_graph(m=model, x=dev_batch, b=batch):
                with torch.inference_mode():
                    m._graph_forward(x, b, True)
                synchronize()

            for graph, fn in ((False, device_eager), (True, device_graph)):
                if graph and not on_cuda:
                    continue
                print(f"case device {precision} B={batch} graph={graph} ...", flush=True)
                rows.append(bench("device", fn, batch, args.reps, 1, args.max_case_s,
                                  precision=precision, graph=graph))
            model._graphs.clear()
            if on_cuda:
                torch.cuda.empty_cache()
    model = models["float32"]
    for batch in cfg["official_batches"]:
        print(f"case official float32 B={batch} ...", flush=True)
        rows.append(bench("official", lambda b=batch: official_style(model, images[:b], b), batch,
                          3, 0, args.max_case_s, precision="float32", graph=False))
    if on_cuda:
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- host profile
    # Where the batch-1 target case spends its host time (calls that wait for the GPU included).
    model, graph = models[cfg["precisions"][-1]], on_cuda
    model.score(images[:1], batch_size=1, fused=True, cuda_graph=graph)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        model.score(images[:1], batch_size=1, fused=True, cuda_graph=graph)
    synchronize()
    profiler.disable()
    model._graphs.clear()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(15)
    results["host_profile_b1"] = report.getvalue()

    # ---------------------------------------------------------------- summary
    official = {r["batch"]: r["img_s"] for r in rows if r["pipeline"] == "official" and r.get("img_s")}
    for r in rows:
        base = official.get(r["batch"]) or (official[max(official)] if official else None)
        r["vs_official"] = r["img_s"] / base if r.get("img_s") and base else None
    def find(pipeline, precision, batch, graph):
        return next((r for r in rows if (r["pipeline"], r["precision"], r["batch"], r["graph"])
                     == (pipeline, precision, batch, graph)), {})
    b1 = find("fused", "bfloat16", 1, on_cuda).get("ms")
    b32 = find("fused", "bfloat16", big, on_cuda).get("img_s")
    results["targets"] = {
        "b1_ms": b1, "b1_target_ms": TARGET_B1_MS, "b1_met": b1 is not None and b1 <= TARGET_B1_MS,
        f"b{big}_img_s": b32, "b32_target_img_s": TARGET_B32_IMG_S,
        "b32_met": b32 is not None and b32 >= TARGET_B32_IMG_S}
    results["total_s"] = time.perf_counter() - t0
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    print("RESULTS_JSON: " + json.dumps(results, default=str))

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    print(f"\n=== end-to-end WRN50-2 {cfg['image_size']}px (median ms per batch; graph = CUDA graph; "
          f"device = uint8 batch already on the {DEVICE.type}; vs official = img/s over the "
          f"official row of the same batch, else of its largest: B={max(cfg['official_batches'])}) ===")
    for c in results["checks"]:
        print(f"check {c.get('precision')}: {c.get('check')}  fused vs ref score {fmt(c.get('err_score'), '.1e')} "
              f"map {fmt(c.get('err_map'), '.1e')} (tol {c.get('tolerance')}), rank exact {c.get('rank_exact')}, "
              f"swaps>tol {c.get('rank_swaps_beyond_tol')}, graph vs eager {fmt(c.get('err_graph_vs_eager'), '.1e')}, "
              f"official vs ref {fmt(c.get('err_official_score'), '.1e')}")
    print(f"{'pipeline':10s} {'prec':8s} {'B':>3s} {'graph':5s} {'ms/batch':>9s} {'img/s':>8s} "
          f"{'vs official':>11s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['pipeline']:10s} {r['precision']:8s} {r['batch']:3d} {'yes' if r['graph'] else 'no':5s} "
              f"{fmt(r.get('ms'), '9.3f')} {fmt(r.get('img_s'), '8.1f')} "
              f"{fmt(r.get('vs_official'), '10.1f') + 'x' if r.get('vs_official') else 'n/a':>11s} "
              f"{fmt(r.get('peak_mb'), '8.0f')}" + (f"  {r['error'][:60]}" if r.get("error") else ""))
    print(f"\n--- cProfile, 50 calls of fused {cfg['precisions'][-1]} B=1 graph={on_cuda} (tottime):")
    print("\n".join(line for line in results["host_profile_b1"].splitlines()[6:] if line.strip()))
    t = results["targets"]
    print(f"targets (fused bf16 graph, end to end): B=1 {fmt(t['b1_ms'], '.3f')} ms (<= {TARGET_B1_MS}: "
          f"{'MET' if t['b1_met'] else 'NOT MET'}); B={big} {fmt(b32, '.0f')} img/s (>= {TARGET_B32_IMG_S:.0f}: "
          f"{'MET' if t['b32_met'] else 'NOT MET'})  [total {results['total_s']:.0f} s]")
    failed = [c for c in results["checks"] if c.get("check") != "ok"]
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
