"""The one checked entry point into the compiled fused head (STYLE.md, "The Python / C++ boundary").

Every shape, dtype, device and contiguity check happens here, once; csrc/ trusts what it gets.
CPU vs CUDA is dispatched here and nowhere else.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from ._fold import FoldedHead, resample_plan
from ._native import native

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# What the compiled kernels take, per device type: feature dtypes and GEMM operand dtypes.
# The CPU kernel reads float32; bfloat16 maps (a bf16 backbone's) are widened to it, exactly, in
# the one copy the wrapper makes anyway (below): 1M values per 288 px WideResNet image, ~1 ms.
_FEATURE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16)}
_COMPUTE_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}


def check_features(head, features: Sequence[Tensor]) -> None:
    """Raise a ValueError naming what was expected unless `features` fit `head`."""
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) != 2:
        raise ValueError("features must be a list of the two backbone maps "
                         "[layer2 [B, C2, H2, W2], layer3 [B, C3, H3, W3]]")
    for name, f, c in zip(("layer2", "layer3"), features, head.channels):
        if not isinstance(f, Tensor):
            raise ValueError(f"{name} features must be a torch.Tensor, got {type(f).__name__}")
        if f.layout != torch.strided or f.is_meta:
            raise ValueError(f"{name} features must be a dense tensor with data, got layout "
                             f"{f.layout} on {f.device}")
        if f.dim() != 4 or f.shape[1] != c or not f.is_floating_point():
            raise ValueError(f"{name} features must be [B, {c}, H, W] floating point, "
                             f"got {list(f.shape)} {str(f.dtype).replace('torch.', '')}")
        if min(f.shape[2:]) <= 0:
            raise ValueError(f"{name} features must have a non-empty grid, got {list(f.shape)}")
    f2, f3 = features
    if f2.shape[0] != f3.shape[0]:
        raise ValueError(f"layer2 and layer3 batch sizes differ: {f2.shape[0]} vs {f3.shape[0]}")
    if f2.device != f3.device or f2.dtype != f3.dtype:
        raise ValueError(f"layer2 and layer3 must share device and dtype, got {f2.device}/{f2.dtype} "
                         f"and {f3.device}/{f3.dtype}")
    # NaN / Inf are caught on the (much smaller) scores, which every value the answer depends on
    # reaches: see head.check_scores. Checking the maps here costs a full pass over them per call.


# The kernels take sizes as int32 fields (csrc/head.h), and the CUDA kernels form B*H*W (grid
# locations, plus up to one block of slack in ceil_div) and C*H*W (a channel offset within one
# image) in int32. Larger inputs would overflow, which is undefined behaviour: they are refused
# here (fused=True) or left to the reference (fused=None). The CPU kernel indexes in int64, but one
# rule for both devices keeps every check in this file.
_INT32_MAX = 2**31 - 1
_MAX_LOCATIONS = _INT32_MAX - 1024


def size_error(features: Sequence[Tensor]) -> str | None:
    """Why the kernels cannot index these (already checked) features, or None if they can."""
    for name, f in zip(("layer2", "layer3"), features):
        b, c, h, w = f.shape
        if b * h * w > _MAX_LOCATIONS or c * h * w > _INT32_MAX:
            return (f"{name} features {list(f.shape)} are too large for the fused head: it "
                    f"indexes B*H*W (here {b * h * w}) and C*H*W (here {c * h * w}) in 32 bits, "
                    f"up to {_MAX_LOCATIONS} and {_INT32_MAX}; score fewer images at a time or use "
                    "fused=False")
    return None


def _has_kernel(module, features: Sequence[Tensor]) -> bool:
    """Whether the compiled `module` has a kernel for these features' device and dtype."""
    device = features[0].device.type
    if device == "cuda" and not hasattr(module, "fused_head_cuda"):
        return False
    return features[0].dtype in _FEATURE_DTYPES.get(device, ())


def can_run(features: Sequence[Tensor]) -> bool:
    """Whether the compiled extension can score these (already checked) features."""
    module = native()
    return module is not None and _has_kernel(module, features) and size_error(features) is None


