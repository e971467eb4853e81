"""GPU timing of the fused head (csrc/cuda/head.cu) against the pure-PyTorch reference head and
the SPEC 4 fold in plain PyTorch, paper configuration (512 x 36 x 36, 1024 x 18 x 18, hidden 1024),
batch 1 and 32, float32 and bf16. A plain script, so that one call on a lent GPU runs it whole:

    python bench/bench_gpu.py [--out results.json] [--reps 20] [--device cpu]

(`--device cpu` is a smoke run of this script's own logic on a machine without a GPU.)

Every case is checked against a float64 evaluation of the reference before it is timed (SPEC 6
tolerances). Times are medians of CUDA-event intervals after warm-up; "graph" replays the fused
call captured in a CUDA graph (no Python or launch overhead), "kernels" are per-kernel device
times from torch.profiler. Also times a bf16 WideResNet-50-2 up to layer3, the backbone the head
sits behind, and two ceilings (cuBLAS bf16 and float32 matrix products) for scale.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simplenet_fast  # noqa: E402
from simplenet_fast import SimpleNetHead, _fused  # noqa: E402
from simplenet_fast._fold import PoolPlanTensors, folded_patch_scores_torch, gflop_per_image  # noqa: E402
from e2e_common import relative_error  # noqa: E402

PAPER = dict(channels=(512, 1024), grid2=(36, 36), grid3=(18, 18), hidden=1024)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DEVICE = torch.device("cuda")  # main() may switch it to the CPU for a smoke run


def make_head() -> SimpleNetHead:
    gen = torch.Generator().manual_seed(0)
    head = SimpleNetHead(PAPER["channels"], 1536, 1536, PAPER["hidden"]).eval()
    with torch.no_grad():  # non-trivial BN statistics (SPEC 6)
        bn = head.discriminator.bn
        bn.running_mean.copy_(torch.randn(PAPER["hidden"], generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(PAPER["hidden"], generator=gen) + 0.5)
        bn.weight.copy_(torch.rand(PAPER["hidden"], generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(PAPER["hidden"], generator=gen) * 0.2)
    return head.to(DEVICE)


def make_features(batch: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    c2, c3 = PAPER["channels"]
    return [torch.randn(batch, c2, *PAPER["grid2"], device=DEVICE, generator=gen).to(dtype),
            torch.randn(batch, c3, *PAPER["grid3"], device=DEVICE, generator=gen).to(dtype)]


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(reps):
        if DEVICE.type != "cuda":
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times_us(fn, iterations: int = 5) -> dict[str, float]:
    """Mean device time per call of each CUDA kernel that fn launches, names shortened."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        match = re.search(r"(layer3_term|patch_score|sum_partials)_kernel", name)
        if match:
            tile = re.search(r"(SimtTile|MmaTile<\d+>|MmaTileILi\d+E)", name)
            name = match.group(1) + (f"[{tile.group(1)}]" if tile else "")
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = event.cuda_time_total
        totals[name[:60]] = totals.get(name[:60], 0.0) + device_us / iterations
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def graph_replay_ms(call, reps: int) -> float | None:
    """Median time of the fused call replayed from a CUDA graph, or None if capture fails."""
    try:
        call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return median_ms(graph.replay, reps)
    except Exception as error:  # report, carry on: the graph test in tests/test_cuda.py says more
        print(f"  graph capture failed: {type(error).__name__}: {error}")
        return None


