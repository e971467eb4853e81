"""float32 against bfloat16 on the CPU (issue #16), head and end to end, in one run, with the
CPU's flags printed first:

    pytest bench/bench_bf16_cpu.py [--benchmark-group-by=group] [-k e2e] [-k head]
    SIMPLENET_BENCH_THREADS=1 pytest bench/bench_bf16_cpu.py    (default: 2 threads)

Groups (WideResNet-50-2 at 288 px, the paper head 1536/1536/1024 with non-trivial BN statistics,
random weights: speed does not depend on them):
  head B1, head B8   `head.patch_scores(fused=True)` on WideResNet-shaped maps (layer2
                     [B, 512, 36, 36], layer3 [B, 1024, 18, 18]): `float32` contiguous maps, and
                     `bfloat16` channels-last maps, as a bf16 backbone gives them (the wrapper
                     widens them to float32 in its one copy; the CPU kernel computes in float32).
  e2e 288 B1, B8     `official`: the paper code's inference (e2e_common.official_style: reference
                     head, float32, plus its dead work); `float32` and `bfloat16`:
                     `model.score(images, batch_size=B, precision=...)`. Each call takes B
                     pre-decoded 329x329 uint8 images: crop, normalise, backbone, head, map.
The bfloat16 end-to-end case runs only where the CPU computes bf16 natively
(`build_info()["cpu_bfloat16"]`: AVX512-BF16 or AMX-BF16); elsewhere it skips, since a bf16
request runs float32 there. SIMPLENET_BENCH_EMULATE_BF16=1 runs it anyway through torch's
emulation (slow: a check of this file's code paths, e.g. with --benchmark-disable, never a timing).

Checked before anything is timed (SPEC 6): float32 against the official pipeline (image scores and
maps within 1e-4 relative L2), bf16 against float32 (2e-2, and no image pair whose float32 scores
differ by more than the tolerance ranked the other way), bf16 maps through the head against float32
maps (2e-2). The summary gives min ms per call, images/s and the ratios the issue sets targets for:
bf16 >= 9x the official code and >= 1.7x our float32, at batch 1 and 8.

Timings on a shared machine are noisy: compare within one run, as ratios.
"""
from __future__ import annotations

import os

import pytest
import torch

from e2e_common import make_images, official_style, ranking_check, relative_error, wide_resnet_model
from simplenet_fast import _precision, build_info

THREADS = int(os.environ.get("SIMPLENET_BENCH_THREADS", "2"))
EMULATE = os.environ.get("SIMPLENET_BENCH_EMULATE_BF16") == "1"
BATCHES = [1, 8]
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # SPEC 6, relative L2
TARGETS = {"official": 9.0, "float32": 1.7}  # bf16 speed-up over each (issue #16)
FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_tile", "amx_bf16")

_state: dict = {}
_summary: dict = {}


def cpu_description() -> str:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = " ".join(f"{f}={'yes' if caps.get(f) else 'no'}" for f in FLAGS)
    info = build_info()
    return (f"CPU: {caps.get('cpu_name', '?')}, {caps.get('num_physical_cores', '?')} physical cores; "
            f"{flags}; torch {torch.__version__} (ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); fused head ISA {info['cpu_isa']}; native "
            f"bf16: {info['cpu_bfloat16']}{' (EMULATED for this run)' if EMULATE else ''}; "
            f"{torch.get_num_threads()} threads")


def bfloat16_runs() -> bool:
    return EMULATE or _precision.cpu_has_native_bfloat16()


def model():
    if "model" not in _state:
        _state["model"] = wide_resnet_model()
        _state["images"] = make_images(max(BATCHES), 329, seed=1)
    return _state["model"]


