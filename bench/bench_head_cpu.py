"""CPU timing of the fused head (csrc/cpu) against the pure-PyTorch reference head and the SPEC 4
fold in plain PyTorch, per configuration and batch:

    pytest bench/bench_head_cpu.py [--benchmark-group-by=group] [-k paper]

Each group holds, for one configuration and batch:
  - `reference`   SimpleNetHead.reference_patch_scores (SPEC 1 literally),
  - `torch_fold`  simplenet_fast._fold.folded_patch_scores_torch (SPEC 4 in plain PyTorch),
  - `fused`       simplenet_fast._fused.fused_patch_scores (the checked entry into the kernel,
                  no finiteness check),
  - `fused_api`   SimpleNetHead.patch_scores(fused=True) (the public call: checks, the registered
                  operator torch.ops.simplenet_fast.patch_scores, the finiteness check),
  - `fused_compiled`  the same call inside torch.compile(fullgraph=True) (compiled before timing),
  - `torch_mm`    only the two folded GEMMs of SPEC 4 in torch.mm (MKL / oneDNN) on the same
                  shapes: W2 [hidden, d2] @ [d2, B*H2*W2] and W3 [hidden, d3] @ [d3, B*H3*W3].
Every case is checked against the reference before it is timed (SPEC 6: 1e-4 relative L2).
extra_info records images/s, GFLOP/s of the folded GEMMs (the same 2*hidden*(d2*H2*W2 +
d3*H3*W3) per image for every implementation, so that the rates compare like for like),
the peak resident memory the call added, and, for `fused`, torch.mm's rate on the same shapes
measured alongside it and the ratio of the two. A summary table is printed at the end.

Timings on a shared 2-core machine are noisy: compare within one run, as ratios.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pytest
import torch

from simplenet_fast import SimpleNetHead, _fused, build_info
from simplenet_fast._fold import folded_patch_scores_torch, gflop_per_image

from e2e_common import relative_error


@dataclass(frozen=True)
class Config:
    channels: tuple[int, int]
    pretrain: int
    target: int
    hidden: int
    grid2: tuple[int, int]
    grid3: tuple[int, int]


CONFIGS = {
    "paper": Config((512, 1024), 1536, 1536, 1024, (36, 36), (18, 18)),
    # odd grids: no dimension a multiple of a vector width or of a tile
    "odd": Config((512, 1024), 1536, 1536, 1024, (35, 37), (18, 19)),
    # general pooling windows (case_odd of the official fixtures), hidden 48
    "tiny": Config((24, 40), 100, 70, 48, (10, 12), (5, 6)),
}
CASES = [("paper", 1), ("paper", 8), ("odd", 3), ("tiny", 3)]
IMPLS = ["reference", "torch_fold", "fused", "fused_api", "fused_compiled", "torch_mm"]
TOLERANCE = 1e-4  # SPEC 6, float32, relative L2


def rounds_for(impl: str, batch: int) -> int:
    if impl == "reference":  # ~0.75 s per paper image
        return 1 if batch >= 8 else 3
    return 5 if batch >= 8 else 15


_state: dict = {}
_summary: list[dict] = []


def case_state(name: str, batch: int) -> dict:
    """Head, features, folded weights and the reference scores of one case, built once."""
    key = (name, batch)
    if key not in _state:
        cfg = CONFIGS[name]
        gen = torch.Generator().manual_seed(1000 + batch)
        torch.manual_seed(batch)
        head = SimpleNetHead(cfg.channels, cfg.pretrain, cfg.target, cfg.hidden).eval()
        with torch.no_grad():  # non-trivial biases and BN statistics (SPEC 6)
            head.adaptor.bias.copy_(0.1 * torch.randn(cfg.target, generator=gen))
            head.discriminator.linear.bias.copy_(0.1 * torch.randn(cfg.hidden, generator=gen))
            bn = head.discriminator.bn
            bn.running_mean.copy_(0.5 * torch.randn(cfg.hidden, generator=gen))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(cfg.hidden, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(cfg.hidden, generator=gen))
            bn.bias.copy_(0.3 * torch.randn(cfg.hidden, generator=gen))
        features = [(torch.randn(batch, cfg.channels[0], *cfg.grid2, generator=gen) + 0.1).relu(),
                    (1.2 * torch.randn(batch, cfg.channels[1], *cfg.grid3, generator=gen)).relu()]
        folded = head.folded()
        with torch.no_grad():
            reference = head.reference_patch_scores(features)
        d2, d3 = folded.pool2.columns, folded.pool3.columns
        _state[key] = {
            "head": head, "features": features, "folded": folded, "reference": reference,
            "gflop": gflop_per_image(folded, cfg.grid2, cfg.grid3) * batch,
            # operands of the torch_mm ceiling: the pooled columns at both grids
            "mm": (folded.weight2, torch.randn(d2, batch * cfg.grid2[0] * cfg.grid2[1], generator=gen),
                   folded.weight3, torch.randn(d3, batch * cfg.grid3[0] * cfg.grid3[1], generator=gen)),
        }
    return _state[key]


def runner(impl: str, state: dict):
    head, features, folded = state["head"], state["features"], state["folded"]
    if impl == "reference":
        return lambda: head.reference_patch_scores(features)
    if impl == "torch_fold":
        return lambda: folded_patch_scores_torch(folded, *features)
    if impl == "fused":
        return lambda: _fused.fused_patch_scores(head, features)
    if impl == "fused_api":
        return lambda: head.patch_scores(features, fused=True)
    if impl == "fused_compiled":
        if "compiled" not in state:
            torch._dynamo.reset()
            state["compiled"] = torch.compile(lambda f2, f3: head.patch_scores([f2, f3], fused=True),
                                              fullgraph=True)
        return lambda: state["compiled"](*features)
    w2, p2, w3, p3 = state["mm"]
    return lambda: (torch.mm(w2, p2), torch.mm(w3, p3))


def peak_rss_added_mb(fn) -> float | None:
    """Peak resident memory one call adds, via Linux's resettable high-water mark (or None)."""
    def kib(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = kib("VmRSS")
        fn()
        return max(kib("VmHWM") - before, 0) / 1024
    except (OSError, AttributeError):
        return None


def best_seconds(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Prints a table of all cases when the module is done (past pytest's output capture)."""
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None or not _summary:
        return
    info = build_info()
    times = {(r["case"], r["impl"]): r["ms"] for r in _summary}
    lines = ["", f"fused head on the CPU: {info.get('cpu_isa')} path, OpenMP {info.get('openmp')}, "
                 f"{torch.get_num_threads()} torch threads",
             f"{'case':<10} {'impl':<14} {'min ms':>9} {'img/s':>8} {'GFLOP/s':>8} "
             f"{'vs ref':>7} {'vs fold':>8} {'peak MB':>8}"]
    for r in _summary:
        ref, fold = times.get((r["case"], "reference")), times.get((r["case"], "torch_fold"))
        speed_ref = f"{ref / r['ms']:.1f}x" if ref else ""
        speed_fold = f"{fold / r['ms']:.2f}x" if fold else ""
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"{r['case']:<10} {r['impl']:<14} {r['ms']:>9.2f} {r['images_per_s']:>8.1f} "
                     f"{r['gflops']:>8.3g} {speed_ref:>7} {speed_fold:>8} {peak:>8}")
    for r in _summary:
        if "torch_mm_gflops" in r:
            lines.append(f"{r['case']}: fused {r['gflops']:.3g} GFLOP/s (everything included) vs "
                         f"torch.mm {r['torch_mm_gflops']:.3g} GFLOP/s on the same GEMM shapes "
                         f"= {r['fused_vs_mm']:.2f}")
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[f"{n}-B{b}" for n, b in CASES])
def test_head_cpu(benchmark, case, impl):
    name, batch = case
    state = case_state(name, batch)
    if impl.startswith("fused") and not _fused.can_run(state["features"]):
        pytest.skip("the compiled extension simplenet_fast._C has no CPU kernel for these features")
    fn = runner(impl, state)
    benchmark.group = f"{name} B{batch}"
    with torch.no_grad():
        # Correctness first (SPEC 6), then time. The first call also gives the peak memory.
        outputs = []
        peak = peak_rss_added_mb(lambda out=outputs: out.append(fn()))
        if impl != "torch_mm":
            error = relative_error(outputs[0], state["reference"])
            assert error < TOLERANCE, f"{impl} differs from the reference by {error:.2e} (relative L2)"
            benchmark.extra_info["relative_error"] = error
        del outputs
        benchmark.pedantic(fn, rounds=rounds_for(impl, batch), warmup_rounds=0 if impl == "reference" else 1)
        if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing was timed
            return
        seconds = benchmark.stats.stats.min
        row = {"case": f"{name}-B{batch}", "impl": impl, "ms": seconds * 1e3,
               "images_per_s": batch / seconds, "gflops": state["gflop"] / seconds, "peak_mb": peak}
        if impl == "fused":
            mm = best_seconds(runner("torch_mm", state))
            row["torch_mm_gflops"] = state["gflop"] / mm
            row["fused_vs_mm"] = mm / seconds
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("case", "impl", "ms")})
    _summary.append(row)
