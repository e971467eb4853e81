"""Frozen feature extractors for SimpleNet (SPEC 1.2, 5, 7).

`build_backbone(backbone, weights)` returns a `FeatureExtractor`: `forward(x) -> [f2, f3]` with
f2 `[B, C2, H/8, W/8]` and f3 `[B, C3, H/16, W/16]`, always in eval mode, no parameter requiring
grad, and the attributes `name`, `channels`, `strides`, `mean`, `std`, `weights_id`, `defaults`.

Each backbone declares the SimpleNet configuration it recommends (`BackboneDefaults`, next to its
definition); `default_config(backbone)` returns it, and `SimpleNet`, `fit`, the CLI and the
benchmarks all read it from there:

  name                  image size  resize mode  embed dims  hidden  noise  epochs  recipe
  "wide_resnet50_2"     288         crop (329)   1536/1536   1024    0.015  160     paper (the paper's)
  "efficientnet_lite0"  224         whole        384/384     256     0.25   20      relative (ELPV
                                                                                    validation)

  name                  channels     mean / std (images in [0, 1])        weights="imagenet"
  "wide_resnet50_2"     (512, 1024)  ImageNet (0.485, 0.456, 0.406) /     torchvision's published
                                     (0.229, 0.224, 0.225)                file, hub cache download
  "efficientnet_lite0"  (40, 112)    127/255 / 128/255 (TF Lite style)    pip extra "lite"
"""
from __future__ import annotations

import torch
from torch import nn

from collections.abc import Mapping

from ._base import (IMAGENET_MEAN, IMAGENET_STD, BackboneDefaults, FeatureExtractor, check_input,
                    file_sha256, load_state_dict_file, resolve_weights)
from .efficientnet_lite import (LITE_MEAN, LITE_STD, EfficientNetLite0, EfficientNetLite0Features,
                                efficientnet_lite0_features)
from .wide_resnet import DEFAULTS as PAPER_DEFAULTS
from .wide_resnet import WideResNet50_2, WideResNet50_2Features, wide_resnet50_2_features

__all__ = [
    "FeatureExtractor", "CustomBackbone", "BackboneDefaults", "build_backbone",
    "available_backbones", "default_config", "PAPER_DEFAULTS",
    "WideResNet50_2", "WideResNet50_2Features", "EfficientNetLite0", "EfficientNetLite0Features",
    "IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD",
]

# name -> (builder, extractor class: the class carries the declared defaults)
_REGISTRY = {
    "wide_resnet50_2": (wide_resnet50_2_features, WideResNet50_2Features),
    "efficientnet_lite0": (efficientnet_lite0_features, EfficientNetLite0Features),
}

_DRY_RUN_SIZE = 128  # divisible by 16, so a conforming module gives exactly 16x16 and 8x8


def available_backbones() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def _registry_key(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; valid names: "
                         + ", ".join(repr(n) for n in _REGISTRY) + ", or an nn.Module")
    return key


def default_config(backbone="wide_resnet50_2") -> BackboneDefaults:
    """The `BackboneDefaults` a backbone declares: by registry name, or of a module (its
    `defaults` attribute: a `BackboneDefaults`, or a mapping of the fields that differ from the
    paper's; a module without one gets the paper's, `PAPER_DEFAULTS`)."""
    if isinstance(backbone, str):
        return _REGISTRY[_registry_key(backbone)][1].defaults
    if isinstance(backbone, nn.Module):
        declared = getattr(backbone, "defaults", None)
        if declared is None:
            return PAPER_DEFAULTS
        if isinstance(declared, BackboneDefaults):
            return declared
        if isinstance(declared, Mapping):
            return PAPER_DEFAULTS.overridden(declared)
        raise ValueError("a backbone module's `defaults` must be a BackboneDefaults or a mapping of "
                         f"its fields, got {type(declared).__name__}")
    raise TypeError(f"backbone must be a name ({', '.join(_REGISTRY)}) or an nn.Module, "
                    f"got {type(backbone).__name__}")


