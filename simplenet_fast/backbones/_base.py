"""What every backbone shares: the frozen `FeatureExtractor` base and safe state-dict loading.

A backbone here is everything before the SimpleNet head (SPEC 1.2): it maps a normalised image
batch `[B, 3, H, W]` to two feature maps, stride 8 and stride 16. It is always frozen and in eval
mode: SPEC 3 keeps the pretrained BatchNorm statistics untouched, so `train()` cannot switch it
back to training mode and no parameter requires grad.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch
from torch import nn

from ..geometry import RESIZE_MODES, size_pair
from ..recipes import resolve_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHTS_HELP = "weights must be 'imagenet', None (random init) or the path of a local state-dict file"


@dataclass(frozen=True)
class BackboneDefaults:
    """The SimpleNet configuration a backbone recommends, declared next to its definition.

    `SimpleNet(backbone=...)`, `fit()`, the CLI and the benchmarks use these values wherever the
    caller leaves a setting at None (`simplenet_fast.backbones.default_config`).

    image_size:  (height, width) of the model input (an int is a square).
    resize_mode: "crop", "whole" or "pad" (`simplenet_fast.geometry`); crop mode's `resize` keeps
                 the paper's 329 / 288 ratio for any image_size.
    pretrain_embed_dim, target_embed_dim, hidden: head widths (SPEC 1.5, 1.6, 1.8).
    noise_std:   std of the training noise (SPEC 2); it must suit the scale of the features.
    epochs:      training epochs of `fit()`.
    recipe:      how `fit()` trains the head (`simplenet_fast.recipes`): a registered name or a
                 recipe's text form; "paper" (SPEC 2) unless a backbone declares another.
    """

    image_size: tuple[int, int]
    resize_mode: str
    pretrain_embed_dim: int
    target_embed_dim: int
    hidden: int
    noise_std: float
    epochs: int
    recipe: str = "paper"

    def __post_init__(self):
        object.__setattr__(self, "image_size", size_pair(self.image_size))
        resolve_recipe(self.recipe)  # raises on a bad name or text form
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        for name in ("pretrain_embed_dim", "target_embed_dim", "hidden", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "epochs"):
                raise ValueError(f"{name} must be an int >= {int(name != 'epochs')}, got {value!r}")
        if isinstance(self.noise_std, bool) or not isinstance(self.noise_std, (int, float)) \
                or not math.isfinite(self.noise_std) or self.noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    def overridden(self, values: Mapping[str, Any]) -> "BackboneDefaults":
        """These defaults with the given fields replaced (unknown names raise)."""
        unknown = set(values) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown backbone default(s) {sorted(unknown)}; known: "
                             f"{[f.name for f in fields(self)]}")
        return replace(self, **values)


class FeatureExtractor(nn.Module):
    """Frozen backbone: `forward(x) -> [f2, f3]`, stride 8 and stride 16 maps.

    Attributes every extractor carries (the model, the CLI and saved models rely on them):
      name       registry name (`"wide_resnet50_2"`, `"efficientnet_lite0"`), None for a user module
      channels   (C2, C3), channels of the two maps
      strides    (8, 16)
      mean, std  per-channel input normalisation for images scaled to [0, 1]
      weights_id `"imagenet"`, `"random"`, `"file:<sha256>"` or `"custom"` (a user module's own)
      defaults   its recommended `BackboneDefaults` (None: the paper's, WideResNet-50-2's)
      channels_last_input  True when forward runs fastest on channels-last images: `SimpleNet`
                 then hands over its normalised images in that memory order, without a copy
      bfloat16_faster_on  device types ("cpu", "cuda") where running this backbone in bfloat16
                 was measured faster than float32: `precision="auto"` picks bf16 there only
                 (simplenet_fast._precision); empty for a user module (unknown)
      bfloat16_meets_spec  whether its bf16 features were measured close enough to float32 for
                 SPEC 6's bf16 contract; False makes every bf16 request run float32. True for a
                 user module: asking for bf16 is then the user's call
    """

    name: str | None = None
    channels: tuple[int, int] = (0, 0)
    strides: tuple[int, int] = (8, 16)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_id: str = "random"
    defaults: Optional[BackboneDefaults] = None
    channels_last_input: bool = False
    bfloat16_faster_on: tuple[str, ...] = ()
    bfloat16_meets_spec: bool = True

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Always eval: BatchNorm must keep its pretrained statistics (SPEC 3), whatever a caller's
        # `model.train()` cascades down to us.
        return super().train(False)

    def _freeze(self) -> "FeatureExtractor":
        self.requires_grad_(False)
        return self.eval()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, channels={self.channels}, strides={self.strides}, "
                f"weights_id={self.weights_id!r}")


def check_input(x: torch.Tensor) -> None:
    """One clear message for the inputs every extractor takes."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"backbone input must be a [B, 3, H, W] image tensor, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"backbone input must be floating point (normalised image), got {x.dtype}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code from the file (`weights_only=True`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file not found: {path!r} ({_WEIGHTS_HELP})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError for a non-torch file
        raise ValueError(f"could not read {path!r} as a PyTorch state dict with weights_only=True "
                         f"(a file that needs arbitrary code to load is refused): {e}") from e
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        hint = ""
        if isinstance(obj, Mapping):
            nested = [k for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)]
            if nested:
                hint = f"; it holds a nested dict under {nested[0]!r}: save that entry alone"
        raise ValueError(f"{path!r} is not a state dict (a mapping of names to tensors): "
                         f"got {type(obj).__name__}{hint}")
    return dict(obj)


