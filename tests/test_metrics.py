"""Metrics against scikit-learn / scipy, and AUPRO against hand-computed curves."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from simplenet_fast.metrics import aupro, connected_components, image_auroc, pixel_auroc, pro_curve

scipy_ndimage = pytest.importorskip("scipy.ndimage")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


# ----------------------------------------------------------------------------------------------
# image_auroc / pixel_auroc


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_image_auroc_matches_sklearn_with_ties(decimals):
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 97, 1000):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.normal(size=n) + 0.7 * labels
        if decimals is not None:
            scores = np.round(scores, decimals)
        assert image_auroc(labels, scores) == pytest.approx(
            sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=40))
def test_image_auroc_hypothesis(pairs):
    labels = np.array([p[0] for p in pairs])
    scores = np.array([p[1] for p in pairs], dtype=np.float32) / 2
    if labels.all() or not labels.any():
        with pytest.raises(ValueError, match="both classes"):
            image_auroc(labels, scores)
        return
    expected = sklearn_metrics.roc_auc_score(labels, scores)
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)
    # Mann-Whitney with average ranks: P(s_pos > s_neg) + P(s_pos == s_neg) / 2.
    pos, neg = scores[labels], scores[~labels]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum())
    assert image_auroc(labels, scores) == pytest.approx(mw / (pos.size * neg.size), abs=1e-12)


def test_image_auroc_extremes_and_inputs():
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert image_auroc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5
    assert image_auroc([False, True], [-np.inf, np.inf]) == 1.0
    assert image_auroc(torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.1, 0.9])) == 0.5
    assert image_auroc((0, 1), torch.tensor([1.0, 2.0], dtype=torch.bfloat16)) == 1.0


@pytest.mark.parametrize("labels, scores, match", [
    ([0, 0, 0], [0.1, 0.2, 0.3], "both classes"),
    ([1, 1], [0.1, 0.2], "both classes"),
    ([0, 1, 1], [0.1, 0.2], "length"),
    ([0, 1], [0.1, np.nan], "NaN"),
    ([0, 2], [0.1, 0.2], "binary"),
    ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ([0, 1], ["a", "b"], "real numbers"),
])
def test_image_auroc_errors(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(labels, scores)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((5, 23, 31)) < 0.1
    maps = np.round(rng.random((5, 23, 31)) + 0.3 * masks, 1).astype(np.float32)
    expected = sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # Same value from tensors, [N, 1, H, W], and a list of differently sized maps.
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)[:, None]) == \
        pytest.approx(expected, abs=1e-12)
    crops = [(m[: 10 + i, : 20 - i], a[: 10 + i, : 20 - i])
             for i, (m, a) in enumerate(zip(masks, maps))]
    expected_crops = sklearn_metrics.roc_auc_score(np.concatenate([m.ravel() for m, _ in crops]),
                                                   np.concatenate([a.ravel() for _, a in crops]))
    assert pixel_auroc([m for m, _ in crops], [a for _, a in crops]) == \
        pytest.approx(expected_crops, abs=1e-12)


def test_pixel_auroc_errors():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1, 1] = True
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(masks, np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="2 masks but 3 maps"):
        pixel_auroc(masks, np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="both classes"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        pixel_auroc(masks * 255, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, np.full((2, 4, 4), np.nan))
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        pixel_auroc(masks[0, 0], np.zeros(4))


# ----------------------------------------------------------------------------------------------
# connected components


@pytest.mark.parametrize("connectivity", [8, 4])
def test_connected_components_match_scipy(connectivity):
    structure = np.ones((3, 3), int) if connectivity == 8 else None
    rng = np.random.default_rng(2)
    shapes = [(1, 1), (1, 17), (17, 1), (5, 5), (13, 29), (64, 48)]
    for shape in shapes:
        for density in (0.0, 0.2, 0.45, 0.6, 0.9, 1.0):
            mask = rng.random(shape) < density
            ours, n = connected_components(mask, connectivity)
            ref, n_ref = scipy_ndimage.label(mask, structure)
            assert n == n_ref
            np.testing.assert_array_equal(ours, ref)  # same numbering, not just same partition


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_connected_components_hypothesis(h, w, seed, density):
    mask = np.random.default_rng(seed).random((h, w)) < density
    ours, n = connected_components(mask)
    ref, n_ref = scipy_ndimage.label(mask, np.ones((3, 3), int))
    assert n == n_ref
    np.testing.assert_array_equal(ours, ref)


def test_connected_components_long_snake():
    # One 1-pixel-wide serpentine through a 101x101 grid: the worst case for label propagation.
    mask = np.zeros((101, 101), bool)
    mask[::2] = True
    mask[1::4, -1] = True
    mask[3::4, 0] = True
    labels, n = connected_components(mask)
    assert n == 1 and (labels[mask] == 1).all() and (labels[~mask] == 0).all()


def test_connected_components_errors():
    with pytest.raises(ValueError, match="2-D"):
        connected_components(np.zeros((2, 3, 3), bool))
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(np.zeros((3, 3), bool), connectivity=6)


# ----------------------------------------------------------------------------------------------
# AUPRO: hand-computed cases


def _one_image(mask_pixels, mask_scores, normal_scores, shape):
    """A [1, H, W] mask/map pair: defect pixels get the given scores, normal pixels the rest in
    raster order."""
    mask = np.zeros(shape, bool)
    amap = np.zeros(shape, np.float64)
    for (r, c), s in zip(mask_pixels, mask_scores):
        mask[r, c] = True
        amap[r, c] = s
    amap[~mask] = normal_scores
    return mask[None], amap[None]


def test_aupro_perfect_and_inverted():
    rng = np.random.default_rng(3)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:12, 10:15] = True
    masks[1, 0, 0] = True
    normal = rng.random((3, 16, 16))
    assert aupro(masks, normal + 2.0 * masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, normal - 2.0 * masks) == 0.0


def test_aupro_constant_map():
    # One threshold: the curve is (0, 0) -> (1, 1), so the area up to L is L^2 / 2 and AUPRO = L/2.
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True
    for limit in (0.3, 0.05, 1.0):
        assert aupro(masks, np.full((2, 8, 8), 0.7), fpr_limit=limit) == pytest.approx(limit / 2)


def test_aupro_two_regions_one_found():
    # Region A is the top score; region B scores below every normal pixel. PRO is 0.5 from FPR 0
    # to FPR 1, so the normalised area up to 0.3 is 0.5 (the last point before 0.3 is FPR 0.25
    # and the next is 0.5, both at PRO 0.5: the interpolated segment adds 0.5 * 0.05).
    mask, amap = _one_image([(0, 0), (0, 2)], [5.0, 2.5], [4.0, 3.0, 2.0, 1.0], (1, 6))
    fpr, pro = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 0, 0.25, 0.5, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.5, 1, 1, 1, 1])
    assert aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)
    # Region B never found within the limit (it scores below everything): also 0.5.
    mask, amap = _one_image([(0, 0), (0, 5)], [9.0, -9.0], [4.0, 3.0, 2.0, 1.0], (1, 6))
    assert aupro(mask, amap) == pytest.approx(0.5, abs=1e-12)


def test_aupro_interpolates_at_the_limit():
    # One region of 2 pixels; the second ties with a normal pixel, so PRO and FPR rise together
    # on the segment (0.2, 0.5) -> (0.4, 1.0), which straddles 0.3. Area: 0.5 * 0.2 for [0, 0.2],
    # then 0.5 * (0.75 + 0.5) * 0.1 with PRO(0.3) = 0.75 interpolated: 0.1625 / 0.3 = 13 / 24.
    mask, amap = _one_image([(0, 0), (0, 1)], [10.0, 8.0], [9.0, 8.0, 7.0, 6.0, 5.0], (1, 7))
    fpr, pro = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1, 1, 1])
    assert aupro(mask, amap) == pytest.approx(13 / 24, abs=1e-12)
    # An FPR limit on a curve point needs no interpolation: (0.1 + 0.5 * 1.5 * 0.2) / 0.4.
    assert aupro(mask, amap, fpr_limit=0.4) == pytest.approx(0.25 / 0.4, abs=1e-12)


def test_aupro_regions_are_8_connected():
    # Diagonal pixels (0, 0) and (1, 1) form one region (8-connectivity, as in MVTec AD's code);
    # (4, 4) is a second. Finding only (0, 0) gives PRO (1/2 + 0) / 2 = 0.25 (it would be 1/3 with
    # 4-connectivity) and that PRO holds until every normal pixel is positive.
    normal = np.arange(22, dtype=np.float64) + 1.0
    mask, amap = _one_image([(0, 0), (1, 1), (4, 4)], [100.0, -1.0, -1.0], normal, (5, 5))
    assert aupro(mask, amap) == pytest.approx(0.25, abs=1e-12)


def test_aupro_good_images_add_normal_pixels():
    # A good image whose pixels all outscore the defect adds FPR before any PRO.
    mask, amap = _one_image([(0, 0)], [10.0], [0.0] * 3, (2, 2))
    assert aupro(mask, amap) == pytest.approx(1.0)
    masks = np.concatenate([mask, np.zeros((1, 2, 2), bool)])
    maps = np.concatenate([amap, np.full((1, 2, 2), 20.0)])
    # 7 normal pixels, 4 of them above the defect: PRO jumps to 1 at FPR 4/7 > 0.3.
    assert aupro(masks, maps) == 0.0


def _brute_force_aupro(masks, maps, limit):
    """Independent oracle: threshold at every distinct score, scipy labelling, explicit cut."""
    regions = []  # (image index, region mask)
    for i, mask in enumerate(masks):
        lab, n = scipy_ndimage.label(mask, np.ones((3, 3), int))
        regions += [(i, lab == k + 1) for k in range(n)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:  # the segment that crosses the limit, interpolated
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area / limit


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 14), bool)
    for i in range(2):
        for _ in range(3):
            r, c = rng.integers(0, 10, 2)
            masks[i, r:r + rng.integers(1, 4), c:c + rng.integers(1, 5)] = True
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)
    for limit in (0.3, 0.12, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            _brute_force_aupro(masks, maps, limit), abs=1e-12)


def test_aupro_num_thresholds():
    rng = np.random.default_rng(7)
    masks = rng.random((2, 20, 20)) < 0.1
    maps = rng.integers(0, 11, (2, 20, 20)).astype(np.float32) + 3 * masks
    # Thresholds at every integer 0..13 reproduce the exact sweep; fewer give a close value.
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=14) == pytest.approx(exact, abs=1e-12)
    assert aupro(masks, maps, num_thresholds=5) == pytest.approx(exact, abs=0.1)
    with pytest.raises(ValueError, match="num_thresholds"):
        aupro(masks, maps, num_thresholds=1)


def test_aupro_errors():
    masks = np.zeros((2, 5, 5), bool)
    masks[0, 2, 2] = True
    maps = np.zeros((2, 5, 5))
    with pytest.raises(ValueError, match="no defect pixels"):
        aupro(np.zeros((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match="no normal pixels"):
        aupro(np.ones((2, 5, 5), bool), maps)
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, np.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=1.5)
    with pytest.raises(ValueError, match="NaN"):
        aupro(masks, np.full((2, 5, 5), np.nan))
    with pytest.raises(ValueError, match="binary"):
        aupro(masks.astype(np.uint8) * 255, maps)
