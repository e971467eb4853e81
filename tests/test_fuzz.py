"""Property-based fuzzing of every public entry point that reaches compiled code, and `score`.

Each case either returns the reference's answer or raises a ValueError / TypeError /
FileNotFoundError whose message says what was wrong; nothing else is allowed (no other
exception type, no NaN, no crash). The oracle for the head is the reference evaluated in float64
(SPEC 6: "compare against a float64 evaluation when in doubt"), so a fused result must be right,
not merely equal to a float32 reference that may itself have overflowed.

Entry points: `SimpleNetHead.patch_scores` (fused=None / True / False), `_fused.fused_patch_scores`
(the one checked entry into csrc/, with `out=` and `compute_dtype=`), the registered operator
`torch.ops.simplenet_fast.patch_scores` with every argument mutated, `SimpleNet.score`,
`simplenet_fast.score`, `preprocess_image` on damaged files and `SimpleNet.load` on damaged
models. Run under ASan + UBSan by `.ci/sanitize.sh tests/test_fused.py tests/test_fuzz.py`.

Cases per test: `SIMPLENET_FAST_FUZZ_EXAMPLES` scales them (default 1.0; the counts that ran are
printed at the end of this module's tests).
"""
from __future__ import annotations

import collections
import copy
import functools
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from PIL import Image

import simplenet_fast
from conftest import DEVICES, TinyBackbone, randomize_head
from simplenet_fast import SimpleNet, SimpleNetHead, build_info
from simplenet_fast import _fused
from simplenet_fast.preprocess import preprocess_image

SCALE = float(os.environ.get("SIMPLENET_FAST_FUZZ_EXAMPLES", "1.0"))
FLOAT32_TOL = 1e-4  # SPEC 6
# Features below this magnitude must never overflow the float32 head (weights here are O(1)).
SAFE_MAGNITUDE = 1e30
CASES: collections.Counter = collections.Counter()

needs_compiled = pytest.mark.skipif(not build_info()["compiled"], reason="simplenet_fast._C is not built")


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request):
    yield
    line = "fuzz cases run: " + ", ".join(f"{k} {v}" for k, v in sorted(CASES.items())) + \
        f"; total {sum(CASES.values())}"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s too
            reporter.write_line("\n" + line)


