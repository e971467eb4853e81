"""Decision thresholds from normal images only, and a record of how they were chosen.

SimpleNet trains on normal images, and users often have no defective images at all, so the
thresholds here never need one (anomalib's F1-adaptive threshold needs defects in its validation
set and breaks without them). Both thresholds come from **held-out normal images**: images of
good parts that the model was NOT trained on (training images score lower than unseen normal
images, so thresholds set on them are too low and flag good parts).

Rules (`calibrate(model, images, method=...)`):

- ``"quantile"`` (default): the image threshold is the ``q`` quantile (default 0.99) of the
  held-out images' scores, the pixel threshold the ``pixel_q`` quantile (default 0.999) of all
  their anomaly-map pixels (``numpy.quantile``, linear interpolation). If the held-out images
  represent production, about ``1 - q`` of good parts are flagged (1% at the default) and about
  ``1 - pixel_q`` of the pixels of good parts fall inside the predicted mask. With fewer than
  ``1 / (1 - q)`` images (100 at q = 0.99) the quantile lies between the highest scores seen, so
  the rate is only roughly met: more held-out images give a better threshold.
- ``"mean_std"``: mean + ``k`` standard deviations (default k = 3, ``ddof=1``) of the same image
  scores, and of the same pixels. It needs at least two images; it assumes roughly Gaussian
  scores, which anomaly scores often are not (long right tail), hence not the default.

A user-set threshold (`set_thresholds`) overrides a calibrated one. Every model carries a
description of where its thresholds came from (`threshold_source(model)`): ``"none"``,
``"user-set"``, or e.g. ``"0.99 quantile of the image scores ... of 41 held-out normal images"``.

The record (`Thresholds.to_dict()`) is a flat dict of plain types (str, int, float, None), kept
in ``model.threshold_info`` and saved with the model.

Normalised scores (`normalize_scores`) follow anomalib's min-max convention: the threshold maps
to 0.5 and the calibration scores' range to a width of 1, clipped to [0, 1].
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
from torch import Tensor

__all__ = ["Thresholds", "calibrate", "set_thresholds", "current_thresholds", "threshold_source",
           "normalize_scores", "fit_with_holdout", "DEFAULT_Q", "DEFAULT_PIXEL_Q", "DEFAULT_K"]

DEFAULT_Q = 0.99          # image threshold: 1% of good parts flagged
DEFAULT_PIXEL_Q = 0.999   # pixel threshold: 0.1% of good pixels inside the mask
DEFAULT_K = 3.0           # mean + 3 std
METHODS = ("quantile", "mean_std")
_INFO_VERSION = 1
_NONE_SOURCE = "none"
_USER_SOURCE = "user-set"


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds and how they were set.

    image, pixel: the thresholds (None: not set). A score (map pixel) strictly above its
        threshold is anomalous, as `SimpleNet.score` compares them.
    method: "quantile", "mean_std", "user" (set by hand) or "none".
    n_images: how many held-out normal images they were calibrated on (0 if not calibrated).
    source: one line for people saying how they were chosen (shown by the CLI, in results).
    q, pixel_q, k: the rule's parameters (None where unused).
    image_min, image_max, pixel_min, pixel_max: range of the calibration image scores and map
        pixels, used by `normalize_scores` (None if not calibrated).
    """

    image: Optional[float] = None
    pixel: Optional[float] = None
    method: str = "none"
    n_images: int = 0
    source: str = _NONE_SOURCE
    q: Optional[float] = None
    pixel_q: Optional[float] = None
    k: Optional[float] = None
    image_min: Optional[float] = None
    image_max: Optional[float] = None
    pixel_min: Optional[float] = None
    pixel_max: Optional[float] = None

    def to_dict(self) -> dict:
        """Flat dict of plain types (str, int, float, None): what `model.save` stores."""
        out: dict[str, Any] = {"version": _INFO_VERSION}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = value if value is None or isinstance(value, str) else (
                int(value) if name == "n_images" else float(value))
        return out

    @classmethod
    def from_dict(cls, info: Any) -> "Thresholds":
        """Inverse of `to_dict`; raises ValueError for anything else (e.g. a corrupt model file)."""
        if not isinstance(info, dict):
            raise ValueError(f"threshold info must be a dict, got {type(info).__name__}")
        if info.get("version") != _INFO_VERSION:
            raise ValueError(f"threshold info version {info.get('version')!r} is not "
                             f"{_INFO_VERSION}")
        kwargs = {}
        for name, spec in cls.__dataclass_fields__.items():
            if name not in info:
                raise ValueError(f"threshold info lacks {name!r}")
            value = info[name]
            if name in ("method", "source"):
                ok = isinstance(value, str)
            elif name == "n_images":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                       and math.isfinite(value))
            if not ok:
                raise ValueError(f"threshold info entry {name!r} has an invalid value {value!r}")
            kwargs[name] = value
        if kwargs["method"] not in METHODS + ("user", "none"):
            raise ValueError(f"threshold info has an unknown method {kwargs['method']!r}")
        return cls(**kwargs)


