"""Hardening: no crash, no silent wrong answer, no code execution, bounded memory.

Deterministic companions of tests/test_fuzz.py (which draws random cases): the limits of what the
kernels can index, scores that overflow float32, model files that must be refused, image files of
every awkward kind, several threads on one model, bounded and flat memory, and bit-identical
scores on the CPU. Memory is measured in fresh interpreters by bench/bench_memory.py.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import simplenet_fast
from conftest import TinyBackbone, random_features, randomize_head, relative_error
from simplenet_fast import SimpleNet, SimpleNetHead, anomaly_map, build_info
from simplenet_fast import _fused
from simplenet_fast.preprocess import preprocess_image

ROOT = Path(__file__).resolve().parent.parent
FLOAT32_TOL = 1e-4  # SPEC 6
SIZE, RESIZE = 32, 36
needs_compiled = pytest.mark.skipif(not build_info()["compiled"], reason="simplenet_fast._C is not built")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_growth():
    """Measures how far the resident set peaks above where it stood on entry (MiB), from the
    kernel's high-water mark reset on entry (/proc/self/clear_refs, Linux >= 4.0), not from
    ru_maxrss, which an earlier, larger peak of this long-lived process would mask. Where the
    mark cannot be reset, an earlier peak can mask growth (the check is then weaker, never wrong)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    out = {"mib": None}
    start = max(_status_kib("VmRSS"), _status_kib("VmHWM"))
    yield out
    out["mib"] = (_status_kib("VmHWM") - start) / 1024


def tiny_head(seed: int = 0) -> SimpleNetHead:
    torch.manual_seed(seed)
    return randomize_head(SimpleNetHead((3, 5), 7, 5, 17), torch.Generator().manual_seed(seed))


def float64_scores(head: SimpleNetHead, features) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(head).double().reference_patch_scores([f.double() for f in features])