# ---------------------------------------------------------------------------------- heads
@functools.lru_cache(maxsize=64)
def make_head(channels, pretrain, target, hidden, seed):
    """A random head with non-trivial BN (SPEC 6), and its float64 twin for the oracle."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = SimpleNetHead(channels, pretrain, target, hidden)
    head = randomize_head(head, torch.Generator().manual_seed(seed))
    return head, copy.deepcopy(head).double()


head_configs = st.tuples(
    st.tuples(st.integers(1, 9), st.integers(1, 9)),  # channels
    st.integers(1, 48), st.integers(1, 48),            # pretrain, target embed dims
    st.integers(1, 70),                                # hidden: around the 16/32-row vector blocks
    st.integers(0, 3),                                 # seed (few: heads are cached)
)
grids = st.tuples(st.integers(1, 13), st.integers(1, 13))
MAGNITUDES = [0.0, 1e-42, 1e-30, 1e-6, 1.0, 1e3, 1e20, 1e30, 1e36, 1e38, 3e38]
LAYOUTS = ["contiguous", "channels_last", "transposed", "strided", "offset", "expanded"]


def lay_out(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (the wrapper must make them contiguous once)."""
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "strided":  # every second element of a wider buffer
        wide = torch.full((*t.shape[:3], 2 * t.shape[3]), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if kind == "offset":  # a nonzero storage offset
        flat = torch.empty(t.numel() + 7, dtype=t.dtype, device=t.device)
        view = flat[7:].view(t.shape)
        view.copy_(t)
        return view
    if kind == "expanded" and t.shape[0] > 0:  # batch broadcast: stride 0 (values of image 0)
        return t[:1].expand(t.shape)
    return t


def draw_map(draw, batch, channels, grid, dtype, layout, magnitude, generator):
    values = torch.randn(batch, channels, *grid, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        values = torch.relu(values)  # backbone-like: half zeros
    return lay_out((values * magnitude).to(dtype), layout)


def oracle(head64: SimpleNetHead, features) -> torch.Tensor:
    with torch.no_grad():
        return head64.reference_patch_scores([f.detach().cpu().double() for f in features])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float = FLOAT32_TOL) -> None:
    assert torch.isfinite(actual).all(), "a returned score is NaN or Inf"
    diff = (actual.detach().cpu().double() - expected).norm().item()
    norm = expected.norm().item()
    assert diff <= tol * norm + 1e-30, f"relative error {diff / max(norm, 1e-300):.3g} > {tol}"


def has_kernel(device: str, dtype: torch.dtype) -> bool:
    return build_info()["compiled"] and dtype in _fused._FEATURE_DTYPES.get(device, ())


# ------------------------------------------------------------------- valid features, any form
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(150)
@given(config=head_configs, batch=st.integers(0, 3), grid2=grids, grid3=grids,
       dtype=st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64,
                              torch.float16, torch.bfloat16]),
       layouts=st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
       magnitude=st.sampled_from(MAGNITUDES), fused=st.sampled_from([None, True, False]),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_patch_scores_on_any_valid_features(device, config, batch, grid2, grid3, dtype, layouts,
                                            magnitude, fused, seed, data):
    """Random shapes (odd, 1x1, layer3 larger than layer2), strides, dtypes and magnitudes."""
    CASES["patch_scores"] += 1
    head, head64 = make_head(*config)
    head = head.to(device)
    g = torch.Generator().manual_seed(seed)
    features = [draw_map(data.draw, batch, c, grid, dtype, layout, magnitude, g).to(device)
                for c, grid, layout in zip(head.channels, (grid2, grid3), layouts)]
    finite = all(bool(torch.isfinite(f).all()) for f in features)  # float16 overflows at 65504
    expected = oracle(head64, features) if batch else None
    note(f"finite={finite} max|x|={max(float(f.abs().max()) if f.numel() else 0.0 for f in features):.3g}")
    try:
        with torch.no_grad():
            scores = head.patch_scores(features, fused=fused)
    except ValueError as error:
        message = str(error)
        if fused is True and not has_kernel(device, dtype):
            assert "no kernel" in message or "not available" in message
        elif not finite:
            assert "NaN or Inf" in message
        else:
            # Only an overflow of float32 may refuse valid features, and only for huge ones.
            assert "produced NaN or Inf" in message, message
            assert magnitude > SAFE_MAGNITUDE, f"refused features of magnitude {magnitude}: {message}"
        return
    assert fused is not True or has_kernel(device, dtype)
    assert scores.shape == (batch, *grid2) and scores.device.type == device
    assert scores.dtype == torch.float32
    if batch:
        # Non-finite features may pass only where the answer does not depend on them (layer3
        # positions the bilinear resampling never reads): then it is the reference's answer.
        assert torch.isfinite(expected).all(), "NaN / Inf reached the answer and were accepted"
        assert_matches(scores, expected)


# ------------------------------------------------------------------- invalid features
MUTATIONS = ["channels", "ndim", "batch", "empty_grid", "nan", "inf", "int_dtype", "complex",
             "mixed_dtype", "not_a_tensor", "count", "sparse", "meta", "grad"]


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(120)
@given(config=head_configs, batch=st.integers(1, 3), grid2=grids, grid3=grids,
       mutation=st.sampled_from(MUTATIONS), layer=st.integers(0, 1),
       fused=st.sampled_from([None, True, False]), data=st.data())