# ---------------------------------------------------------------------------------- the model's
def current_thresholds(model) -> Thresholds:
    """The model's thresholds and their record.

    The record in ``model.threshold_info`` is trusted only while it still matches
    ``model.image_threshold`` / ``model.pixel_threshold``: a threshold assigned by hand afterwards
    makes the answer "user-set" (keeping the calibration ranges for `normalize_scores`).
    """
    image, pixel = _number(model.image_threshold), _number(model.pixel_threshold)
    info = None
    raw = getattr(model, "threshold_info", None)
    if raw is not None:
        try:
            info = Thresholds.from_dict(raw)
        except ValueError:
            info = None
    if info is not None and info.image == image and info.pixel == pixel:
        return info
    if image is None and pixel is None:
        return Thresholds()
    base = info if info is not None else Thresholds()
    return replace(base, image=image, pixel=pixel, method="user",
                   source=_mixed_source(image, pixel, info))


def threshold_source(model) -> str:
    """One line saying how the model's thresholds were set ("none", "user-set", a rule)."""
    return current_thresholds(model).source


def _mixed_source(image, pixel, info: Optional[Thresholds]) -> str:
    parts = []
    for kind, value, calibrated in (("image", image, info.image if info else None),
                                    ("pixel", pixel, info.pixel if info else None)):
        if value is None:
            parts.append(f"{kind}: none")
        elif info is not None and calibrated == value and info.method in METHODS:
            parts.append(f"{kind}: {_rule(info, kind)} of {info.n_images} held-out normal images")
        else:
            parts.append(f"{kind}: {_USER_SOURCE}")
    if all(p.endswith(_USER_SOURCE) or p.endswith(": none") for p in parts):
        kinds = [k for k, v in (("image", image), ("pixel", pixel)) if v is not None]
        return _USER_SOURCE + ("" if len(kinds) == 2 else f" ({kinds[0]} threshold only)")
    return "; ".join(parts)


def _apply(model, thresholds: Thresholds) -> None:
    model.image_threshold = thresholds.image
    model.pixel_threshold = thresholds.pixel
    model.threshold_info = thresholds.to_dict()


def set_thresholds(model, image: Optional[float] = None, pixel: Optional[float] = None
                   ) -> Thresholds:
    """Set thresholds by hand; they override calibrated ones. A threshold passed as None keeps
    its current value (calibrated or not). Returns the model's new `current_thresholds`."""
    for name, value in (("image", image), ("pixel", pixel)):
        if value is not None and _number(value) is None:
            raise ValueError(f"{name} threshold must be a finite number, got {value!r}")
    before = current_thresholds(model)
    new_image = before.image if image is None else float(image)
    new_pixel = before.pixel if pixel is None else float(pixel)
    calibrated = before if before.method in METHODS else None
    # A record for the calibrated one(s) is kept so that the source names what is still calibrated.
    record = replace(before, image=new_image, pixel=new_pixel, method="user",
                     source=_mixed_source(new_image, new_pixel, calibrated))
    if calibrated is not None and new_image == calibrated.image and new_pixel == calibrated.pixel:
        record = calibrated
    _apply(model, record)
    return record


