"""Which precision a model computes in: the `precision` setting resolved for a device and backbone.

`SimpleNet(precision=...)` takes one of `PRECISIONS`:
  "float32"   always float32.
  "bfloat16"  the backbone in bfloat16 where the device computes it natively (CUDA GPUs of compute
              capability 8.0 on; CPUs with AVX512-BF16 or AMX-BF16: recent Xeons, AMD Zen 4/5)
              and the backbone keeps SPEC 6's bf16 contract in it (`FeatureExtractor.
              bfloat16_meets_spec`). Otherwise it falls back to float32 with a one-time warning:
              torch runs bf16 convolutions on other CPUs through an emulation (WideResNet-50-2 at
              288 px took 7x as long as float32 on a 2-core AVX2 EPYC), and a backbone whose bf16
              answer is off the contract would be a wrong answer, not a faster one.
  "auto"      bfloat16 where it is native, within the contract AND the backbone declares it
              measured faster there (`FeatureExtractor.bfloat16_faster_on`); float32 otherwise,
              without a warning.
Training is float32 whatever the setting (SimpleNet.fit); the accuracy of bf16 paths is SPEC 6's
(within 2e-2 relative of float32, identical image-score ranking).
"""
from __future__ import annotations

import threading
import warnings

import torch

PRECISIONS = ("auto", "float32", "bfloat16")

_warned: set[str] = set()  # fallback reasons already warned about in this process
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
    on `device` with `backbone`; a "bfloat16" request that must fall back warns once per process
    and reason."""
    if precision == "float32":
        return "float32"
    native = has_native_bfloat16(device)
    accurate = getattr(backbone, "bfloat16_meets_spec", True)
    if precision == "auto":
        faster = device.type in getattr(backbone, "bfloat16_faster_on", ())
        return "bfloat16" if native and accurate and faster else "float32"
    if not accurate:
        _warn_once("accuracy", f"the {getattr(backbone, 'name', None) or 'backbone'} backbone's "
                   "bfloat16 features are too far from float32 for SPEC 6's bf16 contract "
                   "(see its bfloat16_meets_spec)")
        return "float32"
    if not native:
        what = ("this CPU has neither AVX512-BF16 nor AMX-BF16" if device.type == "cpu"
                else f"{device} has no native bfloat16 arithmetic")
        _warn_once(f"native {device.type}", f"{what}, and emulated bfloat16 would be several "
                   "times slower than float32")
        return "float32"
    return "bfloat16"


def _warn_once(reason: str, why: str) -> None:
    with _warn_lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"precision='bfloat16' runs in float32: {why} (precision='auto' chooses "
                  "without this warning)", RuntimeWarning, stacklevel=5)  # the caller of model.score