@functools.lru_cache(maxsize=64)
def _resample(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # Cached: a host-to-device copy cannot happen inside CUDA graph capture (the first call, outside
    # the capture, fills the cache).
    i0, i1, lambda1 = resample_plan(in_size, out_size)
    return i0.to(device), i1.to(device), lambda1.float().to(device)


@torch.no_grad()
def fused_patch_scores(head, features: Sequence[Tensor], compute_dtype: torch.dtype = torch.float32,
                       out: Tensor | None = None) -> Tensor:
    """[B, H2, W2] patch scores through the compiled kernels (SPEC 4); features already checked.

    `out`, if given, is a contiguous float32 [B, H2, W2] tensor on the features' device that
    receives the scores (and is returned): tests pass a poisoned one to see every score written,
    bench/bench_gpu.py a preallocated one to time the kernels alone.
    """
    module = native()
    f2, f3 = features
    device = f2.device
    if module is None:
        raise RuntimeError("the compiled extension simplenet_fast._C is not available; "
                           "reinstall the package or use fused=False")
    too_large = size_error(features)
    if too_large is not None:
        raise ValueError(too_large)
    if not _has_kernel(module, features):
        raise ValueError(f"the fused head has no kernel for {device.type} {f2.dtype} features; "
                         "use fused=False")
    if compute_dtype not in _COMPUTE_DTYPES.get(device.type, ()):
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES.get(device.type, ())} on "
                         f"{device.type}, got {compute_dtype}")
    batch, _, h2, w2 = f2.shape
    _, _, h3, w3 = f3.shape
    if out is None:
        scores = torch.empty(batch, h2, w2, dtype=torch.float32, device=device)
    elif (out.shape != (batch, h2, w2) or out.dtype != torch.float32 or out.device != device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [{batch}, {h2}, {w2}] float32 tensor on {device}, "
                         f"got {list(out.shape)} {out.dtype} on {out.device}")
    else:
        scores = out
    if batch == 0:
        return scores
    # One contiguous NCHW copy at most (channels-last and strided inputs land here, and on the
    # CPU bfloat16 maps, widened in the same pass).
    dtype = torch.float32 if device.type == "cpu" else f2.dtype
    f2, f3 = (f.contiguous() if f.dtype == dtype else f.to(dtype, memory_format=torch.contiguous_format)
              for f in (f2, f3))
    folded: FoldedHead = head.folded(device)
    weight2, weight3 = folded.weight2, folded.weight3
    if compute_dtype != torch.float32:
        weight2, weight3 = head.folded_weights(device, compute_dtype)
    # The layer3 term [B, H3, W3, hidden], then the CUDA kernel's partial scores (csrc/head.h).
    workspace = torch.empty(batch * h3 * w3 * folded.hidden + module.MAX_HIDDEN_SPLITS * batch * h2 * w2,
                            dtype=torch.float32, device=device)
    up_y = _resample(h3, h2, device)
    up_x = _resample(w3, w2, device)
    params = {
        "batch": batch, "c2": f2.shape[1], "h2": h2, "w2": w2, "c3": f3.shape[1], "h3": h3, "w3": w3,
        "hidden": folded.hidden, "feature_dtype": _DTYPE_CODES[f2.dtype],
        "compute_dtype": _DTYPE_CODES[compute_dtype], "negative_slope": folded.negative_slope,
        "pool2_index": folded.pool2.index.data_ptr(), "pool2_weight": folded.pool2.weight.data_ptr(),
        "pool2_columns": folded.pool2.columns, "pool2_width": folded.pool2.width,
        "pool3_index": folded.pool3.index.data_ptr(), "pool3_weight": folded.pool3.weight.data_ptr(),
        "pool3_columns": folded.pool3.columns, "pool3_width": folded.pool3.width,
        "up_y_i0": up_y[0].data_ptr(), "up_y_i1": up_y[1].data_ptr(), "up_y_lambda1": up_y[2].data_ptr(),
        "up_x_i0": up_x[0].data_ptr(), "up_x_i1": up_x[1].data_ptr(), "up_x_lambda1": up_x[2].data_ptr(),
        "layer2": f2.data_ptr(), "layer3": f3.data_ptr(),
        "weight2": weight2.data_ptr(), "weight3": weight3.data_ptr(),
        "bias": folded.bias.data_ptr(), "w_out": folded.w_out.data_ptr(),
        "workspace": workspace.data_ptr(), "scores": scores.data_ptr(),
    }
    if device.type == "cpu":
        module.fused_head_cpu(params)
    else:
        with torch.cuda.device(device):  # the runtime reads the current device (shared memory limit)
            module.fused_head_cuda(params, torch.cuda.current_stream(device).cuda_stream)
    return scores
