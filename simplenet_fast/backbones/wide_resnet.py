"""WideResNet-50-2 (Zagoruyko & Komodakis 2016, torchvision's ResNet-v1.5 form) without torchvision.

Module and parameter names are torchvision's (`conv1`, `bn1`, `layer1`..`layer4` of `Bottleneck`
blocks with `conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/.1`, `fc`), so torchvision's published
`wide_resnet50_2-95faca4d.pth` (IMAGENET1K_V1) loads unchanged with strict=True.

Two modules:
  `WideResNet50_2`          the whole classifier (68,883,240 parameters); used to check a full
                            state dict strictly, and for anyone who wants logits.
  `WideResNet50_2Features`  the frozen extractor SimpleNet uses (SPEC 1.2): stem, layer1..layer3,
                            returns [layer2, layer3]. It does not hold layer4/avgpool/fc, so they
                            are never computed and their 43.6M parameters (174 MB in float32) never
                            reach the device. Its `state_dict()` is torchvision's minus the
                            `layer4.*` and `fc.*` keys; both that and torchvision's full file load
                            into it (`load_into` checks the full one against `WideResNet50_2`).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ._base import (IMAGENET_MEAN, IMAGENET_STD, BackboneDefaults, FeatureExtractor, check_input,
                    file_sha256, load_into, load_state_dict_file, resolve_weights)

# torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1; the name carries the sha256 prefix
# that `check_hash=True` verifies.
IMAGENET_URL = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"

# The paper's configuration (SPEC 1 and 2): a 288 centre crop of the image resized to 329, 1536-wide
# embeddings, a 1024-wide discriminator, noise 0.015, the official 160 epochs. These are also the
# defaults of a custom backbone that declares none.
DEFAULTS = BackboneDefaults(image_size=(288, 288), resize_mode="crop", pretrain_embed_dim=1536,
                            target_embed_dim=1536, hidden=1024, noise_std=0.015, epochs=160)

_LAYERS = (3, 4, 6, 3)  # Bottleneck blocks per stage, as ResNet-50
_WIDTH_PER_GROUP = 128  # "wide": twice ResNet-50's 64, on the 3x3 convs only
_EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: ResNet v1.5), 1x1 expand; BN after each."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        width = planes * _WIDTH_PER_GROUP // 64
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * _EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * _EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * _EXPANSION:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * _EXPANSION, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * _EXPANSION))
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * _EXPANSION, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _build_trunk(m: nn.Module, stages: int) -> None:
    """Stem and the first `stages` layers, registered on `m` under torchvision's names."""
    m.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(64)
    m.relu = nn.ReLU(inplace=True)
    m.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for i in range(stages):
        planes = 64 * 2 ** i
        setattr(m, f"layer{i + 1}", _make_layer(inplanes, planes, _LAYERS[i], 1 if i == 0 else 2))
        inplanes = planes * _EXPANSION


def _torchvision_init(m: nn.Module) -> None:
    # torchvision ResNet.__init__: He init (fan_out) for convs, BN weight 1 / bias 0; Linear keeps
    # PyTorch's default; zero_init_residual=False.
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


class WideResNet50_2(nn.Module):
    """The full torchvision `wide_resnet50_2` classifier: `forward(x) -> [B, 1000]` logits."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        _build_trunk(self, 4)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * _EXPANSION, num_classes)
        _torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideResNet50_2Features(FeatureExtractor):
    """Frozen WideResNet-50-2 up to layer3: `forward(x) -> [layer2 (C=512, /8), layer3 (C=1024, /16)]`.

    Output sizes follow the convolutions: for an input H, layer2 is ceil(H/8) and layer3
    ceil(H/16) (288 -> 36, 18; 280 -> 35, 18).
    """

    name = "wide_resnet50_2"
    channels = (512, 1024)
    strides = (8, 16)
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    defaults = DEFAULTS
    # Dense 3x3 and 1x1 convolutions, nearly all of a SimpleNet call: on an AVX512-BF16 CPU,
    # 288 px, batch 1, two threads, 103-107 ms in bf16 against 212 ms in float32 channels-last
    # (issue #16); on CUDA bf16 tensor cores (bench/bench_gpu_e2e.py times both precisions).
    bfloat16_faster_on = ("cpu", "cuda")
    # bf16 layer2 / layer3 within 0.8% / 1.0% relative of float32 with the ImageNet weights
    # (issue #16), 0.85% with random ones (tests/test_precision.py).
    bfloat16_meets_spec = True

    def __init__(self):
        super().__init__()
        _build_trunk(self, 3)
        _torchvision_init(self)
        self.weights_id = "random"
        self._freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f2 = self.layer2(self.layer1(x))
        f3 = self.layer3(f2)
        return [f2, f3]


def wide_resnet50_2_features(weights="imagenet") -> WideResNet50_2Features:
    """Build the frozen extractor.

    weights: "imagenet" downloads torchvision's IMAGENET1K_V1 file once into the torch hub cache
    (`$TORCH_HOME/hub/checkpoints`) and checks its sha256; a path loads a local state dict (the full
    torchvision file or an extractor's `state_dict()`) with `weights_only=True`; None keeps
    torchvision's random init.
    """
    kind, path = resolve_weights(weights, "wide_resnet50_2")
    if kind == "random":
        return WideResNet50_2Features()
    if kind == "imagenet":
        sd = torch.hub.load_state_dict_from_url(IMAGENET_URL, map_location="cpu", check_hash=True,
                                                weights_only=True)
        source, weights_id = f"torchvision's {os.path.basename(IMAGENET_URL)}", "imagenet"
    else:
        sd = load_state_dict_file(path)
        source, weights_id = repr(path), f"file:{file_sha256(path)}"
    m = load_into(WideResNet50_2, WideResNet50_2Features, sd, source)
    m.weights_id = weights_id
    return m._freeze()
