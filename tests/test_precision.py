"""precision="float32" | "bfloat16" | "auto" (simplenet_fast/_precision.py, SimpleNet): the rule
that picks bf16, its fallback, and SPEC 6's accuracy contract for the CPU bf16 path.

This machine may lack native bf16 (AVX512-BF16 / AMX-BF16). The accuracy cases then force the bf16
path by patching the CPU probe (`force_native_bfloat16`): torch runs the same bf16 operations
emulated, slowly but with the same rounding, so the numerics are those of a native machine. Users
never get that path: without native bf16 a request falls back to float32 (tested below).
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from simplenet_fast import SimpleNet, _precision, build_info
from simplenet_fast import model as model_module
from simplenet_fast.backbones import build_backbone

from conftest import (TinyBackbone, official_case, random_backbone, randomize_head,
                      relative_error)

SIZE, RESIZE = 64, 72  # an 8x8 patch grid: cheap enough for WideResNet-50-2 in emulated bf16
HEAD = dict(pretrain_embed_dim=96, target_embed_dim=80, hidden=32)
BF16_TOL = 2e-2  # SPEC 6, bf16 paths, relative L2

needs_fused = pytest.mark.skipif(not build_info()["compiled"], reason="compiled extension missing")


@pytest.fixture
def force_native_bfloat16(monkeypatch):
    """Test-only: make the CPU probe say yes, so that the bf16 path runs on any CPU."""
    monkeypatch.setattr(_precision, "cpu_has_native_bfloat16", lambda: True)


@pytest.fixture
def no_native_bfloat16(monkeypatch):
    monkeypatch.setattr(_precision, "cpu_has_native_bfloat16", lambda: False)
    monkeypatch.setattr(_precision, "_warned", set())  # the one-time warnings, as in a new process


def wrn_model(**kwargs) -> SimpleNet:
    """WideResNet-50-2 with random weights and randomised BN statistics, head with non-trivial BN."""
    torch.manual_seed(0)
    model = SimpleNet(random_backbone("wide_resnet50_2"), image_size=SIZE, resize=RESIZE, **HEAD,
                      **kwargs)
    randomize_head(model.head, torch.Generator().manual_seed(2))
    return model


def tiny_model(**kwargs) -> SimpleNet:
    torch.manual_seed(0)
    model = SimpleNet(TinyBackbone(), weights=None, image_size=32, resize=36,
                      pretrain_embed_dim=30, target_embed_dim=21, hidden=40, **kwargs)
    randomize_head(model.head, torch.Generator().manual_seed(1))
    return model


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random pictures with a bright blob of varying size, so image scores differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:RESIZE, 0:RESIZE] / RESIZE
    out = []
    for i in range(n):
        base = 128 + 40 * np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(1, 3) * yy))
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), 0.03 + 0.2 * i / n
        blob = 90 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        picture = base[..., None] + blob[..., None] + rng.normal(0, 8, (RESIZE, RESIZE, 3))
        out.append(np.clip(picture, 0, 255).astype(np.uint8))
    return out


def swapped_pairs(scores: torch.Tensor, reference: torch.Tensor, tol: float) -> int:
    """Pairs ranked the other way round, among those whose reference scores differ by more than
    tol * max|reference| (closer pairs may swap within the tolerance)."""
    s, r = scores.double(), reference.double()
    dr, ds = r[:, None] - r[None, :], s[:, None] - s[None, :]
    resolvable = dr.abs() > tol * r.abs().max()
    return int(((torch.sign(dr) != torch.sign(ds)) & resolvable).sum()) // 2


# ------------------------------------------------------------------------------- the setting
def test_precision_must_be_a_documented_value():
    with pytest.raises(ValueError, match="precision must be one of 'auto', 'float32', 'bfloat16'"):
        SimpleNet(TinyBackbone(), weights=None, precision="float16")
    model = tiny_model()
    for bad in ("bf16", "FLOAT32", None, 16, torch.bfloat16):
        with pytest.raises(ValueError, match="precision must be one of"):
            model.precision = bad
    for bad in ("bf16", "", 16, torch.bfloat16):  # None is valid here: the model's own setting
        with pytest.raises(ValueError, match="precision must be one of"):
            model.score(np.zeros((36, 36, 3), np.uint8), precision=bad)
    assert model.precision == "float32"  # refused values leave the setting alone
    for good in ("auto", "bfloat16", "float32"):
        model.precision = good
        assert model.precision == good and model.config["precision"] == good


@pytest.mark.parametrize("flags, native", [
    ({"avx512_bf16": True, "avx512_f": True}, True),    # Cooper Lake, Zen 4 / 5
    ({"amx_bf16": True, "amx_tile": True}, True),       # Sapphire Rapids and later
    ({"avx512_f": True, "avx512_bw": True, "avx512_bf16": False}, False),  # AVX-512, no BF16
    ({"avx2": True}, False),
    ({}, False),
])
def test_native_bfloat16_is_read_from_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
    assert _precision.cpu_has_native_bfloat16() is native
    assert build_info()["cpu_bfloat16"] is native


def test_without_a_cpu_probe_bfloat16_is_never_native(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert _precision.cpu_has_native_bfloat16() is False


class _Backbone:
    def __init__(self, faster_on=(), meets_spec=True):
        self.bfloat16_faster_on = faster_on
        self.bfloat16_meets_spec = meets_spec


@pytest.mark.parametrize("device, native, faster_on, meets_spec, auto, bfloat16", [
    ("cpu", True, ("cpu", "cuda"), True, "bfloat16", "bfloat16"),  # WideResNet, AVX512-BF16 CPU
    ("cpu", True, (), False, "float32", "float32"),                # EfficientNet-Lite0 there
    ("cpu", True, (), True, "float32", "bfloat16"),                # a user module there
    ("cpu", True, ("cuda",), True, "float32", "bfloat16"),
    ("cpu", True, ("cpu",), False, "float32", "float32"),
    ("cpu", False, ("cpu", "cuda"), True, "float32", "float32"),   # any backbone, AVX2 CPU
    ("cuda", True, ("cpu", "cuda"), True, "bfloat16", "bfloat16"), # WideResNet on an A100 / H100
    ("cuda", True, (), False, "float32", "float32"),
    ("cuda", True, (), True, "float32", "bfloat16"),
    ("cuda", False, ("cpu", "cuda"), True, "float32", "float32"),  # a V100
])
def test_resolution_rule(monkeypatch, device, native, faster_on, meets_spec, auto, bfloat16):
    monkeypatch.setattr(_precision, "cpu_has_native_bfloat16", lambda: native)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0) if native else (7, 0))
    backbone, dev = _Backbone(faster_on, meets_spec), torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings have their own tests
        assert _precision.resolve_precision("auto", dev, backbone) == auto
        assert _precision.resolve_precision("bfloat16", dev, backbone) == bfloat16
        assert _precision.resolve_precision("float32", dev, backbone) == "float32"


def test_backbones_declare_where_bfloat16_is_faster_and_accurate():
    wrn, lite = (build_backbone(name, weights=None) for name in ("wide_resnet50_2", "efficientnet_lite0"))
    assert (wrn.bfloat16_faster_on, wrn.bfloat16_meets_spec) == (("cpu", "cuda"), True)
    assert (lite.bfloat16_faster_on, lite.bfloat16_meets_spec) == ((), False)
    custom = SimpleNet(TinyBackbone(), weights=None).backbone
    assert (custom.bfloat16_faster_on, custom.bfloat16_meets_spec) == ((), True)  # the user's call
    declared = TinyBackbone()
    declared.bfloat16_faster_on, declared.bfloat16_meets_spec = ["cpu"], 0
    custom = SimpleNet(declared, weights=None).backbone
    assert (custom.bfloat16_faster_on, custom.bfloat16_meets_spec) == (("cpu",), False)


# ------------------------------------------------------------------------------- the fallback
def test_bfloat16_without_native_support_runs_float32_and_warns_once(no_native_bfloat16):
    model, pictures = tiny_model(), images(3)
    expected = model.score(pictures)
    model.precision = "bfloat16"
    with pytest.warns(RuntimeWarning, match="precision='bfloat16' runs in float32: this CPU has"):
        first = model.score(pictures)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: neither this model nor another warns
        second = model.score(pictures)
        other = tiny_model(precision="bfloat16").score(pictures)
        assert model.compute_precision == "float32"
    for result in (first, second, other):
        assert torch.equal(result.patch_scores, expected.patch_scores)
    assert model._bfloat16_backbone_cache is None  # no emulated bf16 ran


def test_backbone_off_the_contract_runs_float32_and_warns_once(force_native_bfloat16, monkeypatch):
    """EfficientNet-Lite0's bf16 answer is off SPEC 6 (its declaration): bf16 requests run float32
    even where bf16 is native, with a warning saying why."""
    monkeypatch.setattr(_precision, "_warned", set())
    torch.manual_seed(0)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=36, **HEAD)
    expected = model.score(images(2))
    with pytest.warns(RuntimeWarning, match="efficientnet_lite0 backbone's bfloat16 features are too far"):
        result = model.score(images(2), precision="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model._compute_precision("bfloat16") == "float32"
        assert model._compute_precision("auto") == "float32"
    assert torch.equal(result.patch_scores, expected.patch_scores)
    assert model._bfloat16_backbone_cache is None


def test_auto_without_native_support_is_float32_silently(no_native_bfloat16):
    model = wrn_model(precision="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.compute_precision == "float32"
        assert torch.equal(model.score(images(2)).patch_scores,
                           model.score(images(2), precision="float32").patch_scores)


# ------------------------------------------------------------------------------- the bf16 path
@pytest.fixture(scope="module")
def wrn_results():
    """One WideResNet model scored in float32 and in (forced) bf16: (model, float32, bf16)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_precision, "cpu_has_native_bfloat16", lambda: True)
        model = wrn_model(precision="auto")
        assert model.compute_precision == "bfloat16"
        pictures = images(6)
        return model, model.score(pictures, precision="float32"), model.score(pictures)


