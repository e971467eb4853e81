"""The one checked entry point into the compiled fused head (STYLE.md, "The Python / C++ boundary").

Every shape, dtype, device and contiguity check happens here, once; csrc/ trusts what it gets.
CPU vs CUDA is dispatched here and nowhere else. `simplenet_fast.ops` registers the entry as the
PyTorch operator `torch.ops.simplenet_fast.patch_scores`; its fake (shape-only) implementation
runs the same checks, so eager calls, torch.compile and torch.export refuse the same inputs with
the same messages.

What the kernels need besides the features (the SPEC 4 fold, the pooling plans, the CPU kernel's
packed weights) is built once per weight state and device by `prepare`, and cached.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from ._fold import FoldedHead, fold_weights, resample_plan
from ._native import native

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# What the compiled kernels take, per device type: feature dtypes and GEMM operand dtypes.
# The CPU kernel reads float32; bfloat16 maps (a bf16 backbone's) are widened to it, exactly, in
# the one copy the wrapper makes anyway (below): 1M values per 288 px WideResNet image, ~1 ms.
_FEATURE_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16)}
_COMPUTE_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}
# The head's raw tensors, in the operator's order (`SimpleNetHead.operator_weights`).
WEIGHT_NAMES = ("adaptor_weight", "adaptor_bias", "linear_weight", "linear_bias", "bn_weight",
                "bn_bias", "bn_running_mean", "bn_running_var", "tail_weight")


def check_features(features: Sequence[Tensor], channels: Sequence[int] | None = None) -> None:
    """Raise a ValueError naming what was expected unless `features` are two backbone maps (with
    `channels` channels, when given)."""
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) != 2:
        raise ValueError("features must be a list of the two backbone maps "
                         "[layer2 [B, C2, H2, W2], layer3 [B, C3, H3, W3]]")
    for name, f, c in zip(("layer2", "layer3"), features, channels or ("C2", "C3")):
        if not isinstance(f, Tensor):
            raise ValueError(f"{name} features must be a torch.Tensor, got {type(f).__name__}")
        if f.layout != torch.strided or f.is_meta:
            raise ValueError(f"{name} features must be a dense tensor with data, got layout "
                             f"{f.layout} on {f.device}")
        if f.dim() != 4 or (channels is not None and f.shape[1] != c) or not f.is_floating_point():
            raise ValueError(f"{name} features must be [B, {c}, H, W] floating point, "
                             f"got {list(f.shape)} {str(f.dtype).replace('torch.', '')}")
        if min(f.shape[1:]) <= 0:
            raise ValueError(f"{name} features must have channels and a non-empty grid, got "
                             f"{list(f.shape)}")
    f2, f3 = features
    if f2.shape[0] != f3.shape[0]:
        raise ValueError(f"layer2 and layer3 batch sizes differ: {f2.shape[0]} vs {f3.shape[0]}")
    if f2.device != f3.device or f2.dtype != f3.dtype:
        raise ValueError(f"layer2 and layer3 must share device and dtype, got {f2.device}/{f2.dtype} "
                         f"and {f3.device}/{f3.dtype}")
    # NaN / Inf are caught on the (much smaller) scores, which every value the answer depends on
    # reaches: see head.check_scores. Checking the maps here costs a full pass over them per call.


def check_weights(weights: Sequence[Tensor], device: torch.device) -> tuple[int, int]:
    """Raise a ValueError unless `weights` are a head's raw tensors (WEIGHT_NAMES order) with
    consistent shapes, floating point, dense, on `device`; returns (target_embed_dim, hidden)."""
    if not isinstance(weights, (list, tuple)) or len(weights) != len(WEIGHT_NAMES):
        raise ValueError(f"the head's weights are {len(WEIGHT_NAMES)} tensors {WEIGHT_NAMES}")
    for name, w in zip(WEIGHT_NAMES, weights):
        if not isinstance(w, Tensor) or w.layout != torch.strided or not w.is_floating_point():
            raise ValueError(f"{name} must be a dense floating point tensor, got "
                             f"{getattr(w, 'dtype', type(w).__name__)}")
        if w.device != device:
            raise ValueError(f"{name} is on {w.device}, the features on {device}: move the head "
                             "to the features' device")
    target = weights[0].shape[0] if weights[0].dim() else 0
    hidden = weights[2].shape[0] if weights[2].dim() else 0
    # WEIGHT_NAMES order: adaptor [T, T] and [T]; first layer [H, T] and [H]; BN 4 x [H]; tail [1, H]
    expected = ((target, target), (target,), (hidden, target), (hidden,), (hidden,), (hidden,),
                (hidden,), (hidden,), (1, hidden))
    for name, w, shape in zip(WEIGHT_NAMES, weights, expected):
        if w.shape != shape or target <= 0 or hidden <= 0:
            raise ValueError(f"{name} must be {list(shape)} (target_embed_dim {target}, "
                             f"hidden {hidden}), got {list(w.shape)}")
    return target, hidden


def check_inputs(features: Sequence[Tensor], weights: Sequence[Tensor], pretrain_embed_dim: int,
                 bn_eps: float, negative_slope: float, compute_dtype: torch.dtype) -> None:
    """Everything the kernels need to be true of one call, short of the compiled module being
    there (see `_kernel_error`). Runs on real and on fake (shape-only) tensors alike."""
    check_features(features)
    device = features[0].device
    check_weights(weights, device)
    integer = isinstance(pretrain_embed_dim, (int, torch.SymInt)) and not isinstance(pretrain_embed_dim, bool)
    if not integer or pretrain_embed_dim <= 0:
        raise ValueError(f"pretrain_embed_dim must be a positive int, got {pretrain_embed_dim!r}")
    for name, value, low in (("bn_eps", bn_eps, 0.0), ("negative_slope", negative_slope, -math.inf)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise ValueError(f"{name} must be a finite number{' >= 0' if low == 0 else ''}, "
                             f"got {value!r}")
    if features[0].dtype not in _FEATURE_DTYPES.get(device.type, ()):
        raise ValueError(f"the fused head has no kernel for {device.type} {features[0].dtype} "
                         "features; use fused=False")
    if compute_dtype not in _COMPUTE_DTYPES.get(device.type, ()):
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES.get(device.type, ())} on "
                         f"{device.type}, got {compute_dtype}")
    too_large = size_error(features)
    if too_large is not None:
        raise ValueError(too_large)
    if any(f.requires_grad for f in features) and torch.is_grad_enabled():
        raise ValueError("the fused head is inference-only: features require grad; "
                         "use fused=False to differentiate through the reference")


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


def max_batch(grid2: Sequence[int], grid3: Sequence[int]) -> int:
    """The largest batch `size_error` lets through for these grids (torch.export's batch bound)."""
    return _MAX_LOCATIONS // max(math.prod(grid2), math.prod(grid3))


def _kernel_error(module, device: torch.device) -> str | None:
    if module is None:
        return ("the compiled extension simplenet_fast._C is not available; reinstall the package "
                "or use fused=False")
    if device.type == "cuda" and not hasattr(module, "fused_head_cuda"):
        return "simplenet_fast._C was built without CUDA kernels; use fused=False"
    return None


def can_run(features: Sequence[Tensor]) -> bool:
    """Whether the compiled extension can score these (already checked) features."""
    f2 = features[0]
    return (_kernel_error(native(), f2.device) is None
            and f2.dtype in _FEATURE_DTYPES.get(f2.device.type, ()) and size_error(features) is None)


# ---------------------------------------------------------------------------------- prepared weights
@dataclass(frozen=True)
class Prepared:
    """What the kernels read besides the features, for one weight state, device and GEMM dtype."""

    folded: FoldedHead   # on the device
    weight2: Tensor      # CPU: float32 packed by _C.pack_weight_cpu; CUDA: [hidden, d2] compute dtype
    weight3: Tensor
    # The kernel's params of each grid seen (see grid_params); a few grids at most.
    grids: dict = field(default_factory=dict, compare=False)

    MAX_GRIDS = 8

    def grid_params(self, h2: int, w2: int, h3: int, w3: int) -> tuple[dict, list[Tensor]]:
        """The kernel's params (csrc/head.h) that depend on the weights and the grid only, and
        the tensors they point into (the layer3 resampling, and on the CPU the pooling tables):
        built once per grid. The caller holds the pair until the kernel returns: another thread
        may drop it from `grids` meanwhile (a race builds an entry twice, or evicts it)."""
        key = (h2, w2, h3, w3)
        entry = self.grids.get(key)
        if entry is None:
            entry = self._grid_entry(h2, w2, h3, w3)
            if len(self.grids) >= self.MAX_GRIDS:
                self.grids.clear()
            self.grids[key] = entry
        return entry

    def _grid_entry(self, h2: int, w2: int, h3: int, w3: int) -> tuple[dict, list[Tensor]]:
        folded = self.folded
        device = folded.bias.device
        tensors = {"weight2": self.weight2, "weight3": self.weight3, "bias": folded.bias,
                   "w_out": folded.w_out, "pool2_index": folded.pool2.index,
                   "pool2_weight": folded.pool2.weight, "pool3_index": folded.pool3.index,
                   "pool3_weight": folded.pool3.weight}
        for axis, (size3, size2) in (("y", (h3, h2)), ("x", (w3, w2))):
            i0, i1, lambda1 = resample_plan(size3, size2)
            tensors.update({f"up_{axis}_i0": i0.to(device), f"up_{axis}_i1": i1.to(device),
                            f"up_{axis}_lambda1": lambda1.float().to(device)})
        if device.type == "cpu":  # the CPU kernel's pooling tables (head.h's PoolPlan)
            (tensors["pool2_offset"], tensors["pool2_neighbour"]) = _pool_tables(folded.pool2, h2, w2)
            (tensors["pool3_offset"], tensors["pool3_neighbour"]) = _pool_tables(folded.pool3, h3, w3)
        params = {name: t.data_ptr() for name, t in tensors.items()}
        params.update(h2=h2, w2=w2, h3=h3, w3=w3, hidden=folded.hidden,
                      negative_slope=folded.negative_slope,
                      pool2_columns=folded.pool2.columns, pool2_width=folded.pool2.width,
                      pool3_columns=folded.pool3.columns, pool3_width=folded.pool3.width)
        return params, list(tensors.values())


def _pool_tables(plan, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Where each plan entry u = c*9 + ky*3 + kx reads the [C, H, W] map: offset c*H*W +
    (ky-1)*W + (kx-1) (int64), and its neighbour ky*3 + kx (int32) (csrc/head.h)."""
    u = plan.index.long()
    channel, neighbour = u // 9, u % 9
    offset = channel * (height * width) + (neighbour // 3 - 1) * width + (neighbour % 3 - 1)
    return offset.contiguous(), neighbour.int().contiguous()


class _WeightStateCache:
    """Values derived from a head's weights (the fold, the kernels' weight layout), rebuilt when a
    weight changes; thread-safe, at most MAX_ENTRIES entries, least recently used dropped first.

    A weight state is each tensor's storage (identified by its StorageImpl, held by a weak
    reference so that no other storage can take its place while the entry lives), place in it,
    and version counter, which every in-place change bumps (an optimiser step, load_state_dict,
    .copy_). Entries do not keep the weights alive: those of freed weights are dropped. Weights
    created under torch.inference_mode have no version counter: their values are rebuilt on
    every call.
    """

    MAX_ENTRIES = 16

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.RLock()  # held while building (racing threads build once); a
        # build may ask for another entry (the kernel layout for the fold)

    def get(self, key: tuple, weights: Sequence[Tensor], build):
        versions = weights_versions(weights)
        storages = [w.untyped_storage() for w in weights]
        key = (key, tuple((s._cdata, w.storage_offset(), tuple(w.shape), w.stride(), w.dtype)
                          for s, w in zip(storages, weights)))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and versions is not None and entry[0] == versions:
                self._entries.move_to_end(key)
                return entry[2]
            value = build()
            if versions is not None:
                for dead in [k for k, e in self._entries.items() if any(r.expired() for r in e[1])]:
                    del self._entries[dead]
                self._entries[key] = (versions, [StorageWeakRef(s) for s in storages], value)
                self._entries.move_to_end(key)
                while len(self._entries) > self.MAX_ENTRIES:
                    self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = _WeightStateCache()


def weights_versions(weights: Sequence[Tensor]) -> tuple | None:
    """Version counters of `weights`, or None when one is an inference tensor (it has none)."""
    if any(w.is_inference() for w in weights):
        return None
    return tuple(w._version for w in weights)


def folded(weights: Sequence[Tensor], channels: tuple[int, int], pretrain_embed_dim: int,
           bn_eps: float, negative_slope: float, device: torch.device) -> FoldedHead:
    """The SPEC 4 fold of `weights` on `device`, cached per weight state (`_WeightStateCache`)."""
    config = (tuple(channels), int(pretrain_embed_dim), float(bn_eps), float(negative_slope))
    return _CACHE.get(("fold", config, device), weights,
                      lambda: fold_weights(weights, *config).to(device))


def prepare(weights: Sequence[Tensor], channels: tuple[int, int], pretrain_embed_dim: int,
            bn_eps: float, negative_slope: float, device: torch.device,
            compute_dtype: torch.dtype = torch.float32) -> Prepared:
    """The fold and the kernel's weight layout on `device`, cached likewise; inputs checked."""
    config = (tuple(channels), int(pretrain_embed_dim), float(bn_eps), float(negative_slope))

    def build() -> Prepared:
        fold = folded(weights, *config, device)
        if device.type == "cpu":
            return Prepared(fold, _pack(fold.weight2), _pack(fold.weight3))
        return Prepared(fold, fold.weight2.to(compute_dtype), fold.weight3.to(compute_dtype))

    return _CACHE.get(("kernel", config, device, compute_dtype), weights, build)


