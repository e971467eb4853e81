"""SPEC.md section 4: fold the head into pooling plans, one matrix and a bias.

Everything here is computed once per weight state (cached by `SimpleNetHead.folded`), in float64
so that the fold adds no error of its own, then stored in float32.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .head import PATCH_SIZE

TAPS = PATCH_SIZE**2


def adaptive_pool_matrix(length: int, out: int) -> Tensor:
    """[out, length] float64 matrix of adaptive_avg_pool1d (SPEC 1.6's window rule)."""
    matrix = torch.zeros(out, length, dtype=torch.float64)
    for i in range(out):
        start = (i * length) // out
        end = -((-(i + 1) * length) // out)  # ceil((i+1)*length/out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@dataclass(frozen=True)
class PoolPlanTensors:
    """One layer's composed pooling (SPEC 4) as a padded sparse matrix, see csrc/head.h."""

    index: Tensor    # [columns, width] int32, unfolded index c*9 + ky*3 + kx
    weight: Tensor   # [columns, width] float32, 0 on padding entries
    target_dims: Tensor  # [columns] int64, which target dim each column feeds

    @property
    def columns(self) -> int:
        return self.index.shape[0]

    @property
    def width(self) -> int:
        return self.index.shape[1]


@functools.lru_cache(maxsize=16)
def pooling_plans(channels: tuple[int, int], pretrain_dim: int, target_dim: int
                  ) -> tuple[PoolPlanTensors, PoolPlanTensors]:
    """Compose SPEC 1.5 (per layer, to pretrain_dim) and 1.6 (stacked, to target_dim).

    Cached: the plans depend on the sizes only, so a weight update refolds the matrices alone
    (the plans' tensors are shared, never written).

    target = B[:, :P] @ A2 @ u2 + B[:, P:] @ A3 @ u3. Rows of B[:, :P] @ A2 that are nonzero are
    the layer2 columns; a target dim whose window straddles both layers gets a column in each.
    """
    aggregate = adaptive_pool_matrix(2 * pretrain_dim, target_dim)
    plans = []
    for layer, c in enumerate(channels):
        per_layer = adaptive_pool_matrix(c * TAPS, pretrain_dim)
        composed = aggregate[:, layer * pretrain_dim:(layer + 1) * pretrain_dim] @ per_layer
        rows = torch.nonzero(composed.abs().sum(1) > 0).flatten()
        entries = [torch.nonzero(composed[r]).flatten() for r in rows]
        width = max(len(e) for e in entries)
        index = torch.zeros(len(rows), width, dtype=torch.int32)
        weight = torch.zeros(len(rows), width, dtype=torch.float64)
        for j, (r, e) in enumerate(zip(rows, entries)):
            index[j, :len(e)] = e.to(torch.int32)
            weight[j, :len(e)] = composed[r, e]
        plans.append(PoolPlanTensors(index, weight.float(), rows))
    return plans[0], plans[1]


def resample_plan(in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """torch's bilinear index rule, align_corners=False (SPEC 1.4): i0, i1 int32, lambda1 float64."""
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    return i0.int(), i1.int(), src - i0


@dataclass(frozen=True)
class FoldedHead:
    """The head of SPEC 4: h = W2 @ pool2(f2) + up(W3 @ pool3(f3)) + bias; score = -w_out.lrelu(h)."""

    pool2: PoolPlanTensors
    pool3: PoolPlanTensors
    weight2: Tensor   # [hidden, pool2.columns] float32
    weight3: Tensor   # [hidden, pool3.columns] float32
    bias: Tensor      # [hidden] float32
    w_out: Tensor     # [hidden] float32
    negative_slope: float

    @property
    def hidden(self) -> int:
        return self.weight2.shape[0]

    def to(self, device: torch.device) -> "FoldedHead":
        def move(x):
            if isinstance(x, Tensor):
                return x.to(device)
            if isinstance(x, PoolPlanTensors):
                return PoolPlanTensors(*(move(getattr(x, f.name)) for f in fields(x)))
            return x
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})


@torch.no_grad()
def fold_head(head) -> FoldedHead:
    """The fold of a `SimpleNetHead`'s current weights (see `fold_weights`)."""
    return fold_weights(head.operator_weights(), head.channels, head.pretrain_embed_dim,
                        head.discriminator.bn.eps, head.discriminator.negative_slope)


@torch.no_grad()
def fold_weights(weights: Sequence[Tensor], channels: tuple[int, int], pretrain_embed_dim: int,
                 bn_eps: float, negative_slope: float) -> FoldedHead:
    """BN into the first layer, the adaptor into both (SPEC 4), in float64, on the weights' device.

    weights: the head's raw tensors in `SimpleNetHead.operator_weights` order: adaptor weight and
    bias, first discriminator layer weight and bias, BN weight, bias, running mean and variance,
    tail weight. The pooling plans and the stored fold are on the CPU.
    """
    wa, ba, w1, b1, gamma, beta, mean, var, tail = (w.detach().double() for w in weights)
    scale = gamma / torch.sqrt(var + bn_eps)
    weight = scale[:, None] * (w1 @ wa)                           # [hidden, target]
    bias = scale * (w1 @ ba + b1 - mean) + beta
    pool2, pool3 = pooling_plans(channels, pretrain_embed_dim, wa.shape[0])
    return FoldedHead(
        pool2=pool2,
        pool3=pool3,
        weight2=weight[:, pool2.target_dims.to(weight.device)].float().contiguous().cpu(),
        weight3=weight[:, pool3.target_dims.to(weight.device)].float().contiguous().cpu(),
        bias=bias.float().cpu(),
        w_out=tail.reshape(-1).float().cpu(),
        negative_slope=float(negative_slope),
    )


def pooled_features(feature: Tensor, plan: PoolPlanTensors) -> Tensor:
    """[B, C, H, W] -> [B, columns, H*W]: the composed pooling as one sparse matmul of the unfold."""
    b, c, h, w = feature.shape
    unfolded = F.unfold(feature, kernel_size=PATCH_SIZE, padding=PATCH_SIZE // 2)  # [B, C*9, H*W]
    rows = torch.arange(plan.columns, device=feature.device).repeat_interleave(plan.width)
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, plan.index.flatten().long()]), plan.weight.flatten().to(feature.dtype),
        (plan.columns, c * TAPS), check_invariants=False,
    )
    pooled = torch.sparse.mm(matrix, unfolded.transpose(0, 1).reshape(c * TAPS, b * h * w))
    return pooled.reshape(plan.columns, b, h * w).transpose(0, 1)