def test_bfloat16_runs_the_backbone_in_bfloat16_channels_last(force_native_bfloat16, monkeypatch):
    model = wrn_model(precision="bfloat16")
    seen = []
    patch_scores = model.head.patch_scores

    def spy(features, **kwargs):
        seen.append([(f.dtype, f.is_contiguous(memory_format=torch.channels_last)) for f in features])
        return patch_scores(features, **kwargs)

    monkeypatch.setattr(model.head, "patch_scores", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.score(images(1))
    assert seen == [[(torch.bfloat16, True), (torch.bfloat16, True)]]
    # The bf16 copy is a cache, not part of the model: weights, keys and dtypes stay float32.
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters())
    copy_ = model._bfloat16_backbone_cache[1]
    assert all(p.dtype == torch.bfloat16 for p in copy_.parameters())
    # made inside score's inference_mode, yet usable by any later caller
    assert not any(p.is_inference() for p in copy_.parameters())
    assert copy_.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_features_are_close_to_float32(force_native_bfloat16):
    """The maps a bf16 WideResNet (random weights, randomised BN) hands the head: measured 0.85%
    relative here for both layers; on real weights the issue measured 0.8% and 1.0%."""
    model = wrn_model(precision="bfloat16")
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    x = (x - model._mean) / model._std
    with torch.inference_mode():
        full = model.backbone(x)
        half = model._bfloat16_backbone()(x.to(torch.bfloat16, memory_format=torch.channels_last))
    for f32, bf16 in zip(full, half):
        assert bf16.dtype == torch.bfloat16
        assert relative_error(bf16.float(), f32) < BF16_TOL