def head_maps(batch: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    f2 = torch.relu(torch.randn(batch, 512, 36, 36, generator=g) + 0.1)
    f3 = torch.relu(1.2 * torch.randn(batch, 1024, 18, 18, generator=g))
    return {"float32": [f2, f3],
            "bfloat16": [f.to(torch.bfloat16, memory_format=torch.channels_last) for f in (f2, f3)]}


@pytest.fixture(scope="module", autouse=True)
def threads_and_summary(request):
    """Sets the thread count, prints the CPU first and the summary table when the module is done."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def write(lines):
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                for line in lines:
                    reporter.write_line(line)

    write(["", cpu_description()])
    patch = pytest.MonkeyPatch()
    if EMULATE:  # bench-only: this file's code paths on a CPU without bf16; never for timing
        patch.setattr(_precision, "cpu_has_native_bfloat16", lambda: True)
    yield
    patch.undo()
    torch.set_num_threads(before)
    if not _summary:
        return
    lines = ["", cpu_description(),
             f"{'group':<12} {'case':<10} {'min ms':>9} {'img/s':>7} {'x official':>10} {'x float32':>9}"]
    for (group, case), (ms, batch) in _summary.items():
        base = {name: _summary.get((group, name)) for name in ("official", "float32")}
        ratio = {name: f"{b[0] / ms:.2f}x" if b else "" for name, b in base.items()}
        lines.append(f"{group:<12} {case:<10} {ms:>9.2f} {batch * 1e3 / ms:>7.2f} "
                     f"{ratio['official']:>10} {ratio['float32']:>9}")
    for batch in BATCHES:
        group = f"e2e 288 B{batch}"
        bf16 = _summary.get((group, "bfloat16"))
        for name, target in TARGETS.items():
            base = _summary.get((group, name))
            if bf16 and base:
                speedup = base[0] / bf16[0]
                verdict = "emulated: not a measurement" if EMULATE else (
                    "met" if speedup >= target else "NOT met")
                lines.append(f"target B={batch}: bf16 >= {target}x {name}: {speedup:.2f}x ({verdict})")
            elif not bf16:
                lines.append(f"target B={batch}: bf16 >= {target}x {name}: not measured (no native "
                             "bf16 on this CPU)")
    write(lines)


def record(benchmark, group: str, case: str, batch: int) -> None:
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    ms = benchmark.stats.stats.min * 1e3
    benchmark.extra_info.update(images_per_s=batch * 1e3 / ms, threads=torch.get_num_threads(),
                                cpu_bfloat16=build_info()["cpu_bfloat16"], emulated=EMULATE)
    _summary[(group, case)] = (ms, batch)


@pytest.mark.parametrize("maps", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", BATCHES)
def test_head(benchmark, batch, maps):
    if not build_info()["compiled"]:
        pytest.skip("the compiled extension simplenet_fast._C is not available")
    head = model().head
    features = head_maps(batch)
    with torch.no_grad():
        got = head.patch_scores(features[maps], fused=True)
        full = head.patch_scores(features["float32"], fused=True)
    error = relative_error(got, full)
    assert error <= TOLERANCE[maps], f"{maps} maps: scores differ from float32 by {error:.2e}"
    benchmark.extra_info["relative_error_vs_float32"] = error
    benchmark.group = f"head B{batch}"

    def call():
        with torch.no_grad():
            return head.patch_scores(features[maps], fused=True)
    benchmark.pedantic(call, rounds=5 if batch > 1 else 15, warmup_rounds=1)
    record(benchmark, benchmark.group, maps, batch)


@pytest.mark.parametrize("pipeline", ["official", "float32", "bfloat16"])
@pytest.mark.parametrize("batch", BATCHES)
def test_e2e(benchmark, batch, pipeline):
    if pipeline == "bfloat16" and not bfloat16_runs():
        pytest.skip(f"no native bf16 on this CPU, where a bf16 request runs float32 ({cpu_description()})")
    if pipeline != "official" and not build_info()["compiled"]:
        pytest.skip("the compiled extension simplenet_fast._C is not available")
    m, images = model(), _state["images"][:batch]
    if pipeline == "official":
        def call():
            return official_style(m, images, batch)
    else:
        def call():
            return m.score(images, batch_size=batch, precision=pipeline)
    # Correctness first: official against our float32, float32 against the reference head,
    # bf16 against float32.
    full = m.score(images, batch_size=batch, precision="float32")
    if pipeline == "official":
        scores, maps = (torch.from_numpy(a) for a in call())
        got = {"pred_score": scores, "anomaly_map": maps}
        against = {"pred_score": full.pred_score, "anomaly_map": full.anomaly_map}
    else:
        result = call() if pipeline == "bfloat16" else full
        got = {name: getattr(result, name) for name in ("pred_score", "anomaly_map", "patch_scores")}
        expected = full if pipeline == "bfloat16" else m.score(
            images, batch_size=batch, fused=False, precision="float32")
        against = {name: getattr(expected, name) for name in got}
    tol = TOLERANCE["bfloat16" if pipeline == "bfloat16" else "float32"]
    for name in got:
        error = relative_error(got[name], against[name])
        assert error <= tol, f"{pipeline} {name} differs by {error:.2e} (tolerance {tol})"
        benchmark.extra_info[f"{name}_relative_error"] = error
    if pipeline == "bfloat16":
        assert m._bfloat16_backbone_cache is not None, "the bf16 backbone did not run"
        ranks = ranking_check(got["pred_score"], against["pred_score"], tol)
        assert ranks["rank_swaps_beyond_tol"] == 0, ranks
        benchmark.extra_info.update(ranks)
    benchmark.group = f"e2e 288 B{batch}"
    benchmark.pedantic(call, rounds=3 if pipeline == "official" or batch > 1 else 10,
                       warmup_rounds=0 if pipeline == "official" else 1)
    record(benchmark, benchmark.group, pipeline, batch)