def test_patch_scores_refuse_invalid_features(device, config, batch, grid2, grid3, mutation, layer,
                                             fused, data):
    CASES["patch_scores_invalid"] += 1
    head, head64 = make_head(*config)
    head = head.to(device)
    features = [torch.rand(batch, c, *grid, device=device) for c, grid in zip(head.channels, (grid2, grid3))]
    f = features[layer]
    name = ("layer2", "layer3")[layer]
    if mutation == "channels":
        c = data.draw(st.integers(0, 12).filter(lambda c: c != head.channels[layer]))
        features[layer] = torch.rand(batch, c, *f.shape[2:], device=device)
        expected = rf"{name} features must be \[B, {head.channels[layer]}, H, W\]"
    elif mutation == "ndim":
        features[layer] = data.draw(st.sampled_from([f[0], f[..., 0], f[None], f.flatten()]))
        expected = rf"{name} features must be \[B, {head.channels[layer]}, H, W\]"
    elif mutation == "batch":
        other = data.draw(st.integers(0, 4).filter(lambda b: b != batch))
        features[layer] = torch.rand(other, *f.shape[1:], device=device)
        expected = "batch sizes differ"
    elif mutation == "empty_grid":
        axis = data.draw(st.sampled_from([2, 3]))
        features[layer] = f.narrow(axis, 0, 0)
        expected = "non-empty grid"
    elif mutation in ("nan", "inf"):
        index = tuple(data.draw(st.integers(0, n - 1)) for n in f.shape)
        f = f.clone()
        f[index] = float("nan") if mutation == "nan" else data.draw(st.sampled_from([1, -1])) * float("inf")
        features[layer] = f
        expected = "NaN or Inf"
        answer = oracle(head64, features)
        if torch.isfinite(answer).all():
            # A layer3 value the resampling never reads (layer3 grid larger than layer2's) does
            # not change the answer: the reference's answer, or the same refusal, are both right.
            try:
                scores = head.patch_scores(features, fused=fused)
            except ValueError as error:
                assert expected in str(error)
                return
            assert_matches(scores, answer)
            return
    elif mutation == "int_dtype":
        features[layer] = f.to(data.draw(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.bool])))
        expected = "floating point"
    elif mutation == "complex":
        features[layer] = f.to(torch.complex64)
        expected = "floating point"
    elif mutation == "mixed_dtype":
        features[layer] = f.double()
        expected = "share device and dtype"
    elif mutation == "not_a_tensor":
        features[layer] = data.draw(st.sampled_from([f.cpu().numpy(), f.tolist(), None, 3.0]))
        expected = f"{name} features must be a torch.Tensor"
    elif mutation == "count":
        features = data.draw(st.sampled_from([features[:1], features * 2, [], tuple(features[:1]),
                                              {"layer2": features[0]}, features[0]]))
        expected = "two backbone maps"
    elif mutation == "sparse":
        features[layer] = f.to_sparse()
        expected = "dense tensor"
    elif mutation == "meta":
        features = [x.to("meta") for x in features]
        expected = "dense tensor with data"
    else:  # grad: the fused head is inference-only; the others take the reference
        features[layer] = f.requires_grad_(True)
        if fused is not True:
            scores = head.patch_scores(features, fused=fused)
            assert scores.requires_grad and torch.isfinite(scores).all()
            return
        expected = "inference-only"
    with pytest.raises(ValueError, match=expected):
        head.patch_scores(features, fused=fused)