def _pack(weight: Tensor) -> Tensor:
    """A float32 [rows, depth] CPU matrix in the CPU kernel's packed layout (csrc/head.h)."""
    module = native()
    rows, depth = weight.shape
    weight = weight.contiguous()
    packed = torch.empty(module.packed_weight_floats_cpu(rows, depth), dtype=torch.float32)
    module.pack_weight_cpu(weight.data_ptr(), rows, depth, packed.data_ptr())
    return packed


# ---------------------------------------------------------------------------------- entry points
def run(features: Sequence[Tensor], weights: Sequence[Tensor], pretrain_embed_dim: int,
        bn_eps: float, negative_slope: float, compute_dtype: torch.dtype = torch.float32,
        out: Tensor | None = None) -> Tensor:
    """[B, H2, W2] float32 patch scores through the compiled kernels (SPEC 4): checks everything,
    then launches on the features' device (the current CUDA stream there).

    `out`, if given, is a contiguous float32 [B, H2, W2] tensor on the features' device that
    receives the scores (and is returned): tests pass a poisoned one to see every score written,
    bench/bench_gpu.py a preallocated one to time the kernels alone.
    """
    check_inputs(features, weights, pretrain_embed_dim, bn_eps, negative_slope, compute_dtype)
    f2, f3 = features
    device = f2.device
    module = native()
    error = _kernel_error(module, device)
    if error is not None:
        raise RuntimeError(error)
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
    with torch.no_grad():
        prepared = prepare(weights, (f2.shape[1], f3.shape[1]), pretrain_embed_dim, bn_eps,
                           negative_slope, device, compute_dtype)
        _launch(module, prepared, f2, f3, compute_dtype, scores)
    return scores