def bench_case(head, mode: str, batch: int, reps: int, reference64_cache: dict) -> dict:
    dtype = torch.float32 if mode == "float32" else torch.bfloat16
    features = make_features(batch, dtype, seed=batch)
    key = (mode, batch)
    if key not in reference64_cache:
        with torch.no_grad():
            reference64_cache[key] = copy.deepcopy(head).double().reference_patch_scores(
                [f.double() for f in features])
    reference64 = reference64_cache[key]
    ref_head = head if dtype == torch.float32 else copy.deepcopy(head).to(dtype)
    folded = head.folded(features[0].device)
    out = torch.empty(batch, *PAPER["grid2"], device=DEVICE)

    def reference():
        with torch.no_grad():
            return ref_head.reference_patch_scores(features)

    def fold():
        with torch.no_grad():
            return folded_patch_scores_torch(folded, *features)

    # Poisoned output where the wrapper takes one: an unwritten score fails the check.
    takes_out = "out" in inspect.signature(_fused.fused_patch_scores).parameters
    out_kwargs = {"out": out} if takes_out else {}

    def fused():
        return _fused.fused_patch_scores(head, features, compute_dtype=dtype, **out_kwargs)

    row = {"mode": mode, "batch": batch, "poisoned_output": takes_out}
    out.fill_(float("nan"))
    row["error_fused"] = relative_error(fused(), reference64)
    row["check"] = "ok" if row["error_fused"] < TOLERANCE[dtype] else \
        f"FAIL ({row['error_fused']:.2e} vs {TOLERANCE[dtype]:.0e})"
    # The baselines are timed only if they run; a failure there must not hide the fused numbers.
    for name, fn, n in (("reference", reference, max(3, reps // 4)), ("fold", fold, reps)):
        try:
            row[f"error_{name}"] = relative_error(fn(), reference64)
            reset_peak_memory()
            row[f"ms_{name}"] = median_ms(fn, n)
            row[f"peak_mb_{name}"] = peak_memory_mb()
        except Exception as error:
            print(f"  {name} failed: {type(error).__name__}: {error}")
            row[f"ms_{name}"] = None
    reset_peak_memory()
    row["ms_fused"] = median_ms(fused, reps)
    row["peak_mb_fused"] = peak_memory_mb()
    row["ms_fused_graph"] = graph_replay_ms(fused, reps) if DEVICE.type == "cuda" else None
    try:
        row["kernels_us"] = kernel_times_us(fused) if DEVICE.type == "cuda" else {}
    except Exception as error:
        row["kernels_us"] = {"profiler failed": str(error)[:80]}
    best = row["ms_fused_graph"] or row["ms_fused"]
    row["images_per_s"] = batch / best * 1e3
    row["tflops"] = gflop_per_image(folded, PAPER["grid2"], PAPER["grid3"]) * batch / best
    return row


def diagnostics(head, reps: int) -> dict:
    """Where the fused head's time goes, for the next tuning step (numbers are not checked here).

    pooling share: the same call with every pooling plan cut to one tap per column (wrong scores,
    a sixth / twelfth of the gathers), against the real plans; scaling: graph-replayed fused calls
    over batch sizes, which shows wave quantisation and the hidden-split choice at small batches.
    """
    result = {}
    device = torch.device("cuda", torch.cuda.current_device())
    for mode, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        features = make_features(32, dtype, seed=99)
        call = lambda: _fused.fused_patch_scores(head, features, compute_dtype=dtype)  # noqa: E731
        real = median_ms(call, reps)
        disc = head.discriminator
        prepared = _fused.prepare(head.operator_weights(), head.channels, head.pretrain_embed_dim,
                                  disc.bn.eps, disc.negative_slope, device, dtype)

        def one_tap(plan):
            return PoolPlanTensors(plan.index[:, :1].contiguous(), plan.weight[:, :1].contiguous(), plan.target_dims)

        # Private: the kernel's prepared weights with one-tap plans, for this timing only.
        narrow_plans = dataclasses.replace(prepared, folded=dataclasses.replace(
            prepared.folded, pool2=one_tap(prepared.folded.pool2), pool3=one_tap(prepared.folded.pool3)))
        real_prepare = _fused.prepare
        _fused.prepare = lambda *args, **kwargs: narrow_plans
        try:
            narrow = median_ms(call, reps)
        finally:
            _fused.prepare = real_prepare
        result[f"{mode}_b32_ms_real_plans"] = real
        result[f"{mode}_b32_ms_one_tap_plans"] = narrow
        result[f"{mode}_scaling_graph_ms"] = {
            batch: graph_replay_ms(lambda f=make_features(batch, dtype, seed=batch): _fused.fused_patch_scores(
                head, f, compute_dtype=dtype), reps) for batch in (2, 4, 8, 16, 64)}
    return result


def reset_peak_memory():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None


def ceilings() -> dict:
    """cuBLAS matrix-product rates, the practical arithmetic ceilings for this card."""
    result = {}
    n = 8192
    for name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
        a = torch.randn(n, n, device="cuda").to(dtype)
        b = torch.randn(n, n, device="cuda").to(dtype)
        ms = median_ms(lambda: a @ b, 10)
        result[f"matmul_{name}_tflops"] = 2 * n**3 / ms / 1e9
    return result


def backbone_ms(batch: int) -> float | None:
    """bf16 WideResNet-50-2 up to layer3 (random init), 288 x 288, channels-last."""
    try:
        import torchvision
    except ImportError:
        return None
    net = torchvision.models.wide_resnet50_2()
    body = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    body = body.eval().cuda().to(torch.bfloat16).to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, 288, 288, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        return median_ms(lambda: body(images), 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write all numbers to this JSON file")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (SPEC 6)
    torch.backends.cudnn.allow_tf32 = False
    info = simplenet_fast.build_info()
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, build_info: {info}")
    results = {"device": name, "build_info": info, "cases": []}
    head = make_head()
    cache: dict = {}
    for mode in ("float32", "bfloat16"):
        for batch in args.batches:
            print(f"case {mode} batch {batch} ...", flush=True)
            try:
                row = bench_case(head, mode, batch, args.reps, cache)
            except Exception:
                traceback.print_exc()
                row = {"mode": mode, "batch": batch, "check": "ERROR"}
            print("  ", row, flush=True)
            results["cases"].append(row)
        cache.clear()
    if DEVICE.type == "cuda":
        for name, fn in (("ceilings", ceilings), ("diagnostics", lambda: diagnostics(head, args.reps)),
                         ("backbone_bf16_ms", lambda: {b: backbone_ms(b) for b in args.batches})):
            try:
                results[name] = fn()
            except Exception:
                traceback.print_exc()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    print("\n=== fused head vs reference (paper config, median ms; graph = CUDA graph replay) ===")
    print(f"{'mode':9s} {'B':>3s} {'check':6s} {'err fused':>9s} {'ref':>8s} {'fold':>8s} {'fused':>8s} "
          f"{'graph':>8s} {'x ref':>6s} {'x fold':>6s} {'img/s':>8s} {'TFLOP/s':>7s}")
    for row in results["cases"]:
        if "ms_fused" not in row:
            print(f"{row['mode']:9s} {row['batch']:3d} {row['check']}")
            continue
        best = row["ms_fused_graph"] or row["ms_fused"]
        ratio = {k: None if row[f"ms_{k}"] is None else row[f"ms_{k}"] / best for k in ("reference", "fold")}
        print(f"{row['mode']:9s} {row['batch']:3d} {row['check'][:6]:6s} {row['error_fused']:9.2e} "
              f"{fmt(row['ms_reference']):>8s} {fmt(row['ms_fold']):>8s} {row['ms_fused']:8.3f} "
              f"{fmt(row['ms_fused_graph']):>8s} {fmt(ratio['reference'], '.1f'):>6s} {fmt(ratio['fold'], '.1f'):>6s} "
              f"{row['images_per_s']:8.0f} {row['tflops']:7.1f}")
    for row in results["cases"]:
        if "kernels_us" in row:
            kernels = ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in row["kernels_us"].items())
            print(f"kernels us  {row['mode']:9s} B={row['batch']:<3d} {kernels}")
    if "diagnostics" in results:
        d = results["diagnostics"]
        for mode in ("float32", "bfloat16"):
            scaling = d.get(f"{mode}_scaling_graph_ms", {})
            print(f"diagnostics {mode}: B=32 real plans {fmt(d.get(f'{mode}_b32_ms_real_plans'))} ms, one-tap plans "
                  f"{fmt(d.get(f'{mode}_b32_ms_one_tap_plans'))} ms | graph ms by batch: "
                  + ", ".join(f"{b}: {fmt(v)}" for b, v in scaling.items()))
    if "ceilings" in results:
        print("ceilings:", {k: round(v, 1) for k, v in results["ceilings"].items()},
              "| WRN50-2 to layer3, bf16, ms:", {k: fmt(v) for k, v in results.get("backbone_bf16_ms", {}).items()})
    return 0 if all(row.get("check") == "ok" for row in results["cases"]) else 2


if __name__ == "__main__":
    sys.exit(main())
