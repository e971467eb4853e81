"""The fused head as PyTorch operators (registered with `torch.library` when simplenet_fast is
imported), so that it embeds in models like any native op: eager, `torch.compile` (no graph
break) and `torch.export` (the operator appears in the `ExportedProgram`).

`torch.ops.simplenet_fast.patch_scores(layer2, layer3, adaptor_weight, adaptor_bias,
linear_weight, linear_bias, bn_weight, bn_bias, bn_running_mean, bn_running_var, tail_weight,
pretrain_embed_dim, bn_eps, negative_slope, compute_dtype=torch.float32, check_finite=True)`
  -> float32 `[B, H2, W2]` patch scores (SPEC 1.9), on the features' device.

- Inputs are the backbone maps and the head's raw tensors (`SimpleNetHead.operator_weights()`),
  not a folded copy: an exported program carries the head's own state dict, and a weight update
  takes effect at the next call. The SPEC 4 fold and the CPU kernel's packed weights are built
  inside the kernel, once per weight state, and cached (`_fused._WeightStateCache`): opaque to
  the compiler, so a compiled graph holds one call of the operator.
- Kernels for CPU (float32 features) and CUDA (float32 or bfloat16 features; `compute_dtype`
  bfloat16 runs the GEMMs on tensor cores), on the current CUDA stream. The fake implementation
  gives the output's shape and dtype without running anything, after the same input checks
  (`_fused.check_inputs`): eager calls, torch.compile and torch.export refuse bad inputs with the
  same ValueError.
- `check_finite=True` raises the ValueError of `head.check_scores` when a score is NaN or Inf
  (SPEC 6, "NaN never passes"). The check is inside the kernel, so it costs no graph break; on
  CUDA it waits for the device (pass False for CUDA-graph capture and check afterwards).
- Inference-only: features that require grad are refused, and no gradient flows to the
  weights (differentiating the output raises).

`torch.ops.simplenet_fast.check_finite_scores(scores, layer2, layer3)` is the same check for the
reference path (any scores): it returns a copy of `scores`, or raises; gradients pass through.

`torch.ops.simplenet_fast.anomaly_map(patch_scores, height, width, sigma)` is
`simplenet_fast.anomaly_map` (SPEC 1.10): its per-axis operators are built once per size and
device and cached, which a trace must not see (a traced call would cache a fake tensor, and
their construction is not traceable); as an operator it is one node of the graph.

`SimpleNetHead.patch_scores` runs the first two, `simplenet_fast.anomaly_map` the third. To load
a saved `ExportedProgram` that contains them, `import simplenet_fast` before `torch.export.load`
(README, "The fused head in your own inference code").
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _fused
from .head import check_scores
from .postprocess import axis_operator, check_map_inputs, map_from_scores

__all__ = ["patch_scores", "check_finite_scores", "anomaly_map"]


@torch.library.custom_op("simplenet_fast::patch_scores", mutates_args=())
def patch_scores(layer2: Tensor, layer3: Tensor, adaptor_weight: Tensor, adaptor_bias: Tensor,
                 linear_weight: Tensor, linear_bias: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                 bn_running_mean: Tensor, bn_running_var: Tensor, tail_weight: Tensor,
                 pretrain_embed_dim: int, bn_eps: float, negative_slope: float,
                 compute_dtype: torch.dtype = torch.float32, check_finite: bool = True) -> Tensor:
    """Devices without a kernel: the checks say so (module doc)."""
    _fused.check_inputs([layer2, layer3], [adaptor_weight, adaptor_bias, linear_weight,
                                           linear_bias, bn_weight, bn_bias, bn_running_mean,
                                           bn_running_var, tail_weight],
                        pretrain_embed_dim, bn_eps, negative_slope, compute_dtype)
    raise ValueError(f"the fused head has no kernel for {layer2.device.type}; use fused=False")


@patch_scores.register_kernel(("cpu", "cuda"))
def _patch_scores_kernel(layer2, layer3, *weights_and_config):
    *weights, pretrain_embed_dim, bn_eps, negative_slope, compute_dtype, check_finite = \
        _with_defaults(weights_and_config)
    features = [layer2, layer3]
    scores = _fused.run(features, weights, pretrain_embed_dim, bn_eps, negative_slope, compute_dtype)
    if check_finite:
        check_scores(scores, features)
    return scores


@patch_scores.register_fake
def _patch_scores_fake(layer2, layer3, *weights_and_config):
    *weights, pretrain_embed_dim, bn_eps, negative_slope, compute_dtype, _ = \
        _with_defaults(weights_and_config)
    _fused.check_inputs([layer2, layer3], weights, pretrain_embed_dim, bn_eps, negative_slope,
                        compute_dtype)
    return layer2.new_empty(layer2.shape[0], layer2.shape[2], layer2.shape[3], dtype=torch.float32)


def _with_defaults(weights_and_config: tuple) -> tuple:
    """The positional tail of a call, with the defaults of compute_dtype and check_finite."""
    defaults = (torch.float32, True)
    missing = len(_fused.WEIGHT_NAMES) + 5 - len(weights_and_config)
    return (*weights_and_config, *defaults[len(defaults) - missing:]) if missing > 0 else weights_and_config


def _refuse_feature_grads(ctx, inputs, output) -> None:
    if inputs[0].requires_grad or inputs[1].requires_grad:
        raise ValueError("the fused head is inference-only: features require grad; "
                         "use fused=False to differentiate through the reference")


def _no_backward(ctx, grad):
    raise ValueError("the fused head is inference-only: it has no gradient with respect to the "
                     "head's weights; train through the reference (fused=False)")


patch_scores.register_autograd(_no_backward, setup_context=_refuse_feature_grads)


@torch.library.custom_op("simplenet_fast::check_finite_scores", mutates_args=())
def check_finite_scores(scores: Tensor, layer2: Tensor, layer3: Tensor) -> Tensor:
    """A copy of `scores`, or the ValueError of `head.check_scores` when one is NaN or Inf."""
    check_scores(scores, [layer2, layer3])
    return scores.clone()


@check_finite_scores.register_fake
def _check_finite_scores_fake(scores, layer2, layer3):
    return torch.empty_like(scores)


def _keep_context(ctx, inputs, output) -> None:
    pass


def _pass_gradient(ctx, grad):
    return grad, None, None


check_finite_scores.register_autograd(_pass_gradient, setup_context=_keep_context)


@torch.library.custom_op("simplenet_fast::anomaly_map", mutates_args=())
def anomaly_map(patch_scores: Tensor, height: int, width: int, sigma: float) -> Tensor:
    """`postprocess.anomaly_map`: [B, h, w] scores -> [B, height, width] map, on any device."""
    return map_from_scores(patch_scores, check_map_inputs(patch_scores, (height, width), sigma), sigma)


@anomaly_map.register_fake
def _anomaly_map_fake(patch_scores, height, width, sigma):
    check_map_inputs(patch_scores, (height, width), sigma)
    return patch_scores.new_empty(patch_scores.shape[0], height, width)


def _save_map_geometry(ctx, inputs, output) -> None:
    scores, height, width, sigma = inputs
    ctx.geometry = (scores.shape[1], scores.shape[2], height, width, float(sigma))


def _map_gradient(ctx, grad):
    # The map is rows @ scores @ cols.T (linear): its gradient is rows.T @ grad @ cols.
    h, w, height, width, sigma = ctx.geometry
    rows = axis_operator(h, height, sigma, grad.device, grad.dtype)
    cols = axis_operator(w, width, sigma, grad.device, grad.dtype)
    return torch.matmul(torch.matmul(rows.T, grad), cols), None, None, None


anomaly_map.register_autograd(_map_gradient, setup_context=_save_map_geometry)
