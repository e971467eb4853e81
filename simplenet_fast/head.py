"""The SimpleNet head: everything after the backbone (SPEC.md sections 1.3-1.9 and 5).

`SimpleNetHead.reference_patch_scores` is the pure-PyTorch reference. It follows SPEC section 1
literally, the way the authors' code computes it (unfold, per-map layer3 upsample, two adaptive
average pools, adaptor, discriminator, sign), however slow: it is the spec every fast path is
tested against. The fused path (SPEC section 4) lives in `_fold.py` and `_fused.py`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH_SIZE = 3  # SPEC 1.3: 3x3 neighbourhoods, stride 1, zero padding 1


class Discriminator(nn.Module):
    """Linear -> BatchNorm1d -> LeakyReLU(0.2) -> Linear(bias=False) (SPEC 1.8)."""

    def __init__(self, in_dim: int, hidden: int, negative_slope: float = 0.2, bn_eps: float = 1e-5):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden, eps=bn_eps)
        self.negative_slope = negative_slope
        self.tail = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.bn(self.linear(x)), self.negative_slope)
        return self.tail(h).squeeze(-1)


def unfold_neighbourhoods(feature: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H, W, C*9], entry c*9 + ky*3 + kx (SPEC 1.3)."""
    b, c, h, w = feature.shape
    unfolded = F.unfold(feature, kernel_size=PATCH_SIZE, padding=PATCH_SIZE // 2)  # [B, C*9, H*W]
    return unfolded.reshape(b, c * PATCH_SIZE**2, h, w).permute(0, 2, 3, 1)


def upsample_unfolded(unfolded: Tensor, size: tuple[int, int]) -> Tensor:
    """Upsample each of the C*9 unfolded maps on its own, bilinear, align_corners=False (SPEC 1.4)."""
    b, h, w, d = unfolded.shape
    maps = unfolded.permute(0, 3, 1, 2).reshape(b * d, 1, h, w)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.reshape(b, d, *size).permute(0, 2, 3, 1)


def adaptive_mean(x: Tensor, dim: int) -> Tensor:
    """adaptive_avg_pool1d over the last axis, whatever its length (SPEC 1.5 and 1.6)."""
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, x.shape[-1]), dim).reshape(*lead, dim)


