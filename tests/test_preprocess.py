"""Image inputs -> uint8 centre crops (simplenet_fast/preprocess.py, SPEC.md 1.1)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from simplenet_fast.geometry import InputGeometry
from simplenet_fast.preprocess import (crop_offset, image_files, iter_batches, iter_sources,
                                       normalise, prepare_image, preprocess_image, resized_size)

SIZE, RESIZE = 64, 72


def rgb_array(h=72, w=90, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def crop(source, size=SIZE, resize=RESIZE):
    return preprocess_image(source, size, resize)


def reference_crop(image: Image.Image, size=SIZE, resize=RESIZE) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on PIL, written out independently."""
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.array(image.crop((left, top, left + size, top + size)))


# ------------------------------------------------------------------------------- geometry
def test_paper_geometry():
    assert resized_size(329, 329, 329) == (329, 329)
    assert crop_offset(329, 288) == 20  # SPEC 1.1: rows/cols 20..307
    assert resized_size(900, 1024, 329) == (329, int(329 * 1024 / 900))
    assert resized_size(1024, 900, 329) == (int(329 * 1024 / 900), 329)
    assert resized_size(300, 300, 329) == (329, 329)
    assert crop_offset(375, 288) == 44  # round(43.5) = 44 (half to even)
    assert crop_offset(373, 288) == 42  # round(42.5) = 42


@pytest.mark.parametrize("shape", [(72, 90), (90, 72), (100, 130), (60, 50), (72, 72), (301, 77)])
def test_pil_crop_matches_torchvision_rule(shape):
    image = Image.fromarray(rgb_array(*shape, seed=shape[0]))
    out = crop(image)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(out.numpy(), reference_crop(image))


def test_matches_torchvision_when_installed():
    tv = pytest.importorskip("torchvision.transforms")
    transform = tv.Compose([tv.Resize(329), tv.CenterCrop(288)])
    for i, (h, w) in enumerate([(300, 300), (480, 640), (1024, 900), (329, 400)]):
        image = Image.fromarray(rgb_array(h, w, seed=i))
        expected = np.asarray(transform(image))
        np.testing.assert_array_equal(preprocess_image(image, 288, 329).numpy(), expected)


# ------------------------------------------------------------------------------- same picture, any form
def test_every_form_gives_the_same_crop(tmp_path):
    array = rgb_array(72, 90)  # short side == RESIZE: no resampling, so float tensors match too
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    expected = crop(array)
    chw = torch.from_numpy(array).permute(2, 0, 1)
    forms = [path, str(path), Image.open(path), array, chw.contiguous(),
             chw.float() / 255, chw.double() / 255, (chw.float() / 255).requires_grad_(),
             np.ascontiguousarray(array[:, :, ::-1])[:, :, ::-1]]  # negative-stride view
    for form in forms:
        torch.testing.assert_close(crop(form), expected, rtol=0, atol=0)
    # A [B, C, H, W] tensor is B images.
    batch = list(iter_batches(torch.stack([chw, chw]), 8, SIZE, RESIZE))
    assert len(batch) == 1 and batch[0].shape == (2, SIZE, SIZE, 3)
    torch.testing.assert_close(batch[0][1], expected, rtol=0, atol=0)