# ------------------------------------------------------------------- the checked entry point
@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(60)
@given(config=head_configs, batch=st.integers(0, 3), grid2=grids, grid3=grids,
       out_kind=st.sampled_from(["none", "good", "shape", "dtype", "strided", "batch"]),
       compute=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_fused_entry_point_checks_out_and_compute_dtype(device, config, batch, grid2, grid3, out_kind,
                                                        compute, seed):
    CASES["fused_patch_scores"] += 1
    head, head64 = make_head(*config)
    head = head.to(device)
    g = torch.Generator().manual_seed(seed)
    features = [torch.rand(batch, c, *grid, generator=g).to(device) for c, grid in zip(head.channels, (grid2, grid3))]
    shape = (batch, *grid2)
    out = {
        "none": None,
        "good": torch.full(shape, float("nan"), device=device),  # poisoned: every score must be written
        "shape": torch.empty(batch, grid2[0] + 1, grid2[1], device=device),
        "dtype": torch.empty(shape, dtype=torch.float64, device=device),
        "strided": torch.empty(batch, grid2[1], grid2[0], device=device).transpose(1, 2),
        "batch": torch.empty(batch + 1, *grid2, device=device),
    }[out_kind]
    bad_out = out_kind in ("shape", "dtype", "batch") or (out_kind == "strided" and not out.is_contiguous())
    bad_compute = compute not in _fused._COMPUTE_DTYPES[device]
    try:
        scores = _fused.fused_patch_scores(head, features, compute_dtype=compute, out=out)
    except ValueError as error:
        # compute_dtype is checked first, then out; both before any work, empty batches included.
        assert bad_out or bad_compute, str(error)
        assert ("compute_dtype must be" if bad_compute else "out must be") in str(error)
        return
    assert not (bad_out or bad_compute), "bad arguments were accepted"
    if out is not None:
        assert scores.data_ptr() == out.data_ptr()
    if batch:
        tol = 2e-2 if compute == torch.bfloat16 else FLOAT32_TOL  # SPEC 6
        assert_matches(scores, oracle(head64, features), tol)


# ------------------------------------------------------------------- the registered operator
OP_MUTATIONS = ["none", "none", "none", "weight_shape", "weight_dtype", "weight_nan", "feature_dtype",
                "feature_nan", "feature_grad", "bn_eps", "pretrain", "compute_dtype", "unchecked_nan"]


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(100)
@given(config=head_configs, batch=st.integers(0, 3), grid2=grids, grid3=grids,
       mutation=st.sampled_from(OP_MUTATIONS), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_operator_gives_the_reference_answer_or_a_clear_error(device, config, batch, grid2, grid3,
                                                              mutation, seed, data):
    """`torch.ops.simplenet_fast.patch_scores` called directly, as a user's exported program
    would: every argument it takes, mutated one at a time."""
    CASES["patch_scores operator"] += 1
    head, head64 = make_head(*config)
    head = head.to(device)
    g = torch.Generator().manual_seed(seed)
    features = [torch.rand(batch, c, *grid, generator=g).to(device)
                for c, grid in zip(head.channels, (grid2, grid3))]
    weights = [w.detach().clone() for w in head.operator_weights()]
    pretrain, eps, slope, compute, check = head.pretrain_embed_dim, 1e-5, 0.2, torch.float32, True
    expected = None
    if mutation == "weight_shape":
        i = data.draw(st.integers(0, len(weights) - 1))
        weights[i] = weights[i][..., :-1] if weights[i].shape[-1] > 1 else weights[i][None]
        expected = "must be \\["
    elif mutation == "weight_dtype":
        i = data.draw(st.integers(0, len(weights) - 1))
        weights[i] = weights[i].to(data.draw(st.sampled_from([torch.int32, torch.int64, torch.bool])))
        expected = "must be a dense floating point tensor"
    elif mutation == "weight_nan":
        weights[data.draw(st.integers(0, len(weights) - 1))].view(-1)[0] = float("nan")
        expected = "produced NaN or Inf" if batch else None  # nothing to score, nothing wrong
    elif mutation == "feature_dtype":
        dtype = data.draw(st.sampled_from([torch.float64, torch.float16]))
        features = [f.to(dtype) for f in features]
        expected = "no kernel for"
    elif mutation == "feature_nan" and batch:
        features[0].view(-1)[data.draw(st.integers(0, features[0].numel() - 1))] = float("nan")
        expected = "features contain NaN or Inf"
    elif mutation == "feature_grad":
        features[1].requires_grad_(True)
        expected = "inference-only"
    elif mutation == "bn_eps":
        eps = data.draw(st.sampled_from([-1e-3, float("nan"), float("inf")]))
        expected = "bn_eps must be a finite number >= 0"
    elif mutation == "pretrain":
        pretrain = data.draw(st.sampled_from([0, -3]))
        expected = "pretrain_embed_dim must be a positive int"
    elif mutation == "compute_dtype":
        compute = data.draw(st.sampled_from([torch.float16, torch.float64, torch.bfloat16]))
        if compute not in _fused._COMPUTE_DTYPES[device]:
            expected = "compute_dtype must be one of"
    elif mutation == "unchecked_nan" and batch:
        features[0].view(-1)[0] = float("nan")
        check = False
    arguments = (*features, *weights, pretrain, eps, slope, compute, check)
    if expected is not None:
        with pytest.raises(ValueError, match=expected):
            torch.ops.simplenet_fast.patch_scores(*arguments)
        return
    scores = torch.ops.simplenet_fast.patch_scores(*arguments)
    assert scores.shape == (batch, *grid2) and scores.dtype == torch.float32
    assert scores.device.type == device
    if mutation == "unchecked_nan" and batch:
        return  # check_finite=False (for CUDA-graph capture): the caller checks afterwards
    if batch:
        tol = 2e-2 if compute == torch.bfloat16 else FLOAT32_TOL  # SPEC 6
        assert_matches(scores, oracle(head64, features), tol)


# ------------------------------------------------------------------- SimpleNet.score
SIZE, RESIZE = 32, 36


@functools.lru_cache(maxsize=None)
def tiny_model(device: str = "cpu") -> SimpleNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SimpleNet(TinyBackbone(), weights=None, image_size=SIZE, resize=RESIZE,
                          pretrain_embed_dim=30, target_embed_dim=21, hidden=40)
    randomize_head(model.head, torch.Generator().manual_seed(1))
    return model.to(device)


@st.composite
def image_sources(draw):
    """One image in some accepted (or nearly accepted) form, of a random size."""
    h, w = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    if draw(st.integers(0, 9)) == 0:  # an extreme aspect ratio
        h, w = draw(st.sampled_from([(1, 3000), (2000, 1), (3, 400)]))
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["uint8_hwc", "uint8_hw", "uint16", "rgba", "pil", "float_chw",
                                 "float_bchw", "uint8_chw", "bad_channels", "bad_dtype",
                                 "float_range", "float_nan", "empty", "grey_tensor"]))
    rgb = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
    if kind == "uint8_hwc":
        return rgb
    if kind == "uint8_hw":
        return rgb[:, :, 0]
    if kind == "uint16":
        return rng.randint(0, 65536, (h, w, draw(st.sampled_from([1, 3]))), dtype=np.uint16)
    if kind == "rgba":
        return np.concatenate([rgb, rgb[:, :, :1]], axis=2)
    if kind == "pil":
        mode = draw(st.sampled_from(["RGB", "L", "P", "CMYK", "RGBA", "LA", "1", "I;16", "I", "F", "YCbCr"]))
        image = Image.fromarray(rgb)
        if mode == "I;16":
            return Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
        return image.convert(mode)
    if kind == "float_chw":
        return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    if kind == "float_bchw":
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None].repeat(draw(st.integers(0, 2)), 1, 1, 1)
    if kind == "uint8_chw":
        return torch.from_numpy(rgb).permute(2, 0, 1)
    if kind == "grey_tensor":
        return torch.from_numpy(rgb[:, :, :1]).permute(2, 0, 1).double() / 255
    if kind == "bad_channels":
        return draw(st.sampled_from([np.zeros((h, w, 2), np.uint8), torch.rand(2, h, w), torch.rand(h, w)]))
    if kind == "bad_dtype":
        return draw(st.sampled_from([rgb.astype(np.int32), rgb.astype(np.float32),
                                     torch.from_numpy(rgb).permute(2, 0, 1).int()]))
    if kind == "float_range":
        return torch.from_numpy(rgb).permute(2, 0, 1).float() * draw(st.sampled_from([-1.0, 255.0, 1e38]))
    if kind == "float_nan":
        x = torch.rand(3, h, w)
        x[rng.randint(3), rng.randint(h), rng.randint(w)] = draw(st.sampled_from([float("nan"), float("inf")]))
        return x
    return draw(st.sampled_from([np.zeros((0, w, 3), np.uint8), torch.zeros(3, h, 0), []]))