def upsample_hidden(hidden3: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, hidden, H3, W3] -> [B, hidden, H2, W2]: bilinear commutes with the linear map (SPEC 4)."""
    return F.interpolate(hidden3, size=size, mode="bilinear", align_corners=False)


def folded_patch_scores_torch(folded: FoldedHead, f2: Tensor, f3: Tensor) -> Tensor:
    """SPEC 4 in plain PyTorch: the baseline the compiled kernels must beat and a fallback.

    Written to be fast in PyTorch terms: one sparse matmul per layer for the pooling, the bias
    fused into the GEMM, the upsampled layer3 term and the LeakyReLU in place, a GEMV for w_out.
    """
    b, _, h2, w2 = f2.shape
    _, _, h3, w3 = f3.shape
    dtype = f2.dtype
    weight2, weight3 = folded.weight2.to(dtype), folded.weight3.to(dtype)
    hidden3 = torch.matmul(weight3, pooled_features(f3, folded.pool3))          # [B, hidden, L3]
    hidden = torch.baddbmm(folded.bias.to(dtype)[None, :, None], weight2.expand(b, -1, -1),
                           pooled_features(f2, folded.pool2))                    # [B, hidden, L2]
    hidden += upsample_hidden(hidden3.reshape(b, -1, h3, w3), (h2, w2)).reshape(b, -1, h2 * w2)
    F.leaky_relu_(hidden, folded.negative_slope)
    return -torch.matmul(folded.w_out.to(dtype), hidden).reshape(b, h2, w2)


def gflop_per_image(folded: FoldedHead, grid2: tuple[int, int], grid3: tuple[int, int]) -> float:
    """Multiply-adds of the folded GEMMs, x2, in GFLOP (SPEC 4 quotes 2.5 for the paper)."""
    return 2.0 * folded.hidden * (folded.pool2.columns * math.prod(grid2)
                                  + folded.pool3.columns * math.prod(grid3)) / 1e9