def test_resized_forms_agree(tmp_path):
    array = rgb_array(100, 130)  # needs resampling
    path = tmp_path / "img.jpg.png"
    Image.fromarray(array).save(path)
    expected = torch.from_numpy(reference_crop(Image.fromarray(array)))
    for form in (path, Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)):
        torch.testing.assert_close(crop(form), expected, rtol=0, atol=0)
    # float tensors resample with torch (antialias): within one grey level of PIL, not bit-equal
    floats = crop(torch.from_numpy(array).permute(2, 0, 1).float() / 255).int()
    diff = (floats - expected.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.35


def test_float_tensor_upscaling_is_close_to_pil():
    array = rgb_array(40, 50)
    expected = torch.from_numpy(reference_crop(Image.fromarray(array))).int()
    got = crop(torch.from_numpy(array).permute(2, 0, 1).float() / 255).int()
    assert (got - expected).abs().max() <= 1


# ------------------------------------------------------------------------------- conversions
def test_grayscale_is_replicated():
    grey = rgb_array()[:, :, 0]
    expected = crop(np.repeat(grey[:, :, None], 3, axis=2))
    for form in (grey, grey[:, :, None], Image.fromarray(grey),
                 torch.from_numpy(grey)[None], torch.from_numpy(grey)[None].float() / 255):
        torch.testing.assert_close(crop(form), expected, rtol=0, atol=0)
    assert torch.equal(expected[..., 0], expected[..., 2])


def test_rgba_drops_alpha_like_pil():
    rgba = np.random.RandomState(1).randint(0, 256, (72, 90, 4), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows keep their colour: alpha is dropped, not composited
    expected = crop(np.ascontiguousarray(rgba[:, :, :3]))
    torch.testing.assert_close(crop(rgba), expected, rtol=0, atol=0)
    torch.testing.assert_close(crop(Image.fromarray(rgba, "RGBA")), expected, rtol=0, atol=0)
    la = Image.fromarray(rgba[:, :, :2].copy(), "LA")
    torch.testing.assert_close(crop(la), crop(np.asarray(la)[:, :, 0]), rtol=0, atol=0)


def test_palette_and_cmyk_follow_pil_convert():
    image = Image.fromarray(rgb_array(80, 96))
    for converted in (image.convert("P", palette=Image.ADAPTIVE, colors=16), image.convert("CMYK"),
                      image.convert("1"), image.convert("YCbCr")):
        expected = reference_crop(converted.convert("RGB"))
        np.testing.assert_array_equal(crop(converted).numpy(), expected)


def test_16bit_is_scaled_not_clipped(tmp_path):
    v8 = rgb_array()[:, :, 0]
    v16 = v8.astype(np.uint16) * 257  # exact 16-bit version of the 8-bit picture
    expected = crop(v8)
    torch.testing.assert_close(crop(v16), expected, rtol=0, atol=0)
    torch.testing.assert_close(crop(np.stack([v16] * 3, axis=2)), crop(np.stack([v8] * 3, axis=2)),
                               rtol=0, atol=0)
    path = tmp_path / "grey16.png"
    Image.fromarray(v16).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    torch.testing.assert_close(crop(path), expected, rtol=0, atol=0)
    # mode "I" (32-bit signed; older Pillow's 16-bit PNGs) holding 16-bit data
    torch.testing.assert_close(crop(Image.fromarray(v16.astype(np.int32))), expected, rtol=0, atol=0)
    # mid-grey stays mid-grey (PIL's own convert would clip 32768 to 255)
    mid = np.full((72, 72), 32768, np.uint16)
    assert crop(mid).unique().tolist() == [128]
    assert crop(np.full((72, 72), 65535, np.uint16)).unique().tolist() == [255]
    assert np.asarray(Image.fromarray(mid).convert("RGB")).max() == 255  # what we avoid


@pytest.mark.parametrize("mode,size,shape", [("crop", 64, (72, 90)), ("crop", (40, 64), (40, 80)),
                                              ("whole", 64, (64, 64)), ("pad", (48, 64), (48, 64))])
def test_arrays_that_need_no_resampling_give_the_pil_bytes(mode, size, shape):
    """Arrays and uint8 tensors that need no resampling are cut with numpy (a shortcut past PIL):
    every kind of them gives the bytes of the same image handed over as a PIL image, and the
    input is a copy that later edits of the array do not reach."""
    geometry = InputGeometry(size, mode, RESIZE if mode == "crop" and size == 64 else None)
    rgb = rgb_array(*shape, seed=3)
    rgba = np.concatenate([rgb, rgb[:, :, :1]], axis=2)
    grey16 = rgb[:, :, 1].astype(np.uint16) * 256 + rgb[:, :, 2]
    kinds = {"rgb": (rgb, Image.fromarray(rgb)),
             "rgb view": (rgb[:, ::-1][:, ::-1], Image.fromarray(rgb)),
             "rgba": (rgba, Image.fromarray(rgba, "RGBA")),
             "grey": (rgb[:, :, 0], Image.fromarray(rgb[:, :, 0])),
             "grey HxWx1": (rgb[:, :, :1], Image.fromarray(rgb[:, :, 0])),
             "grey16": (grey16, Image.fromarray(grey16)),
             "uint8 CxHxW": (torch.from_numpy(rgb).permute(2, 0, 1), Image.fromarray(rgb)),
             "uint8 1xHxW": (torch.from_numpy(rgb[:, :, 0])[None], Image.fromarray(rgb[:, :, 0]))}
    for name, (source, image) in kinds.items():
        prepared, expected = prepare_image(source, geometry), prepare_image(image, geometry)
        assert prepared.placement == expected.placement, name
        assert prepared.input.is_contiguous() and prepared.input.shape == expected.input.shape, name
        torch.testing.assert_close(prepared.input, expected.input, rtol=0, atol=0, msg=name)
    before = prepare_image(rgb, geometry).input.clone()
    kept = prepare_image(rgb, geometry)
    rgb[...] = 0
    torch.testing.assert_close(kept.input, before, rtol=0, atol=0)


def test_16bit_big_endian_pil_mode():
    v16 = (rgb_array()[:, :, 1].astype(np.uint16) * 257)
    image = Image.frombytes("I;16B", (v16.shape[1], v16.shape[0]), v16.astype(">u2").tobytes())
    torch.testing.assert_close(crop(image), crop(v16), rtol=0, atol=0)


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("source, message", [
    (np.zeros((72, 90, 2), np.uint8), "C = 1, 3 or 4"),
    (np.zeros((3, 72, 90), np.uint8), "CxHxW array"),
    (np.zeros((2, 72, 90, 3), np.uint8), "for several images pass a list"),
    (np.zeros((72, 90, 3), np.int32), "uint8 or uint16, got dtype int32"),
    (np.zeros((72, 90, 3), np.float32), "float images pass a CxHxW torch tensor"),
    (np.zeros((72, 90), bool), "uint8 or uint16"),
    (np.zeros((72, 90), np.complex64), "uint8 or uint16"),
    (np.zeros((0, 0), np.uint8), "empty array"),
    (torch.zeros(2, 72, 90), "C = 1 or 3"),
    (torch.zeros(4, 72, 90), "C = 1 or 3"),
    (torch.zeros(72, 90), "CxHxW or BxCxHxW"),
    (torch.zeros(3, 0, 90), "empty image tensor"),
    (torch.zeros(3, 72, 90, dtype=torch.int32), "float (values in [0, 1]) or uint8, got torch.int32"),
    (torch.zeros(3, 72, 90, dtype=torch.complex64), "got torch.complex64"),
    (torch.full((3, 72, 90), float("nan")), "NaN or Inf"),
    (torch.full((3, 72, 90), float("inf")), "NaN or Inf"),
    (torch.full((3, 72, 90), 200.0), "divide by 255"),
    (torch.full((3, 72, 90), -0.1), "[0, 1]"),
    (Image.new("F", (90, 72)), "mode 'F'"),
    (Image.new("RGB", (0, 0)), "empty image"),
    (Image.fromarray(np.full((72, 72), 70000, np.int32)), "0..65535"),
])
def test_bad_single_inputs(source, message):
    with pytest.raises(ValueError) as info:
        crop(source)
    assert message in str(info.value)


def test_bad_types_and_empty_collections(tmp_path):
    for source in (5, 3.0, {"a": 1}, b"bytes", None):
        with pytest.raises(TypeError, match="expected an image path"):
            list(iter_batches(source, 4, SIZE, RESIZE))
    with pytest.raises(ValueError, match="empty list"):
        list(iter_batches([], 4, SIZE, RESIZE))
    with pytest.raises(ValueError, match="no images given"):
        list(iter_batches(iter([]), 4, SIZE, RESIZE))
    with pytest.raises(ValueError, match="no images given"):
        list(iter_batches(torch.zeros(0, 3, 72, 72), 4, SIZE, RESIZE))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no image files") as info:
        list(iter_batches(tmp_path, 4, SIZE, RESIZE))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches([rgb_array()], 0, SIZE, RESIZE))
    with pytest.raises(ValueError, match="at least the crop.s short side"):
        preprocess_image(rgb_array(), 64, 60)


def test_errors_name_the_list_position():
    with pytest.raises(ValueError, match=r"images\[2\]: .*uint8 or uint16"):
        list(iter_batches([rgb_array(), rgb_array(), np.zeros((72, 72), np.int64)], 8, SIZE, RESIZE))
    with pytest.raises(ValueError, match=r"images\[0\]\[1\]: .*NaN"):
        bad = torch.rand(2, 3, 72, 72)
        bad[1, 0, 0, 0] = float("nan")
        list(iter_batches([bad], 8, SIZE, RESIZE))


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_name_the_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        crop(missing)
    cases = {
        "empty.png": (b"", "empty \\(0 bytes\\)"),
        "truncated.png": (png_bytes(rgb_array())[:400], "truncated or corrupt"),
        "garbage.png": (bytes(np.random.RandomState(0).randint(0, 256, 2000, dtype=np.uint8)),
                        "not an image PIL can identify"),
        "text.jpg": (b"hello, I am text\n" * 10, "not an image PIL can identify"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            crop(path)
        assert str(path) in str(info.value), name
    # inside a list, the failing path is named too
    with pytest.raises(ValueError, match="truncated.png"):
        list(iter_batches([rgb_array(), tmp_path / "truncated.png"], 4, SIZE, RESIZE))


def test_decompression_bomb_is_a_value_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(rgb_array(72, 90)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 72*90 > 2 * 1000: PIL refuses
    with pytest.raises(ValueError, match="decompression bomb") as info:
        crop(path)
    assert "bomb.png" in str(info.value) and "MAX_IMAGE_PIXELS" in str(info.value)


def test_an_extreme_aspect_ratio_file_is_refused_with_its_path(tmp_path):
    # Decodes fine (a 1 x 100000 strip), but resizing its short side would ask for gigabytes:
    # refused before the resize, and the error names the file whichever entry point reads it.
    path = tmp_path / "strip.png"
    Image.fromarray(np.zeros((1, 100_000, 3), np.uint8)).save(path)
    for read in (crop, lambda p: prepare_image(p, InputGeometry(SIZE, "crop", RESIZE)).input):
        with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS") as info:
            read(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS") as info:
        crop(np.zeros((1, 100_000, 3), np.uint8))
    assert str(info.value).startswith("image: ")


# ------------------------------------------------------------------------------- folders, batching
def test_folder_lists_sorted_images_only(tmp_path):
    for name in ("b.png", "a.JPG", "c.bmp"):
        Image.fromarray(rgb_array(seed=len(name) + ord(name[0]))).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "._b.png").write_bytes(b"macOS resource fork, not an image")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb_array()).save(tmp_path / "sub" / "d.png")
    files = image_files(tmp_path)  # the same listing as the CLI's
    assert [f.name for f in files] == ["a.JPG", "b.png", "c.bmp"]
    assert [name for name, _ in iter_sources(tmp_path)] == [str(f) for f in files]
    (batch,) = iter_batches(tmp_path, 8, SIZE, RESIZE)
    torch.testing.assert_close(batch[1], crop(tmp_path / "b.png"), rtol=0, atol=0)


def test_batches_are_bounded_and_lazy(tmp_path):
    pulled = []

    def sources():
        for i in range(7):
            pulled.append(i)
            yield rgb_array(seed=i)

    batches = iter_batches(sources(), 3, SIZE, RESIZE)
    first = next(batches)
    assert first.shape == (3, SIZE, SIZE, 3)
    assert len(pulled) == 3  # nothing beyond the first batch was read yet
    rest = list(batches)
    assert [b.shape[0] for b in rest] == [3, 1]
    torch.testing.assert_close(rest[1][0], crop(rgb_array(seed=6)), rtol=0, atol=0)


def test_nested_lists_and_dataloader_batches():
    arrays = [rgb_array(seed=i) for i in range(5)]
    tensors = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tensors), batch_size=2)
    (from_loader,) = iter_batches(loader, 8, SIZE, RESIZE)  # yields [tensor [2, 3, H, W]] lists
    (from_list,) = iter_batches([arrays[:2], arrays[2:]], 8, SIZE, RESIZE)
    torch.testing.assert_close(from_loader, from_list, rtol=0, atol=0)
    assert from_loader.shape[0] == 5


def test_normalise():
    batch = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    got = normalise(batch, mean, std)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert got.shape == (2, 3, 5, 6)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert math.isclose(float(got.contiguous()[0, 0, 0, 0]), float(expected[0, 0, 0, 0]), abs_tol=1e-6)


@pytest.mark.parametrize("shape,image_size,resize", [((300, 300), 288, 329), ((331, 517), 224, 256), ((41, 33), 32, 36)])
def test_grayscale_kept_single_channel_until_the_crop_gives_the_rgb_bytes(shape, image_size, resize):
    """Grayscale skips convert("RGB") until after the crop (faster); the bytes must not change."""
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    fast = preprocess_image(gray, image_size, resize)
    rgb_first = preprocess_image(gray.convert("RGB"), image_size, resize)
    assert fast.shape == (image_size, image_size, 3)
    assert torch.equal(fast, rgb_first)


# ------------------------------------------------------------------------------- prefetching
def test_prefetched_keeps_order_and_draws_items_in_the_calling_thread():
    import random
    import threading
    import time

    from simplenet_fast.preprocess import prefetched

    caller, drawn_in, computed_in = threading.get_ident(), set(), set()

    def items():
        for i in range(40):
            drawn_in.add(threading.get_ident())
            yield i

    def slow_square(i):
        computed_in.add(threading.get_ident())
        time.sleep(random.Random(i).uniform(0, 0.004))  # finish out of order
        return i * i

    for workers in (0, 1, 4):
        drawn_in.clear(), computed_in.clear()
        assert list(prefetched(slow_square, items(), workers, ahead=6)) == [i * i for i in range(40)]
        assert drawn_in == {caller}
        assert (computed_in == {caller}) == (workers == 0)


def test_prefetched_raises_each_error_at_its_place_and_stops_drawing():
    from simplenet_fast.preprocess import prefetched

    def fails_at_5(i):
        if i == 5:
            raise ValueError("item 5 is bad")
        return i

    drawn = []

    def items(stop_with=None):
        for i in range(20):
            if i == 7 and stop_with:
                raise stop_with
            drawn.append(i)
            yield i

    for workers in (0, 3):
        got = []
        with pytest.raises(ValueError, match="item 5 is bad"):
            for value in prefetched(fails_at_5, items(), workers, ahead=4):
                got.append(value)
        assert got == [0, 1, 2, 3, 4]
        # An error of the iteration itself comes out after the items before it, and ends it.
        drawn.clear()
        got = []
        with pytest.raises(KeyError, match="listing failed"):
            for value in prefetched(lambda i: i, items(KeyError("listing failed")), workers, ahead=4):
                got.append(value)
        assert got == list(range(7)) and drawn == list(range(7))


def test_prefetched_is_lazy_and_bounded():
    from simplenet_fast.preprocess import prefetched

    drawn = []

    def items():
        for i in range(100):
            drawn.append(i)
            yield i

    stream = prefetched(lambda i: i, items(), 2, ahead=5)
    assert drawn == []  # nothing happens before the first value is asked for
    assert next(stream) == 0
    assert len(drawn) <= 7  # the one consumed, `ahead` more and the one drawn to replace it
    stream.close()  # leaving early: nothing more is drawn
    count = len(drawn)
    assert count < 100 and len(drawn) == count


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused(workers):
    from simplenet_fast.preprocess import iter_prepared

    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        iter_prepared([rgb_array()], InputGeometry(SIZE, "crop", RESIZE), workers=workers)