# ---------------------------------------------------------------------------------- calibration
def calibrate(model, normal_images: Any, method: str = "quantile", q: float = DEFAULT_Q,
              pixel_q: float = DEFAULT_PIXEL_Q, k: float = DEFAULT_K, batch_size: int = 32,
              apply: bool = True, origin: str = "held-out normal images",
              progress: bool = False) -> Thresholds:
    """Set the model's image and pixel thresholds from held-out normal images (module doc).

    normal_images: anything `SimpleNet.score` takes (a folder, paths, arrays, tensors, a list).
        They must be normal and must not be training images.
    method: "quantile" (image: `q` quantile of the image scores, default 0.99; pixel: `pixel_q`
        quantile of all map pixels, default 0.999) or "mean_std" (mean + `k` std of each).
    apply: store them on the model (``image_threshold``, ``pixel_threshold``,
        ``threshold_info``); False only returns them.
    origin: how the images are described in the record's ``source``.

    The pixel threshold is set on the maps `model.score` returns by default (model-size; each
    image's own size with tiling), scored pixels only (padding is not); it applies to input-size
    maps as well, whose values interpolate the model-size ones.

    Memory: every map pixel is kept until the quantile is taken (H*W float32 per image: 332 KB
    at 288, so 1,000 images need 0.3 GB).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("q", q), ("pixel_q", pixel_q)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k):
        raise ValueError(f"k must be a finite number, got {k!r}")
    scores, pixels = _score_images(model, normal_images, batch_size, progress)
    n = int(scores.size)
    if method == "mean_std" and n < 2:
        raise ValueError(f"method 'mean_std' needs at least 2 held-out normal images, got {n}")
    if n < 10:
        warnings.warn(f"thresholds calibrated on only {n} normal image(s) are a rough estimate; "
                      "use a few dozen held-out normal images or more", stacklevel=2)
    if method == "quantile":
        image = float(np.quantile(scores.astype(np.float64), q))
        pixel = float(np.quantile(pixels, pixel_q))
        params = {"q": float(q), "pixel_q": float(pixel_q), "k": None}
    else:
        image = float(scores.mean(dtype=np.float64) + k * scores.std(dtype=np.float64, ddof=1))
        pixel = float(pixels.mean(dtype=np.float64) + k * pixels.std(dtype=np.float64, ddof=1))
        params = {"q": None, "pixel_q": None, "k": float(k)}
    thresholds = Thresholds(
        image=image, pixel=pixel, method=method, n_images=n, source="", **params,
        image_min=float(scores.min()), image_max=float(scores.max()),
        pixel_min=float(pixels.min()), pixel_max=float(pixels.max()))
    rules = (f"{_rule(thresholds, 'image')} of the image scores and {_rule(thresholds, 'pixel')} "
             f"of the anomaly-map pixels")
    thresholds = replace(thresholds, source=f"{rules} of {n} {origin}")
    if apply:
        _apply(model, thresholds)
    return thresholds


def _rule(t: Thresholds, kind: str) -> str:
    if t.method == "quantile":
        return f"{_fmt(t.q if kind == 'image' else t.pixel_q)} quantile"
    return f"mean + {_fmt(t.k)} std"


def _fmt(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:g}"


def _score_images(model, images: Any, batch_size: int, progress: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(image scores [N] float64, every scored map pixel float32) of `images`.

    The maps are those `model.score` gives by default (model-size; each image's own size with
    tiling), scored pixels only: padding never enters a pixel threshold.
    """
    from tqdm.auto import tqdm

    from .preprocess import iter_sources

    scores, pixels = [], []
    bar = tqdm(desc="calibrating thresholds", unit="img", disable=not progress)
    chunk: list = []

    def run():
        result = model.score(chunk, batch_size=batch_size)
        scores.append(result.pred_score.detach().double().cpu().numpy())
        maps, scored = result.anomaly_map, result.scored_mask
        for i in range(len(result)):
            values = maps[i].detach().float()
            if scored is not None:
                values = values[scored[i]]
            pixels.append(values.cpu().numpy().ravel())
        bar.update(len(chunk))
        chunk.clear()

    try:
        for _, source in iter_sources(images):
            chunk.append(source)
            if len(chunk) == batch_size:
                run()
        if chunk:
            run()
    finally:
        bar.close()
    scores = np.concatenate(scores)
    pixels = np.concatenate(pixels)
    if not (np.isfinite(scores).all() and np.isfinite(pixels).all()):
        raise ValueError("the model gave NaN or Inf scores on the calibration images")
    return scores, pixels


