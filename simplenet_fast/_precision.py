"""Which precision a model computes in: the `precision` setting resolved for a device and backbone.

`SimpleNet(precision=...)` takes one of `PRECISIONS`:
  "float32"   always float32.
  "bfloat16"  the backbone in bfloat16 where the device computes it natively: CUDA GPUs with
              bf16 tensor cores, CPUs with AVX512-BF16 or AMX-BF16 (recent Xeons, AMD Zen 4/5).
              Elsewhere it falls back to float32 with a one-time warning: torch runs bf16
              convolutions on other CPUs through a slow emulation (measured on a 2-core AVX2
              EPYC: WideResNet-50-2 at 288 px 7x slower than float32, EfficientNet-Lite0 2-20x
              slower), which would defeat the point of asking for speed.
  "auto"      bfloat16 where it is native AND the backbone declares it measured faster there
              (`FeatureExtractor.bfloat16_faster_on`), float32 otherwise; no warning.
Training is float32 whatever the setting (SimpleNet.fit); the accuracy of bf16 paths is SPEC 6's
(within 2e-2 relative of float32, identical image-score ranking).
"""
from __future__ import annotations

import threading
import warnings

import torch

PRECISIONS = ("auto", "float32", "bfloat16")

_warned = False
_warn_lock = threading.Lock()


def check_precision(precision) -> str:
    """`precision` if it is one of PRECISIONS; a ValueError naming them otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, "
                         f"got {precision!r}")
    return precision


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (AVX512-BF16's vdpbf16ps or
    AMX-BF16 tiles), read from torch's own CPU probe (cpuinfo). oneDNN's bf16 convolutions are
    faster than float32 only there; `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is not the
    test, since it also says yes for AVX-512 CPUs without BF16, where oneDNN emulates it."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:  # an older torch: no probe, so never risk the emulated path
        return False
    flags = capabilities()
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def cuda_has_native_bfloat16(device: torch.device) -> bool:
    """Whether the CUDA device has bf16 arithmetic in hardware (compute capability 8.0 on)."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def has_native_bfloat16(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_has_native_bfloat16(device)
    if device.type == "cpu":
        return cpu_has_native_bfloat16()
    return False


def resolve_precision(precision: str, device: torch.device, backbone) -> str:
    """The precision to compute in, "float32" or "bfloat16", for `precision` (one of PRECISIONS)
    on `device` with `backbone`; a "bfloat16" request that must fall back warns once per process."""
    if precision == "float32":
        return "float32"
    native = has_native_bfloat16(device)
    if precision == "auto":
        faster = device.type in getattr(backbone, "bfloat16_faster_on", ())
        return "bfloat16" if native and faster else "float32"
    if native:
        return "bfloat16"
    _warn_fallback(device)
    return "float32"


def _warn_fallback(device: torch.device) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    what = ("this CPU has neither AVX512-BF16 nor AMX-BF16" if device.type == "cpu"
            else f"{device} has no native bfloat16 arithmetic")
    warnings.warn(f"precision='bfloat16' runs in float32: {what}, and emulated bfloat16 would be "
                  "several times slower than float32 (precision='auto' chooses without this "
                  "warning)", RuntimeWarning, stacklevel=5)  # the caller of model.score