def test_bfloat16_scores_meet_spec_6(wrn_results):
    """Patch scores, maps and image scores within 2e-2 relative of float32; same image ranking."""
    _, full, half = wrn_results
    for field in ("patch_scores", "anomaly_map", "pred_score"):
        error = relative_error(getattr(half, field), getattr(full, field))
        assert error < BF16_TOL, (field, error)
        assert getattr(half, field).dtype == torch.float32
    assert swapped_pairs(half.pred_score, full.pred_score, BF16_TOL) == 0


def test_fused_and_reference_heads_agree_on_bfloat16_features(wrn_results, force_native_bfloat16):
    """Both heads see the same bf16 maps, so they agree as closely as in float32 (SPEC 6, 1e-4)."""
    model, _, half = wrn_results
    reference = model.score(images(6), fused=False)
    assert relative_error(half.patch_scores, reference.patch_scores) < 1e-4


@needs_fused
@pytest.mark.parametrize("case", ["case_odd", "case_paper"])
def test_official_fixtures_from_bfloat16_features(case):
    """The head fed bf16 maps (what a bf16 backbone gives it) against the official float32 scores:
    within SPEC 6's 2e-2; the CPU kernel widens them exactly, so it equals float32 scoring of the
    rounded maps bit for bit."""
    head, features, z = official_case(case)
    half = [f.bfloat16().contiguous(memory_format=torch.channels_last) for f in features]
    with torch.no_grad():
        fused = head.patch_scores(half, fused=True)
        widened = head.patch_scores([f.float() for f in half], fused=True)
        # the reference as well where it is cheap (the paper case takes seconds)
        heads = [fused] + ([head.patch_scores(half, fused=False)] if case == "case_odd" else [])
    official = torch.from_numpy(z["patch_scores"])
    assert torch.equal(fused, widened)
    for scores in heads:
        assert relative_error(scores, official) < BF16_TOL
        image_scores = scores.amax(dim=(1, 2))
        assert swapped_pairs(image_scores, torch.from_numpy(z["image_scores"]), BF16_TOL) == 0