def _describe_keys(keys: set[str], limit: int = 6) -> str:
    ks = sorted(keys)
    more = f", ... ({len(ks)} in all)" if len(ks) > limit else ""
    return ", ".join(ks[:limit]) + more


def load_into(
    make_full: Callable[[], nn.Module],
    make_features: Callable[[], FeatureExtractor],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
) -> FeatureExtractor:
    """Build a feature extractor from a state dict of the full network or of the extractor.

    The full network (with the classifier the extractor never runs) and the extractor are both
    built on the meta device, so checking keys and shapes allocates and initialises nothing. A full
    state dict must match the full network exactly (strict: every key, every shape); the keys the
    extractor does not use are then dropped. The extractor's own (shorter) state dict loads too, so
    `extractor.state_dict()` round-trips.
    """
    with torch.device("meta"):
        full = make_full()
        feats = make_features()
    full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    feat_shapes = {k: tuple(v.shape) for k, v in feats.state_dict().items()}
    state_dict = dict(state_dict)
    # Files saved before PyTorch 0.4.1 have no BatchNorm `num_batches_tracked`; torch's own strict
    # load fills it with 0 for them, and a frozen BN never reads it, so do the same.
    for k in full_shapes:
        if (k.endswith(".num_batches_tracked") and k not in state_dict
                and k.replace(".num_batches_tracked", ".running_mean") in state_dict):
            state_dict[k] = torch.zeros((), dtype=torch.long)
    keys = set(state_dict)
    if keys == set(full_shapes):
        expected = full_shapes
    elif keys == set(feat_shapes):
        expected = feat_shapes
    else:
        missing = set(feat_shapes) - keys
        unexpected = keys - set(full_shapes)
        parts = []
        if missing:
            parts.append(f"missing {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe_keys(unexpected)}")
        if not parts:  # every extractor key is there but the rest is only partly
            parts.append(f"missing {_describe_keys(set(full_shapes) - keys)}")
        raise ValueError(f"{source} does not match the {type(full).__name__} architecture: "
                         + "; ".join(parts))
    bad = [f"{k}: expected {list(s)}, got {list(state_dict[k].shape)}"
           for k, s in expected.items() if tuple(state_dict[k].shape) != s]
    if bad:
        raise ValueError(f"{source} has tensors of the wrong shape for "
                         f"{type(full).__name__}: " + "; ".join(bad[:6])
                         + (f" ({len(bad)} in all)" if len(bad) > 6 else ""))
    feats = feats.to_empty(device="cpu")
    # copy semantics: converts dtype (e.g. a float16 file) and makes every tensor our own.
    feats.load_state_dict({k: state_dict[k] for k in feat_shapes}, strict=True)
    return feats


def resolve_weights(weights, name: str) -> tuple[str, str | None]:
    """Normalise the `weights` argument to (kind, path): kind in {"imagenet", "random", "file"}."""
    if weights is None:
        return "random", None
    if isinstance(weights, str) and weights == "imagenet":
        return "imagenet", None
    if isinstance(weights, (str, os.PathLike)):
        return "file", os.fspath(weights)
    raise TypeError(f"{name}: {_WEIGHTS_HELP}; got {type(weights).__name__}")