def outcome(call):
    """(result, None) or (None, (exception type, message)); only the allowed error kinds."""
    try:
        return call(), None
    except (ValueError, TypeError, FileNotFoundError) as error:
        assert str(error), f"{type(error).__name__} without a message"
        return None, (type(error), str(error))


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(60)
@given(images=st.one_of(image_sources(), st.lists(image_sources(), min_size=0, max_size=4)),
       batch_size=st.integers(1, 3))
def test_score_agrees_with_the_reference_or_refuses_alike(device, images, batch_size):
    CASES["SimpleNet.score"] += 1
    model = tiny_model(device)
    fused, fused_error = outcome(lambda: model.score(images, batch_size=batch_size))
    reference, reference_error = outcome(lambda: model.score(images, batch_size=batch_size, fused=False))
    assert fused_error == reference_error  # same refusal, same message, or none
    if fused is None:
        return
    n = len(fused)
    assert fused.pred_score.shape == (n,) and fused.anomaly_map.shape == (n, SIZE, SIZE)
    for name in ("pred_score", "anomaly_map", "patch_scores"):
        a, b = getattr(fused, name), getattr(reference, name)
        assert torch.isfinite(a).all()
        assert_matches(a, b.double().cpu())


GEOMETRIES = (  # SPEC 8: rectangular inputs, each resize mode, tiling (windows may overhang)
    dict(image_size=(24, 40), resize_mode="pad"),
    dict(image_size=(40, 24), resize_mode="crop"),
    dict(image_size=(32, 48), resize_mode="whole"),
    dict(image_size=24, tiling=(32, 20)),
    dict(image_size=(24, 32), resize_mode="pad", tiling=((30, 40), (16, 25))),
)


