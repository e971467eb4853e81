"""Evaluation metrics: image AUROC, pixel AUROC and AUPRO (MVTec AD's per-region overlap).

NumPy only: scikit-learn and scipy are test dependencies, not run-time ones. Inputs may be NumPy
arrays, nested sequences, or torch tensors on any device (they are copied to the host once).

- ``image_auroc(labels, scores)``: ROC AUC, ties counted half (trapezoid over distinct thresholds,
  equal to the Mann-Whitney statistic with average ranks and to ``sklearn.metrics.roc_auc_score``).
- ``pixel_auroc(masks, maps)``: the same over every pixel of every image.
- ``aupro(masks, maps, fpr_limit=0.3)``: area under the per-region-overlap curve up to
  ``fpr_limit``, divided by ``fpr_limit`` (Bergmann et al., IJCV 2021). It follows the MVTec AD
  evaluation code (``compute_pro`` and ``trapezoid`` in its ``pro_curve_util.py`` /
  ``generic_util.py``): ground-truth regions are 8-connected components, every threshold between
  distinct scores is swept exactly, and the curve is cut at ``fpr_limit`` by linear interpolation.
  The one difference is that the FPRs are accumulated in float64 where the reference uses float32.
- ``connected_components(mask, connectivity=8)``: ``scipy.ndimage.label``'s labelling in NumPy.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["image_auroc", "pixel_auroc", "aupro", "pro_curve", "connected_components"]


# ----------------------------------------------------------------------------------------------
# Input handling


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Array from a NumPy array, a (nested) sequence or a torch tensor on any device."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except ValueError as e:  # ragged nested sequences
        raise ValueError(f"{name} could not be converted to an array: {e}") from None


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    """Bool view of a 0/1 (or bool) array; anything else raises."""
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be binary (bool or 0/1), got dtype {a.dtype}")
    if a.size and not np.isin(a, (0, 1)).all():
        bad = np.unique(a[~np.isin(a, (0, 1))])[:5]
        raise ValueError(f"{name} must be binary (bool or 0/1), "
                         f"found values such as {bad.tolist()}")
    return a != 0


def _scores(a: np.ndarray, name: str) -> np.ndarray:
    """Real-valued scores without NaN (infinities sort fine and are allowed)."""
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise ValueError(f"{name} contains NaN ({int(np.isnan(a).sum())} values)")
    return a


def _pairs(masks: Any, maps: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, map) pairs of 2-D arrays from [N, H, W] / [H, W] arrays or sequences of [H, W]."""

    def split(x: Any, name: str) -> list[np.ndarray]:
        if isinstance(x, (list, tuple)):
            items = [_to_numpy(m, f"{name}[{i}]") for i, m in enumerate(x)]
        else:
            arr = _to_numpy(x, name)
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim == 4 and arr.shape[1] == 1:  # [N, 1, H, W], as torch code often keeps it
                arr = arr[:, 0]
            if arr.ndim != 3:
                raise ValueError(f"{name} must be [N, H, W] or [H, W] (or a sequence of [H, W]), "
                                 f"got shape {tuple(arr.shape)}")
            items = list(arr)
        for i, m in enumerate(items):
            if m.ndim != 2:
                raise ValueError(f"{name}[{i}] must be a 2-D [H, W] array, got shape {m.shape}")
        return items

    mask_list, map_list = split(masks, "masks"), split(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(f"got {len(mask_list)} masks but {len(map_list)} maps")
    if not mask_list:
        raise ValueError("masks and maps are empty")
    out = []
    for i, (m, a) in enumerate(zip(mask_list, map_list)):
        if m.shape != a.shape:
            raise ValueError(f"mask {i} has shape {m.shape} but map {i} has shape {a.shape}; "
                             "score with map_size='input' for maps at the masks' own "
                             "size, or put the masks in the model's view "
                             "(data.mask_to_model_view)")
        out.append((_binary(m, f"masks[{i}]"), _scores(a, f"maps[{i}]")))
    return out


# ----------------------------------------------------------------------------------------------
# ROC AUC


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal ROC AUC of flat bool labels and flat scores (validated by the callers)."""
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "positive (anomalous)" if n_neg == 0 else "negative (normal)"
        raise ValueError(f"AUROC needs both classes, but all {labels.size} labels are {only}")
    order = np.argsort(scores)[::-1]  # ties are merged below: no need for a stable sort
    s = scores[order]
    # Last position of each run of equal scores: one ROC point per distinct threshold, so ties
    # between a normal and an anomalous sample count one half (the diagonal of the trapezoid).
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    del s
    tps = np.cumsum(labels[order], dtype=np.int64)[last]
    del order
    fps = (last + 1) - tps
    tps = np.concatenate(([0], tps)).astype(np.float64)
    fps = np.concatenate(([0], fps)).astype(np.float64)
    # Integer counts until here; the area is sum(dFP * (TP_i + TP_{i-1}) / 2) / (P * N).
    area = np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / 2.0
    return float(area / (float(n_pos) * float(n_neg)))


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC AUC of per-image scores (higher = more anomalous) against labels (1 = anomalous).

    Ties are handled exactly: a tied normal/anomalous pair counts 1/2, as in
    ``sklearn.metrics.roc_auc_score``. Raises ``ValueError`` when the lengths differ, a label is
    not 0/1, a score is NaN, or only one class is present.
    """
    y = _to_numpy(labels, "labels")
    s = _to_numpy(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    return _auroc(_binary(y, "labels"), _scores(s, "scores"))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC over all pixels: ``masks`` (1 = defect) against anomaly ``maps`` of equal shape.

    Accepts [N, H, W] (or [H, W], [N, 1, H, W]) arrays or tensors, or sequences of [H, W] arrays
    whose sizes may differ between images. Memory: one sort of all pixels (100 maps of 288x288,
    8.3 M values, need about 0.3 GB).
    """
    pairs = _pairs(masks, maps)
    labels = np.concatenate([m.ravel() for m, _ in pairs])
    scores = np.concatenate([a.ravel() for _, a in pairs])
    return _auroc(labels, scores)


# ----------------------------------------------------------------------------------------------
# Connected components


def connected_components(mask: Any, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a 2-D binary mask, like ``scipy.ndimage.label``.

    ``connectivity=8`` matches ``label(mask, structure=np.ones((3, 3)))`` (what the MVTec AD
    evaluation uses), ``4`` matches scipy's default cross. Returns ``(labels, n)``: int32 labels,
    0 for background and 1..n numbered in raster order of each component's first pixel (so the
    numbering is scipy's too).
    """
    m = _to_numpy(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    m = _binary(m, "mask")
    labels = np.zeros(m.shape, dtype=np.int32)
    roots, n = _component_roots(m, connectivity)
    labels[m] = roots
    return labels, n


def _component_roots(m: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Component number (1..n) of every True pixel of ``m``, in ``m[m]`` order.

    Union-find over the foreground, vectorised: every round hooks each root to the smallest root
    across its edges (``np.minimum.at``) and then compresses paths by pointer jumping until every
    pixel points at its root. A root is always the smallest raster index of its tree, so the final
    root of a component is its first pixel in raster order and numbering roots in increasing
    order reproduces scipy's label order. Rounds needed: a handful on real masks.
    """
    h, w = m.shape
    n_fg = int(np.count_nonzero(m))
    if n_fg == 0:
        return np.zeros(0, dtype=np.int32), 0
    # Compact ids 0..n_fg-1 of the foreground pixels, in raster order.
    ids = np.full(m.shape, -1, dtype=np.int64)
    ids[m] = np.arange(n_fg)
    # Edges between foreground neighbours: right, down, and for 8-connectivity both diagonals.
    shifts = [((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
              ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))]
    if connectivity == 8:
        shifts += [((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
                   ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1)))]
    us, vs = [], []
    for a, b in shifts:
        both = m[a] & m[b]
        us.append(ids[a][both])
        vs.append(ids[b][both])
    u = np.concatenate(us)
    v = np.concatenate(vs)
    del ids, us, vs

    parent = np.arange(n_fg, dtype=np.int64)
    while u.size:
        ru, rv = parent[u], parent[v]  # roots: parent is fully compressed at this point
        differ = ru != rv
        if not differ.any():
            break
        ru, rv = ru[differ], rv[differ]
        u, v = u[differ], v[differ]  # edges already inside one tree stay inside it
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        np.minimum.at(parent, hi, lo)
        while True:  # pointer jumping until every node points at a root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    roots, number = np.unique(parent, return_inverse=True)
    return (number.reshape(-1) + 1).astype(np.int32), int(roots.size)


# ----------------------------------------------------------------------------------------------
# PRO curve and AUPRO


def pro_curve(masks: Any, maps: Any, num_thresholds: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points of every threshold, from (0, 0) to (1, 1), as MVTec AD's ``compute_pro``.

    Regions are the 8-connected components of each mask. Lowering the threshold past a pixel's
    score adds ``1 / (num_regions * region_size)`` to the PRO if the pixel is anomalous, and
    ``1 / num_normal_pixels`` to the FPR if it is normal; cumulative sums in descending score
    order, keeping the last point of each run of equal scores, give the exact curve.

    ``num_thresholds=None`` sweeps every distinct score. An integer uses that many thresholds
    evenly spaced from the lowest to the highest score instead (a coarser curve, computed with
    one histogram instead of a sort).
    """
    pairs = _pairs(masks, maps)
    fp_parts, pro_parts, n_regions = [], [], 0
    for mask, _ in pairs:
        ids, n = _component_roots(mask, 8)
        weight = np.zeros(mask.shape, dtype=np.float64)
        if n:
            sizes = np.bincount(ids, minlength=n + 1)[1:]
            weight[mask] = 1.0 / sizes[ids - 1]  # divided by the total region count below
        n_regions += n
        fp_parts.append(~mask.ravel())
        pro_parts.append(weight.ravel())
    if n_regions == 0:
        raise ValueError("the masks contain no defect pixels, so the PRO curve is undefined")
    normal = np.concatenate(fp_parts)
    n_normal = int(np.count_nonzero(normal))
    if n_normal == 0:
        raise ValueError("the masks contain no normal pixels, "
                         "so the false positive rate is undefined")
    pro_w = np.concatenate(pro_parts)
    scores = np.concatenate([a.ravel() for _, a in pairs])
    del fp_parts, pro_parts

    if num_thresholds is None:
        order = np.argsort(scores)[::-1]  # ties are merged below: no need for a stable sort
        s = scores[order]
        last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
        del s
        fp = np.cumsum(normal[order], dtype=np.int64)[last]
        pro = np.cumsum(pro_w[order])[last]
    else:
        if int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise ValueError(
                f"num_thresholds must be an integer >= 2 or None, got {num_thresholds}")
        t = int(num_thresholds)
        lo, hi = float(np.min(scores)), float(np.max(scores))
        thresholds = np.linspace(lo, hi, t) if hi > lo else np.array([lo])
        # Number of thresholds <= score: the pixel is positive at thresholds[k] iff bin > k.
        bins = np.searchsorted(thresholds, scores, side="right")
        nb = thresholds.size + 1
        fp_bin = np.bincount(bins, weights=normal, minlength=nb)
        pro_bin = np.bincount(bins, weights=pro_w, minlength=nb)
        # Descending thresholds: cumulative sums from the highest bin down; bin 0 is empty.
        fp = np.rint(np.cumsum(fp_bin[::-1])[:-1]).astype(np.int64)
        pro = np.cumsum(pro_bin[::-1])[:-1]
    fpr = fp / float(n_normal)
    pro = np.minimum(pro / float(n_regions), 1.0)  # rounding in the sums may overshoot 1
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """MVTec AD's ``trapezoid``: area under y(x) up to x_max, interpolating y at x_max."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect_right, as the reference
        # (0, 0) starts and (1, 1) ends the curve, and 0 < x_max < 1 here: 0 < ins < len(x).
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None
          ) -> float:
    """Normalised area under the PRO curve for FPR in [0, ``fpr_limit``] (MVTec AD's AU-PRO).

    ``masks`` (1 = defect) and ``maps`` (higher = more anomalous) as in ``pixel_auroc``; images
    without defects contribute normal pixels only. The result is in [0, 1]: 1 when every defect
    pixel scores above every normal pixel, ``fpr_limit / 2`` for a constant map. Raises
    ``ValueError`` on shape mismatches, NaN, non-binary masks, masks without any defect (or
    without any normal) pixel, or ``fpr_limit`` outside (0, 1].
    """
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps, num_thresholds=num_thresholds)
    return _trapezoid(fpr, pro, float(fpr_limit)) / float(fpr_limit)