def fit_with_holdout(model, images: Any, holdout: float = 0.1, seed: int = 0,
                     method: str = "quantile", q: float = DEFAULT_Q,
                     pixel_q: float = DEFAULT_PIXEL_Q, k: float = DEFAULT_K,
                     progress: bool = True, **fit_kwargs) -> tuple[list[float], Thresholds]:
    """Fit on part of `images` and calibrate the thresholds on the rest.

    For users without separate held-out normal images: a seeded random `holdout` fraction
    (default 10%, at least one image) is kept out of training and used by `calibrate`; the model
    trains on the others (`model.fit(..., seed=seed, **fit_kwargs)`). Returns (the fit's loss
    history, the thresholds). `holdout=0` trains on everything and leaves no threshold (source
    "none"): thresholds set on training images would be too low.
    """
    from .preprocess import iter_sources

    if not isinstance(holdout, (int, float)) or isinstance(holdout, bool) or not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    sources = [source for _, source in iter_sources(images)]
    n = len(sources)
    if holdout == 0:
        history = model.fit(sources, seed=seed, progress=progress, **fit_kwargs)
        _apply(model, Thresholds())
        return history, Thresholds()
    n_hold = max(1, int(round(holdout * n)))
    if n - n_hold < 1:
        raise ValueError(f"holding out {holdout:g} of {n} image(s) leaves none to train on; "
                         "give more images or a separate calibration set")
    order = np.random.default_rng(seed).permutation(n)
    train = [sources[i] for i in sorted(order[n_hold:])]
    held = [sources[i] for i in sorted(order[:n_hold])]
    history = model.fit(train, seed=seed, progress=progress, **fit_kwargs)
    pct = f"{100 * holdout:g}%"
    thresholds = calibrate(model, held, method=method, q=q, pixel_q=pixel_q, k=k,
                           origin=f"training images held out from training ({pct}, seed {seed})",
                           progress=progress)
    return history, thresholds


# ---------------------------------------------------------------------------------- normalising
def normalize_scores(scores: Any, thresholds: Thresholds, kind: str = "image") -> Any:
    """anomalib's min-max normalisation: ``clip((s - t) / (max - min) + 0.5, 0, 1)``.

    `t` is the image (kind="image") or pixel (kind="pixel") threshold, `min`/`max` the range of
    the calibration scores of that kind, so the threshold maps to 0.5: normalised > 0.5 means
    anomalous. Works on numpy arrays, torch tensors (same type back) and floats. A degenerate
    range (max == min) uses a width of 1.
    """
    if kind not in ("image", "pixel"):
        raise ValueError(f"kind must be 'image' or 'pixel', got {kind!r}")
    t = thresholds.image if kind == "image" else thresholds.pixel
    low = thresholds.image_min if kind == "image" else thresholds.pixel_min
    high = thresholds.image_max if kind == "image" else thresholds.pixel_max
    if t is None or low is None or high is None:
        raise ValueError(f"normalising {kind} scores needs a {kind} threshold and the range of "
                         f"calibration scores; these thresholds have source {thresholds.source!r} "
                         "(calibrate on held-out normal images first)")
    width = (high - low) if high > low else 1.0
    if isinstance(scores, Tensor):
        return ((scores - t) / width + 0.5).clamp(0.0, 1.0)
    out = np.clip((np.asarray(scores, dtype=np.float64) - t) / width + 0.5, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