@functools.lru_cache(maxsize=None)
def geometry_model(index: int, device: str = "cpu") -> SimpleNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SimpleNet(TinyBackbone(), weights=None, pretrain_embed_dim=30, target_embed_dim=21,
                          hidden=40, **GEOMETRIES[index])
    randomize_head(model.head, torch.Generator().manual_seed(1))
    return model.to(device)


def as_list(maps) -> list:
    return list(maps) if maps is not None else []


@pytest.mark.parametrize("device", DEVICES)
@fuzz_settings(40)
@given(images=st.one_of(image_sources(), st.lists(image_sources(), min_size=0, max_size=3)),
       batch_size=st.integers(1, 3), index=st.integers(0, len(GEOMETRIES) - 1),
       input_maps=st.booleans())
def test_any_geometry_agrees_with_the_reference_or_refuses_alike(device, images, batch_size, index,
                                                                  input_maps):
    """Every geometry: the reference's answer, maps of the images' own sizes where asked, no
    padding in any score, or the same clear refusal."""
    CASES["SimpleNet.score geometry"] += 1
    model = geometry_model(index, device)
    map_size = "input" if input_maps or model.tiling is not None else "model"
    fused, fused_error = outcome(lambda: model.score(images, batch_size, map_size=map_size))
    reference, reference_error = outcome(
        lambda: model.score(images, batch_size, fused=False, map_size=map_size))
    assert fused_error == reference_error
    if fused is None:
        return
    sizes = [model.prepare(source).size for _, source in simplenet_fast.preprocess.iter_sources(images)]
    maps, masks = as_list(fused.anomaly_map), as_list(fused.scored_mask)
    expected = sizes if map_size == "input" else [model.image_size] * len(sizes)
    assert [tuple(m.shape) for m in maps] == expected
    assert not masks or [tuple(m.shape) for m in masks] == expected
    assert_matches(fused.pred_score, reference.pred_score.double().cpu())
    for i, (a, b) in enumerate(zip(maps, as_list(reference.anomaly_map))):
        assert_matches(a, b.double().cpu())
        if masks:  # unscored pixels hold the lowest scored value
            scored = masks[i]
            assert bool(scored.any()) and bool((a[~scored] == a[scored].min()).all())
    if fused.patch_scores is not None:  # padding never raises an image score
        assert torch.equal(fused.pred_score, fused.patch_scores.amax(dim=(1, 2)))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A registry backbone (custom modules cannot be saved) with a small head, on disk."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SimpleNet("efficientnet_lite0", weights=None, image_size=SIZE, resize=RESIZE,
                          pretrain_embed_dim=24, target_embed_dim=20, hidden=16)
    randomize_head(model.head, torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("fuzz") / "lite.pt"
    model.save(path)
    return model, path


@fuzz_settings(20)
@given(images=st.lists(image_sources(), min_size=1, max_size=3), batch_size=st.integers(1, 4))
def test_module_level_score_agrees_with_the_reference(saved_model, images, batch_size):
    CASES["simplenet_fast.score"] += 1
    model, path = saved_model
    fused, fused_error = outcome(lambda: simplenet_fast.score(images, model=path, batch_size=batch_size))
    reference, reference_error = outcome(lambda: model.score(images, batch_size=batch_size, fused=False))
    assert fused_error == reference_error
    if fused is not None:
        assert_matches(fused.anomaly_map, reference.anomaly_map.double())
        assert_matches(fused.pred_score, reference.pred_score.double())


# ------------------------------------------------------------------- damaged image files
def encoded(fmt: str, rng: np.random.RandomState) -> bytes:
    array = rng.randint(0, 256, (rng.randint(1, 40), rng.randint(1, 40), 3), dtype=np.uint8)
    image = Image.fromarray(array)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [image, Image.fromarray(255 - array)]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    elif fmt == "APNG":
        image.save(buf, format="PNG", save_all=True, append_images=[Image.fromarray(255 - array)])
    elif fmt == "TIFF16":
        Image.fromarray(array[:, :, 0].astype(np.uint16) * 257).save(buf, format="TIFF")
    elif fmt == "JPEG-CMYK":
        image.convert("CMYK").save(buf, format="JPEG")
    elif fmt == "PNG-P":
        image.convert("P").save(buf, format="PNG")
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


@fuzz_settings(250)
@given(fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "APNG", "TIFF16",
                            "JPEG-CMYK", "PNG-P"]),
       seed=st.integers(0, 2**31 - 1),
       damage=st.sampled_from(["truncate", "flip", "garbage", "zero_run", "none"]),
       data=st.data())