# ------------------------------------------------------------------- sizes the kernels can index
@needs_compiled
def test_sizes_the_kernels_cannot_index_in_int32_are_refused_before_any_work():
    """csrc/cuda forms B*H*W and C*H*W in int32 (csrc/head.h takes every size as int32): larger
    inputs are refused by the wrapper, before any copy or workspace is allocated. Expanded
    tensors give the shapes without the memory."""
    def zeros(b, c, h, w):
        return torch.zeros(1, 1, 1, 1).expand(b, c, h, w)

    limit, int32_max = _fused._MAX_LOCATIONS, 2**31 - 1
    one_channel = SimpleNetHead((1, 1), 4, 4, 8).eval()
    small3 = zeros(1, 1, 1, 1)
    # B*H*W at the limit is fine for the size rule; one more location is not.
    assert _fused.size_error([zeros(1, 1, limit, 1), small3]) is None
    over = [zeros(1, 1, limit + 1, 1), small3]
    assert "B*H*W" in _fused.size_error(over)
    # ... also when it is the batch that makes it large, and on layer3.
    assert _fused.size_error([zeros(2**16, 1, 2**8, 2**8), zeros(2**16, 1, 1, 1)]) is not None
    assert _fused.size_error([zeros(1, 1, 1, 1), zeros(1, 1, limit + 1, 1)]).startswith("layer3")
    # C*H*W of one image over int32, with few locations.
    three = SimpleNetHead((3, 1), 4, 4, 8).eval()
    wide = [zeros(1, 3, int32_max // 3 + 1, 1), small3]
    assert "C*H*W" in _fused.size_error(wide)
    for head, features in ((one_channel, over), (three, wide)):
        assert not _fused.can_run(features)  # fused=None would take the reference
        start = time.perf_counter()
        with pytest.raises(ValueError, match="too large for the fused head"):
            _fused.fused_patch_scores(head, features)
        assert time.perf_counter() - start < 1.0  # refused up front, nothing materialised


# ------------------------------------------------------------------- no NaN ever passes
def test_features_that_overflow_float32_raise_instead_of_returning_nan():
    head = tiny_head()
    g = torch.Generator().manual_seed(0)
    features = [torch.rand(2, 3, 4, 5, generator=g) * 1e38, torch.rand(2, 5, 2, 3, generator=g) * 1e38]
    expected = float64_scores(head, features)
    assert torch.isfinite(expected).all() and expected.abs().max() < 3e38  # representable
    with torch.no_grad():
        # The float32 reference overflows in its intermediate sums: it must refuse, not return NaN.
        with pytest.raises(ValueError, match="produced NaN or Inf .* too large for float32"):
            head.patch_scores(features, fused=False)
        if build_info()["compiled"]:
            # The fold keeps the fused head's intermediates smaller: its answer is the right one.
            scores = head.patch_scores(features, fused=True)
            assert relative_error(scores, expected) < FLOAT32_TOL


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("where", ["adaptor.weight", "discriminator.bn.running_var", "discriminator.tail.weight"])
def test_nan_weights_raise_instead_of_scoring(fused, where):
    if fused and not build_info()["compiled"]:
        pytest.skip("simplenet_fast._C is not built")
    head = tiny_head()
    with torch.no_grad():
        _get(head, where).view(-1)[0] = float("nan")
    features = [torch.rand(1, 3, 4, 5), torch.rand(1, 5, 2, 3)]
    with torch.no_grad(), pytest.raises(ValueError, match="weights hold NaN"):
        head.patch_scores(features, fused=fused)


def _get(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_parameter(name) if name in dict(module.named_parameters()) else module.get_buffer(name)



def test_low_precision_and_float64_features_are_scored_in_float32():
    """float16 / float64 have no CPU kernel: fused=None takes the reference, which widens them
    (exact) to the head's float32 instead of failing inside F.linear. bfloat16 (a bf16 backbone's
    maps) has one: the wrapper widens it exactly to float32 for the kernel."""
    head = tiny_head()
    g = torch.Generator().manual_seed(1)
    base = [torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 5, 2, 3, generator=g)]
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        features = [f.to(dtype) for f in base]
        fused_options = (None, True) if dtype == torch.bfloat16 and build_info()["compiled"] else (None,)
        for fused in fused_options:
            with torch.no_grad():
                scores = head.patch_scores(features, fused=fused)
            assert scores.dtype == torch.float32
            assert relative_error(scores, float64_scores(head, features)) < FLOAT32_TOL


# ------------------------------------------------------------------- models: shared small ones
def tiny_model(seed: int = 0) -> SimpleNet:
    torch.manual_seed(seed)
    model = SimpleNet(TinyBackbone(), weights=None, image_size=SIZE, resize=RESIZE,
                      pretrain_embed_dim=30, target_embed_dim=21, hidden=40)
    randomize_head(model.head, torch.Generator().manual_seed(seed))
    return model


def test_model_score_refuses_nan_weights():
    model = tiny_model()
    with torch.no_grad():
        model.head.discriminator.linear.bias[3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.score(np.zeros((40, 40, 3), np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small EfficientNet-Lite0 model (random weights) saved once: (model, path)."""
    torch.manual_seed(0)
    model = SimpleNet("efficientnet_lite0", weights=None, image_size=SIZE, resize=RESIZE,
                      pretrain_embed_dim=24, target_embed_dim=20, hidden=16)
    path = tmp_path_factory.mktemp("hardening") / "model.pt"
    model.save(path)
    return model, path


def rewrite(saved, tmp_path, change) -> Path:
    _, path = saved
    obj = torch.load(path, map_location="cpu", weights_only=True)
    change(obj)
    out = tmp_path / "changed.pt"
    torch.save(obj, out)
    return out


def set_config(**values):
    return lambda obj: obj["config"].update(values)


# ------------------------------------------------------------------- model files
@pytest.mark.parametrize("change, message", [
    # wrong types (test_serialization covers a string for an int)
    (set_config(image_size=32.0), "'image_size' is missing or not [height, width] ints"),
    (set_config(image_size=[32, 32.0]), "'image_size' is missing or not [height, width] ints"),
    (set_config(resize="72"), "'resize' is missing or not an int or None"),
    (set_config(tiling=[64, 32]), "'tiling' is missing or not None or"),
    (set_config(resize_mode=None), "'resize_mode' is missing or not str"),
    (set_config(epochs=2.5), "'epochs' is missing or not int"),
    (set_config(hidden=True), "'hidden' is missing or not int"),
    (set_config(target_embed_dim=None), "'target_embed_dim' is missing or not int"),
    (set_config(sigma="2"), "'sigma' is missing or not a number"),
    (set_config(precision=3), "'precision' is missing or not str"),
    (set_config(backbone=["efficientnet_lite0"]), "'backbone' is missing or not str"),
    (lambda o: o["config"].pop("resize"), "'resize' is missing"),
    (lambda o: o.update(config=[("image_size", 32)]), "config must be a dict"),
    (lambda o: o.update(head=[torch.zeros(2)]), "'head' must be a state dict of tensors"),
    (lambda o: o["head"].update({"adaptor.weight": "not a tensor"}), "'head' must be a state dict"),
    # wrong values
    (set_config(image_size=[0, 40]), "unusable config"),
    (set_config(image_size=[40, 40], resize=36), "unusable config"),
    (set_config(resize_mode="stretch"), "unusable config"),
    (set_config(resize_mode="whole"), "unusable config"),  # a resize with whole
    (set_config(tiling=[[64, 64], [65, 65]]), "unusable config"),
    (set_config(sigma=float("nan")), "unusable config"),
    (set_config(sigma=1e9), "unusable config"),  # 8e9 blur taps
    (set_config(precision="float16"), "unusable config"),
    (set_config(image_size=[10**9, 10**9], resize=10**9), "unusable config"),
    (set_config(pretrain_embed_dim=10**8), "unusable config"),  # the fold would be [P, C*9] float64
    # tensors that do not fit the config, or declared sizes no tensor backs
    (set_config(hidden=10**9), "do not fit its config"),
    (set_config(target_embed_dim=2**20), "do not fit its config"),
    (lambda o: o["head"].update({"discriminator.linear.weight": torch.zeros(16, 21)}), "do not fit its config"),
    (lambda o: o["head"].update({"discriminator.bn.running_var": torch.zeros(17)}), "do not fit its config"),
    # numbers that would score NaN
    (lambda o: o["head"]["adaptor.weight"].view(-1).__setitem__(5, float("nan")), "NaN or Inf in its head"),
    (lambda o: o["head"]["discriminator.bn.running_mean"].__setitem__(0, float("inf")), "NaN or Inf in its head"),
    (lambda o: next(v for k, v in o["backbone"].items() if v.is_floating_point()).view(-1).__setitem__(0, float("nan")),
     "NaN or Inf in its backbone"),
])
def test_model_files_with_bad_configs_or_weights_are_refused(saved, tmp_path, change, message):
    out = rewrite(saved, tmp_path, change)
    with peak_growth() as peak, pytest.raises(ValueError) as info:
        SimpleNet.load(out)
    assert message in str(info.value) and str(out) in str(info.value)
    # Refused before anything the declared sizes ask for is allocated (hidden=10**9 would be 6 GB;
    # building the small model itself takes ~20 MB).
    assert peak["mib"] < 150, peak


def _zip_with_pickle(source: Path, out: Path, edit) -> None:
    with zipfile.ZipFile(source) as z:
        members = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    edited = edit(members[name])
    assert edited != members[name]
    members[name] = edited
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for n, content in members.items():
            z.writestr(n, content)


@pytest.mark.parametrize("what, edit", [
    # the tensor [4] declares shape [2**30]: more than its 16-byte storage holds
    ("shape", lambda p: p.replace(b"K\x00K\x04\x85", b"K\x00J\x00\x00\x00\x40\x85")),
    # the storage declares 2**40 elements (4 TiB) for a 16-byte record
    ("storage", lambda p: p.replace(b"X\x03\x00\x00\x00cpuq\x06K\x04t",
                                    b"X\x03\x00\x00\x00cpuq\x06\x8a\x06\x00\x00\x00\x00\x00\x01t")),
])
def test_files_declaring_huge_tensors_are_refused_without_allocating(tmp_path, what, edit):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(4)}, plain)
    out = tmp_path / f"{what}.pt"
    _zip_with_pickle(plain, out, edit)
    with peak_growth() as peak, pytest.raises(ValueError, match="cannot be read as a simplenet_fast model") as info:
        SimpleNet.load(out)
    assert str(out) in str(info.value)
    assert peak["mib"] < 50, peak


class Marker:
    """Unpickling this creates `path` (code execution); a config entry must never do that."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_inside_the_config_never_runs(saved, tmp_path):
    marker = tmp_path / "ran"
    out = rewrite(saved, tmp_path, set_config(sigma=Marker(marker)))
    with pytest.raises(ValueError, match="refused"):
        SimpleNet.load(out)
    with pytest.raises(ValueError, match="refused"):
        simplenet_fast.score(np.zeros((40, 40, 3), np.uint8), model=out)
    assert not marker.exists()


def test_model_constructor_bounds_what_a_file_could_declare():
    for kwargs, message in ((dict(image_size=9000, resize=9000), "image_size must be positive and at most 8192"),
                            (dict(image_size=64, tiling=(9000, 64)), "tile must be positive and at most 8192"),
                            (dict(pretrain_embed_dim=10**6), "pretrain_embed_dim must be <= 16384"),
                            (dict(sigma=100.0, image_size=64, resize=72), r"sigma must be <= max\(64.*longer side 64\)")):
        with pytest.raises(ValueError, match=message):
            SimpleNet(TinyBackbone(), weights=None, **kwargs)


def test_anomaly_map_bounds_sigma_by_the_map():
    with pytest.raises(ValueError, match=r"sigma must be <= max\(64"):
        anomaly_map(torch.zeros(1, 4, 4), (8, 12), sigma=1e8)
    with pytest.raises(ValueError, match="the map's longer side 300"):
        anomaly_map(torch.zeros(1, 4, 4), (200, 300), sigma=301.0)
    assert anomaly_map(torch.zeros(1, 4, 4), (8, 12), sigma=64.0).shape == (1, 8, 12)
    assert anomaly_map(torch.zeros(1, 4, 4), (200, 300), sigma=300.0).shape == (1, 200, 300)


# ------------------------------------------------------------------- images
def frames(n=3, h=50, w=60):
    """Frames that differ everywhere, so a crop tells which one was read."""
    rng = np.random.RandomState(5)
    base = rng.randint(0, 200, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) + 20 * i for i in range(n)]


def crop(source):
    return preprocess_image(source, SIZE, RESIZE)


@pytest.mark.parametrize("fmt", ["GIF", "APNG", "TIFF", "WEBP"])
def test_multi_frame_files_give_their_first_frame(tmp_path, fmt):
    arrays = frames()
    images = [Image.fromarray(a) for a in arrays]
    suffix = {"GIF": "gif", "APNG": "png", "TIFF": "tif", "WEBP": "webp"}[fmt]
    path = tmp_path / f"animated.{suffix}"
    options = dict(save_all=True, append_images=images[1:])
    if fmt == "WEBP":
        options["lossless"] = True
    images[0].save(path, format="PNG" if fmt == "APNG" else fmt, **options)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3  # really multi-frame
        first = check.convert("RGB")  # what PIL decodes as frame 0 (GIF: through its palette)
    got = crop(path)
    torch.testing.assert_close(got, crop(first), rtol=0, atol=0)
    for other in images[1:]:
        assert not torch.equal(got, crop(other.convert("RGB")))


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("P", "PNG"), ("P", "GIF"), ("RGB", "BMP"),
                                       ("1", "PNG"), ("LA", "PNG"), ("L", "JPEG"), ("RGBA", "WEBP"),
                                       ("I;16", "PNG"), ("I;16", "TIFF"), ("I", "TIFF"), ("F", "TIFF")])
def test_image_files_of_every_mode_convert_as_documented(tmp_path, mode, fmt):
    """preprocess.py: PIL convert("RGB"), except 16-bit (scaled by 257) and float (refused)."""
    rgb = frames(1)[0]
    if mode == "I;16":
        image = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    elif mode == "I":
        image = Image.fromarray(rgb[:, :, 0].astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(rgb[:, :, 0].astype(np.float32) / 255)
    elif mode == "P":
        image = Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 0
    else:
        image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    if mode == "F":
        with pytest.raises(ValueError, match="mode 'F'") as info:
            crop(path)
        assert str(path) in str(info.value)
        return
    got = crop(path)
    assert got.dtype == torch.uint8 and got.shape == (SIZE, SIZE, 3)
    with Image.open(path) as decoded:
        decoded.load()
        if mode in ("I;16", "I"):  # the documented 16-bit scaling: round(v / 257)
            expected = crop(np.asarray(decoded).astype(np.uint16))
        else:
            expected = crop(decoded.convert("RGB"))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if mode in ("I;16", "I"):  # 16-bit grey written from 8-bit * 257 comes back as the 8-bit
        torch.testing.assert_close(got[..., 0], crop(rgb[:, :, 0])[..., 0], rtol=0, atol=0)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image, and almost no pixel data (a bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def test_huge_dimension_files_are_refused_before_decoding(tmp_path):
    """A 100000 x 100000 PNG header (30 GB decoded) is a decompression bomb under PIL's default
    limit (no monkeypatching here): refused at once, nothing allocated."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    start = time.perf_counter()
    with peak_growth() as peak, pytest.raises(ValueError, match="decompression bomb") as info:
        crop(path)
    assert str(path) in str(info.value) and time.perf_counter() - start < 2
    assert peak["mib"] < 50, peak
    # Under the limit but with its pixel data missing: truncated, not a crash or a black image.
    path.write_bytes(png_header_only(3000, 2000))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        crop(path)


@pytest.mark.parametrize("kind", ["file", "array", "pil", "float_tensor", "uint8_tensor"])
def test_extreme_aspect_ratios_are_refused_before_resizing(tmp_path, kind):
    """A 1 x 200000 strip is 200 KB, but resized to a short side of 329 it would be 329 x
    65,800,000 pixels (65 GB as RGB float): refused with a clear error, memory untouched."""
    strip = np.full((1, 200_000, 3), 128, np.uint8)
    source = {
        "file": tmp_path / "strip.png",
        "array": strip,
        "pil": Image.fromarray(strip),
        "float_tensor": torch.from_numpy(strip).permute(2, 0, 1).float() / 255,
        "uint8_tensor": torch.from_numpy(strip).permute(2, 0, 1),
    }[kind]
    if kind == "file":
        Image.fromarray(strip).save(source)
    with peak_growth() as peak, pytest.raises(ValueError, match=r"would be resized to 329x65800000 .* aspect ratio"):
        preprocess_image(source, 288, 329)
    assert peak["mib"] < 50, peak
    # A long strip within the limit is scored as documented (resize, then centre crop).
    assert preprocess_image(np.full((1, 200, 3), 7, np.uint8), 288, 329).unique().tolist() == [7]


# ------------------------------------------------------------------- threads
def run_threads(work, n: int) -> list:
    results, errors = [None] * n, []

    def target(i):
        try:
            results[i] = work(i)
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a scoring thread hangs"
    assert not errors, errors
    return results


def test_threads_scoring_with_one_model_match_one_thread_bit_for_bit():
    """Four threads share one model (and the fold cache, emptied first so that they all race to
    build it); each gets exactly what the same call gives on a thread of its own."""
    model = tiny_model()
    rng = np.random.RandomState(0)
    inputs = [[rng.randint(0, 256, (40, 44 + i, 3), dtype=np.uint8) for _ in range(3)] for i in range(4)]
    alone = [run_threads(lambda _: model.score(images, batch_size=2), 1)[0] for images in inputs]
    for _ in range(3):
        _fused._CACHE.clear()
        together = run_threads(lambda i: model.score(inputs[i], batch_size=2), 4)
        for a, b in zip(alone, together):
            for field in ("pred_score", "anomaly_map", "patch_scores"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_threads_scoring_one_model_file_load_it_once(saved):
    model, path = saved
    image = np.random.RandomState(1).randint(0, 256, (40, 40, 3), dtype=np.uint8)
    expected = model.score(image).pred_score
    simplenet_fast.model._LOADED.clear()
    results = run_threads(lambda _: simplenet_fast.score(image, model=path).pred_score, 4)
    assert len(simplenet_fast.model._LOADED) == 1
    for r in results:
        assert torch.equal(r, expected)


# ------------------------------------------------------------------- determinism (CPU)
@needs_compiled
def test_fused_cpu_scores_are_bit_identical_across_calls_and_thread_counts():
    """Every location's sums run in one fixed order whatever thread computes it (csrc/cpu), so
    the fused head gives the same bits on 1, 2 or 3 OpenMP threads (3 oversubscribes 2 cores);
    the paper's shapes are large enough that the kernel does use every thread."""
    g = torch.Generator().manual_seed(0)
    head = randomize_head(SimpleNetHead(), g)
    features = random_features(head.channels, 2, (36, 36), (18, 18), g)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)  # torch and the extension share libgomp's ICV
            with torch.no_grad():
                results[threads] = [head.patch_scores(features, fused=True) for _ in range(2)]
    finally:
        torch.set_num_threads(previous)
    first = results[1][0]
    assert all(torch.equal(first, s) for runs in results.values() for s in runs)
    assert relative_error(first, float64_scores(head, features)) < FLOAT32_TOL


def test_score_is_bit_identical_across_calls():
    """The whole CPU path (decode, backbone, head, map), per thread count: repeated calls agree."""
    model = tiny_model()
    images = [np.random.RandomState(i).randint(0, 256, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a, b = model.score(images, batch_size=2), model.score(images, batch_size=2)
            for field in ("pred_score", "anomaly_map", "patch_scores"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (threads, field)
    finally:
        torch.set_num_threads(previous)


@needs_compiled
def test_fused_scores_do_not_depend_on_other_images_in_the_batch():
    """An image's scores are the same bits alone or inside any batch (CPU: no cross-image sums)."""
    g = torch.Generator().manual_seed(3)
    head = randomize_head(SimpleNetHead((40, 112), 300, 200, 96), g)
    f2, f3 = random_features(head.channels, 5, (35, 37), (18, 19), g)
    with torch.no_grad():
        batch = head.patch_scores([f2, f3], fused=True)
        for i in (0, 4):
            alone = head.patch_scores([f2[i:i + 1], f3[i:i + 1]], fused=True)
            assert torch.equal(alone[0], batch[i])


# ------------------------------------------------------------------- memory (measured)
def bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICK = ["--quick"]


@pytest.mark.slow
def test_peak_memory_follows_the_batch_size_not_the_number_of_images():
    """Fresh interpreters (bench/bench_memory.py), ru_maxrss: scoring 8x more images at the same
    batch size adds no more than the results themselves (twice: the per-batch outputs and their
    concatenation), while a larger batch size costs visibly more."""
    bench = bench_memory()
    small = bench.run_worker("peak", QUICK, ["--batch-size", "4", "--images", "16"])
    many = bench.run_worker("peak", QUICK, ["--batch-size", "4", "--images", "128"])
    large = bench.run_worker("peak", QUICK, ["--batch-size", "128", "--images", "128"])
    print(json.dumps({"small": small, "many": many, "large": large}))
    working_small = small["peak_added_mib"] - 2 * small["results_mib"]
    working_many = many["peak_added_mib"] - 2 * many["results_mib"]
    assert working_many < working_small + 8, (small, many)
    assert large["peak_added_mib"] > many["peak_added_mib"] + 10, (many, large)


@pytest.mark.slow
def test_resident_memory_stays_flat_over_500_score_calls():
    bench = bench_memory()
    calls = bench.run_worker("calls", QUICK, ["--calls", "500", "--warmup", "20", "--every", "25"])
    print(json.dumps({k: v for k, v in calls.items() if k != "samples_kib"}))
    # Once the allocator has settled (first 25 calls), a leak of 4 KiB per call would add ~2 MiB
    # over the remaining 475; measured: 0.0 MiB here, 0.0 for WideResNet-50-2 at 288.
    assert calls["steady_growth_mib"] < 2 and calls["growth_mib"] < 8, calls


@pytest.mark.parametrize("content", [
    b"P6\n4\xa01 3\n255\n" + bytes(36),   # a damaged width: PIL raises a bare ValueError
    b"P6\n4 3\n",                          # the header ends early
    b"P6\n25" + bytes(range(200, 255)),   # a token longer than PIL allows
], ids=["bad-width", "short-header", "long-token"])
def test_damaged_headers_name_the_file(tmp_path, content):
    """Found by the fuzzer (tests/test_fuzz.py): PIL's PPM reader raises ValueErrors that do not
    say which file; preprocess wraps every decoding error with the path."""
    path = tmp_path / "damaged.ppm"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot be decoded|not an image PIL can identify") as info:
        crop(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fused", [None, False])
def test_a_single_nan_or_inf_anywhere_in_the_maps_is_refused(fused):
    """NaN / Inf are caught on the scores (head.check_scores), which every feature value reaches
    when layer3's grid is upsampled onto layer2's (the backbones' stride 16 -> 8): try each
    position of both maps, one at a time, in channels 0 (the plans' padding entries read
    unfolded index 0) and the last."""
    head = tiny_head()
    g = torch.Generator().manual_seed(4)
    base = [torch.rand(2, 3, 4, 5, generator=g), torch.rand(2, 5, 2, 3, generator=g)]
    for layer, f in enumerate(base):
        b, c, h, w = f.shape
        for index in [(i, ch, y, x) for i in range(b) for ch in (0, c - 1) for y in range(h) for x in range(w)]:
            features = [t.clone() for t in base]
            features[layer][index] = float("nan") if sum(index) % 2 else -float("inf")
            with torch.no_grad(), pytest.raises(ValueError, match="features contain NaN or Inf"):
                head.patch_scores(features, fused=fused)
