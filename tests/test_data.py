"""Data readers: image folders, a fake MVTec AD tree, mask geometry, the ELPV protocol."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simplenet_fast import data
from simplenet_fast.data import (MVTecCategory, TestItem, image_files, mask_to_model_view,
                                 mvtec_categories)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(h: int = 30, w: int = 40, value: int = 0) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


# ----------------------------------------------------------------------------------------------
# image_files


def test_image_files_filters_and_sorts(tmp_path):
    for name in ("b.png", "a.PNG", "c.JpG", "d.jpeg", "e.bmp", "f.tif", "g.TIFF", "h.webp"):
        _save(tmp_path / name, _rgb())
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._b.png").write_bytes(b"\x00\x05")  # macOS resource fork: not an image
    (tmp_path / "folder.png").mkdir()
    _save(tmp_path / "sub" / "z.png", _rgb())
    names = [p.name for p in image_files(tmp_path)]
    assert names == ["a.PNG", "b.png", "c.JpG", "d.jpeg", "e.bmp", "f.tif", "g.TIFF", "h.webp"]
    deep = image_files(str(tmp_path), recursive=True)
    assert [p.name for p in deep] == names + ["z.png"]
    assert all(isinstance(p, Path) for p in deep)


def test_image_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*missing"):
        image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files.*empty"):
        image_files(tmp_path / "empty")
    f = _save(tmp_path / "one.png", _rgb())
    with pytest.raises(NotADirectoryError, match="one.png"):
        image_files(f)


# ----------------------------------------------------------------------------------------------
# MVTec AD layout


H, W = 30, 40


def _defect_mask(k: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[5 + k: 9 + k, 10: 14 + k] = 255
    return m


def _fake_mvtec(root: Path, category: str = "widget") -> Path:
    """train/good: 3, test/good: 2, test/crack: 2, test/hole: 1, masks for every defect."""
    cat = root / category
    for i in range(3):
        _save(cat / "train" / "good" / f"{i:03d}.png", _rgb(value=i))
    for i in range(2):
        _save(cat / "test" / "good" / f"{i:03d}.png", _rgb(value=10 + i))
    for defect, count in (("crack", 2), ("hole", 1)):
        for i in range(count):
            _save(cat / "test" / defect / f"{i:03d}.png", _rgb(value=20 + i))
            _save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", _defect_mask(i))
    return cat


def test_mvtec_reader(tmp_path):
    cat_dir = _fake_mvtec(tmp_path)
    (tmp_path / "not_a_category").mkdir()
    (tmp_path / "license.txt").write_text("x")
    assert mvtec_categories(tmp_path) == ["widget"]

    cat = MVTecCategory(cat_dir)
    assert cat.name == "widget"
    assert [p.name for p in cat.train_files()] == ["000.png", "001.png", "002.png"]
    assert cat.defect_types() == ["crack", "good", "hole"]
    items = cat.test_items()
    assert [(i.defect_type, i.path.name, i.label) for i in items] == [
        ("crack", "000.png", 1), ("crack", "001.png", 1), ("good", "000.png", 0),
        ("good", "001.png", 0), ("hole", "000.png", 1)]
    for item in items:
        assert isinstance(item, TestItem)
        if item.label == 0:
            assert item.mask_path is None
            mask = cat.load_mask(item)
            assert mask.dtype == bool and mask.shape == (H, W) and not mask.any()
        else:
            assert item.mask_path == cat_dir / "ground_truth" / item.defect_type / \
                f"{item.path.stem}_mask.png"
            mask = cat.load_mask(item)
            k = int(item.path.stem)
            np.testing.assert_array_equal(mask, _defect_mask(k) > 0)

    # With the preprocessing geometry, masks come out at the crop size and match the helper.
    crack = items[1]
    view = cat.load_mask(crack, size=33, crop=24)
    assert view.shape == (24, 24) and view.dtype == bool
    np.testing.assert_array_equal(view, mask_to_model_view(_defect_mask(1) > 0, 33, 24))
    assert cat.load_mask(items[2], size=33, crop=24).shape == (24, 24)


def test_mvtec_missing_mask(tmp_path):
    cat_dir = _fake_mvtec(tmp_path)
    (cat_dir / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 defective test image.*crack.001_mask\.png"):
        MVTecCategory(cat_dir).test_items()
    lenient = MVTecCategory(cat_dir, require_masks=False)
    items = lenient.test_items()
    orphan = [i for i in items if i.defect_type == "crack" and i.path.stem == "001"][0]
    assert orphan.label == 1 and orphan.mask_path is None
    with pytest.raises(FileNotFoundError, match="no ground-truth mask"):
        lenient.load_mask(orphan)


def test_mvtec_mask_size_mismatch(tmp_path):
    cat_dir = _fake_mvtec(tmp_path)
    _save(cat_dir / "ground_truth" / "hole" / "000_mask.png", np.zeros((H + 1, W), np.uint8))
    cat = MVTecCategory(cat_dir)
    hole = [i for i in cat.test_items() if i.defect_type == "hole"][0]
    with pytest.raises(ValueError, match="40x31.*40x30"):
        cat.load_mask(hole)


def test_mvtec_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="category folder not found"):
        MVTecCategory(tmp_path / "nothing")
    cat_dir = _fake_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match="no MVTec AD categories"):
        mvtec_categories(cat_dir)  # a category is not a dataset root
    with pytest.raises(FileNotFoundError, match="root folder not found"):
        mvtec_categories(tmp_path / "nothing")
    for sub in ("train/good", "test"):
        broken = tmp_path / f"broken_{sub.replace('/', '_')}"
        _fake_mvtec(broken)
        target = broken / "widget" / sub
        for f in sorted(target.rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        target.rmdir()
        with pytest.raises(FileNotFoundError, match=sub.replace("/", ".")):
            MVTecCategory(broken / "widget")


# ----------------------------------------------------------------------------------------------
# mask geometry (SPEC 1.1)


def test_mask_to_model_view_square_paper_geometry():
    # Already at the resize size: only the crop moves pixels, by the offset 20 of SPEC 1.1.
    mask = np.zeros((329, 329), bool)
    mask[20 + 5, 20 + 7] = True
    view = mask_to_model_view(mask, 329, 288)
    assert view.shape == (288, 288)
    assert list(zip(*np.nonzero(view))) == [(5, 7)]
    # A 2x larger mask: NEAREST halving samples input pixel 2i+1, so a 2x2 block maps to 1 pixel.
    big = np.zeros((658, 658), bool)
    big[50:52, 54:56] = True
    view = mask_to_model_view(big, 329, 288)
    assert list(zip(*np.nonzero(view))) == [(5, 7)]


def test_mask_to_model_view_non_square():
    # 300 x 450 (H x W): short side 329 -> 329 x int(329 * 450 / 300) = 329 x 493, then
    # crop offsets round(20.5) = 20 (Python rounds half to even, as torchvision's CenterCrop)
    # and round(102.5) = 102.
    h, w = 300, 450
    rows = np.arange(h)[:, None] * np.ones((1, w), int)
    cols = np.ones((h, 1), int) * np.arange(w)[None, :]
    # Mark a pixel, and compute where PIL's NEAREST puts it: output index i samples
    # floor((i + 0.5) * in / out).
    r_out, c_out = 100, 200
    r_in = int((r_out + 0.5) * h / 329)
    c_in = int((c_out + 0.5) * w / 493)
    mask = (rows == r_in) & (cols == c_in)
    view = mask_to_model_view(mask, 329, 288)
    assert view.shape == (288, 288)
    assert (r_out - 20, c_out - 102) in list(zip(*np.nonzero(view)))
    # Portrait orientation swaps the roles.
    assert mask_to_model_view(mask.T, 329, 288).shape == (288, 288)
    assert mask_to_model_view(mask.T, 329, None).shape == (493, 329)


def test_mask_to_model_view_options_and_errors():
    mask = np.zeros((8, 10), np.uint8)
    mask[2, 3] = 255
    same = mask_to_model_view(mask, None, None)
    assert same.dtype == bool and same.shape == (8, 10) and same[2, 3] and same.sum() == 1
    assert mask_to_model_view(Image.fromarray(mask), None, (4, 6)).shape == (4, 6)
    assert mask_to_model_view(mask, (16, 20), None).sum() == 4  # exact (H, W), NEAREST doubling
    with pytest.raises(ValueError, match="larger"):
        mask_to_model_view(mask, None, 9)
    with pytest.raises(ValueError, match="2-D"):
        mask_to_model_view(np.zeros((2, 3, 3)), 3, 3)


# ----------------------------------------------------------------------------------------------
# ELPV protocol (SPEC 7)


def _elpv_labels():
    """(probabilities, types) straight from the package's labels file, without loading images."""
    pkg = pytest.importorskip("elpv_dataset", reason="elpv-dataset is not installed")
    csv = Path(pkg.__file__).parent / "data" / "labels.csv"
    rows = np.genfromtxt(csv, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    return rows["probability"], np.char.decode(rows["type"])


@pytest.mark.parametrize("cell_type", ["mono", "poly"])
def test_elpv_split_protocol(cell_type):
    probs, types = _elpv_labels()
    of_type = types == cell_type
    n_normal = int((of_type & (probs == 0)).sum())
    n_defect = int((of_type & (probs > 0.5)).sum())
    train, test, labels = data._elpv_indices(probs, types, cell_type, seed=0)
    n_train = int(round(0.7 * n_normal))
    assert train.size == n_train
    assert test.size == n_normal - n_train + n_defect
    assert (labels == 0).sum() == n_normal - n_train and (labels == 1).sum() == n_defect
    assert np.intersect1d(train, test).size == 0  # train and test normals are disjoint
    assert (types[train] == cell_type).all() and (types[test] == cell_type).all()
    assert (probs[train] == 0).all()
    assert (probs[test][labels == 0] == 0).all()
    assert (probs[test][labels == 1] >= 2 / 3 - 1e-9).all()
    one_third = np.flatnonzero(np.isclose(probs, 1 / 3))
    assert not np.isin(one_third, np.concatenate([train, test])).any()
    # Same seed, same split; another seed, another split of the same sizes.
    again = data._elpv_indices(probs, types, cell_type, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, test, labels), again))
    other = data._elpv_indices(probs, types, cell_type, seed=1)
    assert other[0].size == train.size and not np.array_equal(other[0], train)
    # The sizes the docstring states.
    expected = {"mono": (412, 176, 369), "poly": (644, 276, 452)}[cell_type]
    assert (train.size, (labels == 0).sum(), (labels == 1).sum()) == expected


def test_elpv_split_loads_images():
    pytest.importorskip("elpv_dataset", reason="elpv-dataset is not installed")
    split = data.elpv_split("mono", seed=3)
    assert split.train_images.shape == (412, 300, 300) and split.train_images.dtype == np.uint8
    assert split.test_images.shape == (176 + 369, 300, 300)
    assert split.test_labels.shape == (545,)
    images, probs, types = data._elpv_dataset()
    np.testing.assert_array_equal(split.train_images[0], images[split.train_index[0]])
    assert data._elpv_dataset() is data._elpv_dataset()  # loaded once
    with pytest.raises(ValueError, match="'mono' or 'poly'"):
        data.elpv_split("cigs")


def test_elpv_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "elpv_dataset", None)
    monkeypatch.setitem(sys.modules, "elpv_dataset.utils", None)
    with pytest.raises(ImportError, match=r"pip install elpv-dataset.*simplenet_fast\[elpv\]"):
        data._load_elpv()