def test_damaged_image_files_give_a_crop_or_a_clear_error(tmp_path_factory, fmt, seed, damage, data):
    CASES["image files"] += 1
    rng = np.random.RandomState(seed)
    raw = bytearray(encoded(fmt, rng))
    if damage == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[rng.randint(len(raw))] ^= 1 << rng.randint(8)
    elif damage == "garbage":
        at = rng.randint(len(raw))
        raw[at:at + 16] = rng.randint(0, 256, 16, dtype=np.uint8).tobytes()
    elif damage == "zero_run":
        at = rng.randint(len(raw))
        raw[at:at + 64] = bytes(len(raw[at:at + 64]))
    path = tmp_path_factory.mktemp("img") / f"image.{fmt.split('-')[0].lower().replace('apng', 'png').replace('tiff16', 'tif')}"
    path.write_bytes(bytes(raw))
    try:
        crop = preprocess_image(path, SIZE, RESIZE)
    except ValueError as error:
        assert str(path) in str(error), f"the error does not name the file: {error}"
        return
    assert crop.dtype == torch.uint8 and crop.shape == (SIZE, SIZE, 3)


# ------------------------------------------------------------------- damaged model files
@fuzz_settings(40)
@given(damage=st.sampled_from(["truncate", "flip", "garbage", "member"]), seed=st.integers(0, 2**31 - 1),
       data=st.data())
def test_damaged_model_files_load_or_are_refused(saved_model, tmp_path_factory, damage, seed, data):
    CASES["model files"] += 1
    _, path = saved_model
    raw = bytearray(path.read_bytes())
    rng = np.random.RandomState(seed)
    out = tmp_path_factory.mktemp("model") / "damaged.pt"
    if damage == "member":  # a consistent zip whose pickle is damaged: the unpickler sees it
        with zipfile.ZipFile(path) as z:
            members = {n: z.read(n) for n in z.namelist()}
        name = next(n for n in members if n.endswith("data.pkl"))
        pickle = bytearray(members[name])
        for _ in range(data.draw(st.integers(1, 4))):
            pickle[rng.randint(len(pickle))] = rng.randint(256)
        members[name] = bytes(pickle)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
            for n, content in members.items():
                z.writestr(n, content)
    else:
        if damage == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif damage == "flip":
            for _ in range(data.draw(st.integers(1, 8))):
                raw[rng.randint(len(raw))] ^= 1 << rng.randint(8)
        else:
            at = rng.randint(len(raw))
            raw[at:at + 32] = rng.randint(0, 256, 32, dtype=np.uint8).tobytes()
        out.write_bytes(bytes(raw))
    try:
        model = SimpleNet.load(out)
    except ValueError as error:
        assert str(out) in str(error)
        return
    # A flip inside tensor data loads (no checksum is verified): the model must still be sane.
    for value in model.head.state_dict().values():
        assert not value.is_floating_point() or torch.isfinite(value).all()