class SimpleNetHead(nn.Module):
    """Adaptor and discriminator of SimpleNet, with the reference and fused scoring paths.

    Args:
        channels: channel counts of the two backbone feature maps (stride 8, stride 16).
        pretrain_embed_dim: length each layer's unfolded vector is pooled to (SPEC 1.5).
        target_embed_dim: length of the aggregated patch feature (SPEC 1.6); adaptor width.
        hidden: width of the discriminator's hidden layer (SPEC 1.8).
    """

    def __init__(
        self,
        channels: Sequence[int] = (512, 1024),
        pretrain_embed_dim: int = 1536,
        target_embed_dim: int = 1536,
        hidden: int = 1024,
        negative_slope: float = 0.2,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 2 or min(channels) <= 0:
            raise ValueError(f"channels must be two positive ints (layer2, layer3), got {channels}")
        for name, value in (("pretrain_embed_dim", pretrain_embed_dim),
                            ("target_embed_dim", target_embed_dim), ("hidden", hidden)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.channels = channels
        self.pretrain_embed_dim = int(pretrain_embed_dim)
        self.target_embed_dim = int(target_embed_dim)
        self.hidden = int(hidden)
        self.adaptor = nn.Linear(self.target_embed_dim, self.target_embed_dim)
        self.discriminator = Discriminator(self.target_embed_dim, self.hidden, negative_slope, bn_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init (SPEC 2): xavier_normal_ Linear weights, default biases, BN 1 / 0."""
        for module in (self.adaptor, self.discriminator.linear, self.discriminator.tail):
            module.reset_parameters()  # torch's default bias init, as the official code keeps it
            nn.init.xavier_normal_(module.weight)
        self.discriminator.bn.reset_parameters()

    def config(self) -> dict:
        return {
            "channels": list(self.channels),
            "pretrain_embed_dim": self.pretrain_embed_dim,
            "target_embed_dim": self.target_embed_dim,
            "hidden": self.hidden,
            "negative_slope": self.discriminator.negative_slope,
            "bn_eps": self.discriminator.bn.eps,
        }

    # ----------------------------------------------------------------------------- reference
    def embed(self, features: Sequence[Tensor]) -> Tensor:
        """Reference patch features (SPEC 1.3-1.6): [B, H2, W2, target_embed_dim]."""
        f2, f3 = features
        u2 = unfold_neighbourhoods(f2)
        u3 = upsample_unfolded(unfold_neighbourhoods(f3), tuple(f2.shape[-2:]))
        pooled = torch.stack(
            [adaptive_mean(u2, self.pretrain_embed_dim), adaptive_mean(u3, self.pretrain_embed_dim)],
            dim=-2,
        )  # [B, H2, W2, 2, P], layer-major as the official aggregator stacks them
        return adaptive_mean(pooled.flatten(-2), self.target_embed_dim)

    def score_embeddings(self, embeddings: Tensor) -> Tensor:
        """Inference scores of patch features: minus the discriminator logit, BN on running stats."""
        disc = self.discriminator
        h = F.batch_norm(
            disc.linear(self.adaptor(embeddings)).reshape(-1, self.hidden),
            disc.bn.running_mean, disc.bn.running_var, disc.bn.weight, disc.bn.bias,
            training=False, eps=disc.bn.eps,
        )
        logits = disc.tail(F.leaky_relu(h, disc.negative_slope)).reshape(embeddings.shape[:-1])
        return -logits

    def reference_patch_scores(self, features: Sequence[Tensor]) -> Tensor:
        """SPEC section 1 literally: [B, H2, W2] patch scores, higher = more anomalous."""
        return self.score_embeddings(self.embed(features))

    # ----------------------------------------------------------------------------- scoring
    def patch_scores(self, features: Sequence[Tensor], fused: bool | None = None,
                     compute_dtype: torch.dtype = torch.float32, check_finite: bool = True) -> Tensor:
        """Raw patch scores [B, H2, W2] of the backbone maps ([B, C2, H2, W2], [B, C3, H3, W3]).

        `fused=False` runs the reference; `fused=True` the compiled extension (SPEC 4) through
        the operator `torch.ops.simplenet_fast.patch_scores` (`simplenet_fast.ops`), which is
        inference-only and raises for inputs that require grad; `fused=None` picks the fused path
        when the extension supports the inputs' device and nothing requires grad.
        `compute_dtype` is the fused GEMMs' operand type (bfloat16 on CUDA uses tensor cores).
        `check_finite=False` skips the NaN / Inf check of the scores, the only step that waits
        for the device: for CUDA-graph capture, with the check done by the caller afterwards.
        The check runs inside an operator on either path, so torch.compile traces this method
        without a graph break.
        """
        from . import _fused, ops

        _fused.check_features(features, self.channels)
        if fused is None:
            fused = _fused.can_run(features) and not _needs_grad(features)
        if not fused:
            # The reference runs in the head's dtype: float16 / bfloat16 features (which have no
            # CPU kernel) are widened to it rather than failing inside F.linear.
            dtype = self.adaptor.weight.dtype
            scores = self.reference_patch_scores([f.to(dtype) for f in features])
            return ops.check_finite_scores(scores, *features) if check_finite else scores
        if _needs_grad(features):
            raise ValueError("the fused head is inference-only: features require grad; "
                             "use fused=False to differentiate through the reference")
        disc = self.discriminator
        # Detached: the fused scores have no gradient with respect to the weights. (Not through
        # torch.no_grad(): a compiled graph that raises inside it leaves grad mode off.)
        weights = [w.detach() for w in self.operator_weights()]
        config = (self.pretrain_embed_dim, disc.bn.eps, disc.negative_slope)
        if torch.compiler.is_compiling():
            # The operator checks in eager calls. Checking in the traced code too lets dynamo
            # raise the ValueError itself (a fake kernel's error reaches the caller wrapped in
            # a TorchRuntimeError); it costs guards, no run time.
            _fused.check_inputs(features, weights, *config, compute_dtype)
        return ops.patch_scores(*features, *weights, *config, compute_dtype, check_finite)

    def folded(self, device: torch.device | str = "cpu"):
        """The SPEC 4 fold of the current weights on `device`, cached until any weight changes."""
        from . import _fused

        disc = self.discriminator
        return _fused.folded(self.operator_weights(), self.channels, self.pretrain_embed_dim,
                             disc.bn.eps, disc.negative_slope, torch.device(device))

    def weights_state(self) -> tuple:
        """Storage and version counter of every tensor the fold reads: an optimiser step,
        load_state_dict or load_official_state_dict changes it. Keys the model's captured CUDA
        graphs (the fold's own cache is `_fused._WeightStateCache`)."""
        return tuple((t.data_ptr(), t._version) for t in self.operator_weights())

    def operator_weights(self) -> list[Tensor]:
        """The head's raw tensors in the order `torch.ops.simplenet_fast.patch_scores` takes them
        (`_fused.WEIGHT_NAMES`): adaptor weight and bias, first discriminator layer weight and
        bias, BN weight, bias, running mean and variance, tail weight. The fold reads these."""
        disc = self.discriminator
        return [self.adaptor.weight, self.adaptor.bias, disc.linear.weight, disc.linear.bias,
                disc.bn.weight, disc.bn.bias, disc.bn.running_mean, disc.bn.running_var,
                disc.tail.weight]

    # ----------------------------------------------------------------------------- official
    def load_official_state_dict(self, checkpoint: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Load the authors' checkpoint layout (`pre_projection`, `discriminator` sub-dicts)."""
        if not isinstance(checkpoint, Mapping) or not {"pre_projection", "discriminator"} <= set(checkpoint):
            raise ValueError("an official SimpleNet checkpoint is a dict with 'pre_projection' and "
                             f"'discriminator' state dicts, got keys {sorted(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__}")
        pre, disc = checkpoint["pre_projection"], checkpoint["discriminator"]
        renamed = {
            "adaptor.weight": pre.get("layers.0fc.weight"),
            "adaptor.bias": pre.get("layers.0fc.bias"),
            "discriminator.linear.weight": disc.get("body.block1.0.weight"),
            "discriminator.linear.bias": disc.get("body.block1.0.bias"),
            "discriminator.bn.weight": disc.get("body.block1.1.weight"),
            "discriminator.bn.bias": disc.get("body.block1.1.bias"),
            "discriminator.bn.running_mean": disc.get("body.block1.1.running_mean"),
            "discriminator.bn.running_var": disc.get("body.block1.1.running_var"),
            "discriminator.bn.num_batches_tracked": disc.get("body.block1.1.num_batches_tracked"),
            "discriminator.tail.weight": disc.get("tail.weight"),
        }
        missing = [k for k, v in renamed.items() if v is None]
        if missing:
            raise ValueError(f"official checkpoint lacks {missing}; only the run.sh layout "
                             "(pre_proj 1, dsc_layers 2) is supported")
        self.load_state_dict({k: torch.as_tensor(v) for k, v in renamed.items()})


def check_scores(scores: Tensor, features: Sequence[Tensor] = ()) -> None:
    """SPEC 6, "NaN never passes": raise instead of returning non-finite scores.

    Every feature value the answer depends on reaches the scores (the pooling multiplies each
    gathered value, and 0 * NaN is NaN), so the inputs are inspected only when the scores are
    not finite, to say which side is at fault.
    """
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        if any(not bool(torch.isfinite(f).all()) for f in features):
            raise ValueError("features contain NaN or Inf")
        bad = int((~torch.isfinite(scores)).sum())
        cause = ("from finite features: its weights hold NaN / Inf, or the features are too "
                 "large for float32" if features else
                 "(the features held NaN / Inf, or the weights do, or the features are too large "
                 "for float32)")
        raise ValueError(f"the head produced NaN or Inf for {bad} of {scores.numel()} patch "
                         f"scores {cause}")


def _needs_grad(features: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(f.requires_grad for f in features)