class CustomBackbone(FeatureExtractor):
    """A user module behind the `FeatureExtractor` contract.

    The module must map `[B, 3, H, W]` to a list or tuple of two maps, `[B, C2, H/8, W/8]` and
    `[B, C3, H/16, W/16]`. `channels` (and `strides`, `mean`, `std`, `defaults`,
    `bfloat16_faster_on`, `bfloat16_meets_spec`) are taken from attributes of the same names on
    the module when it has them (see `default_config`); otherwise channels come from one dry run
    on a 128x128 input on the module's device, which also checks the strides. Wrapping freezes
    the module in place (eval mode, requires_grad False).
    """

    def __init__(self, module: nn.Module, weights_id: str = "custom"):
        super().__init__()
        self.module = module
        self.name = None
        self.weights_id = weights_id
        self.defaults = default_config(module)
        self._freeze()
        for attr in ("strides", "mean", "std", "bfloat16_faster_on"):
            if hasattr(module, attr):
                setattr(self, attr, tuple(getattr(module, attr)))
        if hasattr(module, "bfloat16_meets_spec"):
            self.bfloat16_meets_spec = bool(module.bfloat16_meets_spec)
        channels = getattr(module, "channels", None)
        if channels is not None:
            channels = tuple(int(c) for c in channels)
            if len(channels) != 2:
                raise ValueError(f"backbone module's `channels` must hold two ints, got {channels}")
        else:
            channels = self._dry_run()
        self.channels = channels

    def _dry_run(self) -> tuple[int, int]:
        ref = next(iter(self.module.parameters()), None)
        if ref is None:
            ref = next(iter(self.module.buffers()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        n = _DRY_RUN_SIZE
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, n, n, device=device, dtype=dtype))
        want = [(n // s, n // s) for s in self.strides]
        got = [tuple(f.shape[-2:]) for f in out]
        if got != want:
            raise ValueError(f"backbone module must return maps of stride {self.strides}: a "
                             f"{n}x{n} input should give {want}, got {got}")
        return int(out[0].shape[1]), int(out[1].shape[1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x)
        out = self.module(x)
        if (not isinstance(out, (list, tuple)) or len(out) != 2
                or not all(isinstance(f, torch.Tensor) and f.dim() == 4 for f in out)):
            got = (f"{type(out).__name__} of {len(out)}" if isinstance(out, (list, tuple))
                   else type(out).__name__)
            raise ValueError("backbone module must return a list or tuple of two [B, C, H, W] "
                             f"maps (stride 8 and stride 16), got {got}")
        return [out[0], out[1]]


def build_backbone(backbone="wide_resnet50_2", weights="imagenet") -> FeatureExtractor:
    """Frozen feature extractor by name, or wrapping a user module.

    backbone: "wide_resnet50_2", "efficientnet_lite0" (case and '-'/'_' are not significant), an
      `nn.Module` (see `CustomBackbone`), or an already built `FeatureExtractor` (returned as is).
    weights: "imagenet" (default), None (random init) or the path of a local state-dict file,
      loaded with `weights_only=True`. For a user module, "imagenet" and None both mean "keep the
      module's own weights" and a path is loaded into it strictly.
    """
    if isinstance(backbone, FeatureExtractor):
        if weights not in (None, "imagenet"):
            raise ValueError("backbone is already a built FeatureExtractor: pass weights when "
                             "building it, not here")
        return backbone
    if isinstance(backbone, nn.Module):
        kind, path = resolve_weights(weights, "custom backbone")
        if kind != "file":
            return CustomBackbone(backbone)
        sd = load_state_dict_file(path)
        try:
            backbone.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path!r} does not match the backbone module: {e}") from e
        return CustomBackbone(backbone, weights_id=f"file:{file_sha256(path)}")
    if isinstance(backbone, str):
        return _REGISTRY[_registry_key(backbone)][0](weights)
    raise TypeError(f"backbone must be a name ({', '.join(_REGISTRY)}) or an nn.Module, "
                    f"got {type(backbone).__name__}")