def fused_patch_scores(head, features: Sequence[Tensor], compute_dtype: torch.dtype = torch.float32,
                       out: Tensor | None = None) -> Tensor:
    """`run` with a `SimpleNetHead`'s weights: [B, H2, W2] patch scores, no finiteness check."""
    disc = head.discriminator
    return run(features, head.operator_weights(), head.pretrain_embed_dim, disc.bn.eps,
               disc.negative_slope, compute_dtype, out)


def _launch(module, prepared: Prepared, f2: Tensor, f3: Tensor, compute_dtype: torch.dtype,
            scores: Tensor) -> None:
    """One kernel call on checked, contiguous NCHW features (csrc/head.h's params)."""
    batch, c2, h2, w2 = f2.shape
    _, c3, h3, w3 = f3.shape
    device = f2.device
    # The layer3 term [B, H3, W3, hidden], then the CUDA kernel's partial scores (csrc/head.h).
    workspace = torch.empty(batch * h3 * w3 * prepared.folded.hidden
                            + module.MAX_HIDDEN_SPLITS * batch * h2 * w2,
                            dtype=torch.float32, device=device)
    grid, alive = prepared.grid_params(h2, w2, h3, w3)  # `alive` until the kernel returns
    params = dict(grid)
    params.update(batch=batch, c2=c2, c3=c3, feature_dtype=_DTYPE_CODES[f2.dtype],
                  compute_dtype=_DTYPE_CODES[compute_dtype], layer2=f2.data_ptr(),
                  layer3=f3.data_ptr(), workspace=workspace.data_ptr(), scores=scores.data_ptr())
    if device.type == "cpu":
        module.fused_head_cpu(params)
    else:
        with torch.cuda.device(device):  # the runtime reads the current device (shared memory limit)
            module.fused_head_cuda(params, torch.cuda.current_stream(device).cuda_stream)
    del alive