def test_bfloat16_copy_follows_the_backbone_weights(force_native_bfloat16):
    model, pictures = tiny_model(precision="bfloat16"), images(2)
    first = model.score(pictures)
    made = model._bfloat16_backbone_cache[1]
    assert model.score(pictures).patch_scores.equal(first.patch_scores)
    assert model._bfloat16_backbone_cache[1] is made  # reused while the weights stand
    with torch.no_grad():
        model.backbone.module.a.weight.mul_(1.5)
    changed = model.score(pictures)
    assert model._bfloat16_backbone_cache[1] is not made
    fresh = tiny_model(precision="bfloat16")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(changed.patch_scores, fresh.score(pictures).patch_scores)
    assert not torch.equal(changed.patch_scores, first.patch_scores)
    model.to("cpu", torch.float32)
    assert model._bfloat16_backbone_cache is None  # moving the model drops the copy


def test_threads_sharing_a_model_make_one_bfloat16_copy(force_native_bfloat16, monkeypatch):
    model, pictures = tiny_model(precision="bfloat16"), images(2)
    copies = []
    real_deepcopy = model_module.copy.deepcopy

    class CountingCopy:
        @staticmethod
        def deepcopy(obj):
            copies.append(obj)
            return real_deepcopy(obj)

    monkeypatch.setattr(model_module, "copy", CountingCopy)
    results, errors = [None] * 6, []
    start = threading.Barrier(6)

    def work(i):
        try:
            start.wait()
            results[i] = model.score(pictures).patch_scores
        except Exception as error:  # reported below, with the thread's error
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(copies) == 1
    assert all(torch.equal(r, results[0]) for r in results)


# ------------------------------------------------------------------------------- training, files
def test_training_is_float32_whatever_the_precision(force_native_bfloat16):
    """fit() trains on float32 features in every precision (bit-identical), and the float32-trained
    model then scores in bf16 as it is."""
    g = torch.Generator().manual_seed(0)
    train = torch.rand(6, 3, 36, 36, generator=g)
    runs = {}
    for precision in ("float32", "bfloat16"):
        model = tiny_model(precision=precision)
        losses = model.fit(train, epochs=2, batch_size=3, seed=0, progress=False)
        runs[precision] = (losses, model)
    assert runs["float32"][0] == runs["bfloat16"][0]
    a, b = runs["float32"][1].head.state_dict(), runs["bfloat16"][1].head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = runs["float32"][1]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    half = model.score(images(3), precision="bfloat16")
    full = model.score(images(3))
    assert relative_error(half.patch_scores, full.patch_scores) < BF16_TOL


@pytest.mark.parametrize("precision", ["auto", "bfloat16", "float32"])
def test_save_and_load_keep_the_precision_setting(tmp_path, precision):
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=36, **HEAD,
                      precision=precision)
    path = tmp_path / "model.pt"
    model.save(path)
    assert SimpleNet.load(path).precision == precision
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["precision"] == precision  # the setting, not what it resolved to


def test_a_file_with_an_unknown_precision_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    tiny = SimpleNet("efficientnet_lite0", weights=None, image_size=32, resize=36, **HEAD)
    tiny.save(path)
    payload = torch.load(path, weights_only=True)
    payload["config"]["precision"] = "float8"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="unusable config: precision must be one of"):
        SimpleNet.load(path)


def test_custom_backbone_in_bfloat16(force_native_bfloat16):
    """A user module is never bf16 under "auto" (its speed is unknown) but is on request."""
    model = tiny_model(precision="auto")
    assert model.compute_precision == "float32"
    model.precision = "bfloat16"
    assert model.compute_precision == "bfloat16"
    assert isinstance(model._bfloat16_backbone(), nn.Module)
    full, half = model.score(images(3), precision="float32"), model.score(images(3))
    assert relative_error(half.patch_scores, full.patch_scores) < BF16_TOL
