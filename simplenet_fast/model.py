"""SimpleNet: backbone + head + pre/post-processing, with `fit`, `score`, `save` and `load`.

The model follows anomalib's split: `SimpleNet` is a plain `nn.Module` whose inference path returns
a typed result (`AnomalyResult`, anomalib's field names); training lives in `fit` and touches only
the head (SPEC.md section 2). Inference follows SPEC section 1 and is one pure-tensor device
function, `_device_forward`, shared by the eager path and the CUDA-graph path. How images of any
shape become model inputs, and how maps go back to the images' pixels, is SPEC section 8
(`simplenet_fast.geometry`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._io import atomic_open
from ._precision import check_precision, resolve_precision
from .backbones import build_backbone, default_config
from .geometry import (InputGeometry, Placement, Tiling, fill_unscored, mask_padded_map,
                       mask_padding, real_pixel_mask, zero_padding)
from .head import SimpleNetHead, check_scores
from .postprocess import anomaly_map as _anomaly_map, check_sigma
from .preprocess import (PreparedImage, batched, count_images, decode, decoded_window,
                         image_header_size, iter_prepared, iter_sources, model_input, normalise,
                         prepare_image)
from .recipes import RecipeTrainer, resolve_recipe

FORMAT = "simplenet_fast"
# 2: image_size stored as [H, W], plus resize_mode, tiling and epochs. Version 1 files (a square
# image_size, crop mode) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

DEFAULT_FEATURE_CACHE_BYTES = 2 * 1024**3
_PUBLISHED_WEIGHTS = ("imagenet",)  # weights a registry backbone rebuilds by name: not stored
_MAX_GRAPHS = 4  # captured CUDA graphs kept per model (each holds its own memory pool)
MAP_SIZES = ("model", "input")
_BFLOAT16_BACKBONE_LOCK = threading.Lock()  # SimpleNet._bfloat16_backbone: one copy per model
# Bound on what a model (and so a model file) may declare: the fold's pooling matrices are
# [P, C*9] float64 (1.2 GB at 16384 with WideResNet's 1024 layer3 channels; the paper uses 1536).
# Sides (image_size, resize, tile) are bounded by geometry.MAX_SIDE.
MAX_PRETRAIN_EMBED_DIM = 16384

Maps = Union[Tensor, list]


@dataclass
class AnomalyResult:
    """What `SimpleNet.score` returns; field names are anomalib's.

    pred_score:   [B] float, image score = max of the raw patch scores (SPEC 1.9) over the
                  patches that hold image pixels (padding never counts), over all windows with
                  tiling.
    anomaly_map:  the maps, SPEC 1.10. `map_size="model"`: [B, H, W] at the model's input size
                  `image_size`, aligned with the model input (see `SimpleNet.score`).
                  `map_size="input"`: each image's map at its own (h, w): a [B, h, w] tensor when
                  every image has the same size, otherwise a list of [h_i, w_i] tensors.
    patch_scores: [B, h, w] float, raw patch scores on the stride-8 grid (36x36 at 288); padded
                  patches hold the image's lowest real patch score. None with tiling (each
                  window has its own grid).
    pred_label:   [B] bool, `pred_score > model.image_threshold`, or None without that threshold.
    pred_mask:    like `anomaly_map`, bool: `anomaly_map > model.pixel_threshold` on scored
                  pixels, False elsewhere; None without that threshold.
    scored_mask:  like `anomaly_map`, bool: the pixels the model scored (padding in a model-size
                  "pad" map, and the border a "crop" cut off in an input-size map, are not; they
                  hold the map's lowest value); None when every pixel was scored.
    threshold_source: where the thresholds came from (`simplenet_fast.thresholds`): "none",
                  "user-set", or the calibration rule.
    All tensors live on the model's device.
    """

    pred_score: Tensor
    anomaly_map: Maps
    patch_scores: Optional[Tensor] = None
    pred_label: Optional[Tensor] = None
    pred_mask: Optional[Maps] = None
    threshold_source: str = "none"
    scored_mask: Optional[Maps] = None

    def __len__(self) -> int:
        return int(self.pred_score.shape[0])


def _resolve(value: Any, default: Any) -> Any:
    return default if value is None else value


class SimpleNet(nn.Module):
    """SimpleNet (Liu et al., CVPR 2023): a frozen backbone and a trained adaptor + discriminator.

    Every setting left at None takes the backbone's declared default
    (`simplenet_fast.backbones.default_config`: the paper's values for WideResNet-50-2, those
    chosen on ELPV validation data for EfficientNet-Lite0, the paper's for a custom module that
    declares none); `model.config` shows what was used.

    Args:
        backbone: "wide_resnet50_2" (the paper's), "efficientnet_lite0", or an `nn.Module` (see
            `simplenet_fast.backbones.build_backbone`).
        weights: "imagenet" (WideResNet: torchvision's published file, downloaded once into the
            torch hub cache), the path of a local state-dict file, or None (random init).
        image_size: the model input, an int (a square) or (height, width); 288 in the paper.
        resize_mode: how an image becomes the input (SPEC 8, `simplenet_fast.geometry`): "crop"
            (the paper's: scale, then cut the centre), "whole" (the whole image resized to
            image_size, aspect not kept) or "pad" (aspect kept, fit inside image_size at the
            top-left, the rest padding that is never scored). Default: "crop" when `resize` is
            given, "whole" with tiling, else the backbone's.
        resize: "crop" only: the short side of the box the image is scaled to cover before the
            centre crop (329 in the paper; torchvision's Resize(329) + CenterCrop(288) for a
            square). None: the paper's 329 / 288 ratio on image_size's short side.
        tiling: None, or (tile, stride) in the image's own pixels (ints or (height, width)
            pairs): every image is cut into overlapping tile windows at its native resolution,
            each scored as one input (`fit` trains on the windows too); the map is stitched at
            the image's size, the image score is the max over windows. See `geometry.Tiling`.
            Saved with the model; `model.tiling` may be reassigned (e.g. another stride).
        pretrain_embed_dim, target_embed_dim, hidden: head sizes (SPEC 1.5, 1.6, 1.8).
        noise_std: training noise (SPEC 2); must suit the scale of the backbone's features (under
            a relative-noise recipe, a fraction of the adapted features' spread).
        epochs: `fit`'s default number of epochs.
        margin: training loss margin (SPEC 2).
        recipe: how `fit` trains the head: "paper" (SPEC 2), another name of
            `simplenet_fast.recipes.RECIPES`, a `TrainingRecipe` or its text form (the backbone's
            default unless given). Inference does not depend on it. `model.recipe` may be
            reassigned before a `fit`.
        sigma: Gaussian blur of the anomaly map (SPEC 1.10); 0 disables it.
        precision: "float32", "bfloat16" or "auto" (`simplenet_fast._precision`). "bfloat16" runs
            the backbone in bfloat16, channels-last, where the device has bf16 arithmetic: on
            CUDA (compute capability 8.0 on) under `torch.autocast`, with the fused head's GEMMs
            in bf16 on tensor cores; on a CPU with AVX512-BF16 or AMX-BF16 as a bf16 copy of the
            backbone (made once per weight state), whose maps the fused head widens to float32.
            Elsewhere, and for a backbone whose bf16 answer is off SPEC 6 (EfficientNet-Lite0),
            it runs float32, with a one-time warning. "auto" is bf16 where that is native,
            within SPEC 6 and faster for the backbone (WideResNet-50-2: about 2x on such CPUs),
            float32 otherwise. SPEC 6: bf16 scores are within 2e-2 relative of float32. Training (`fit`) is always float32. Saved with the model;
            `model.precision` may be changed at any time, `score(precision=...)` per call, and
            `model.compute_precision` says what the setting resolves to on the model's device.
        device: where to put the model (None: the CPU). `model.to(...)` works too.

    Attributes:
        head: the `SimpleNetHead`; backbone: the frozen feature extractor.
        config: the settings in use (plain types); geometry: the `InputGeometry`.
        image_threshold, pixel_threshold: None, or the floats `score` compares against to fill
            `pred_label` / `pred_mask`.
        threshold_info: None, or the record (a flat dict of plain types) of how the thresholds
            were calibrated, written by `simplenet_fast.thresholds`; saved with the model.
    """

    def __init__(
        self,
        backbone: Any = "wide_resnet50_2",
        weights: Any = "imagenet",
        image_size: Any = None,
        resize: Optional[int] = None,
        resize_mode: Optional[str] = None,
        tiling: Any = None,
        pretrain_embed_dim: Optional[int] = None,
        target_embed_dim: Optional[int] = None,
        hidden: Optional[int] = None,
        noise_std: Optional[float] = None,
        epochs: Optional[int] = None,
        margin: float = 0.5,
        recipe: Any = None,
        sigma: float = 4.0,
        precision: str = "float32",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        defaults = default_config(backbone)  # also says what a bad backbone argument is
        tiling = Tiling.of(tiling)
        if resize_mode is None:  # a resize only means something to a crop
            resize_mode = ("crop" if resize is not None else
                           "whole" if tiling is not None else defaults.resize_mode)
        geometry = InputGeometry(_resolve(image_size, defaults.image_size), resize_mode, resize,
                                 tiling)
        pretrain_embed_dim = _resolve(pretrain_embed_dim, defaults.pretrain_embed_dim)
        if isinstance(pretrain_embed_dim, int) and pretrain_embed_dim > MAX_PRETRAIN_EMBED_DIM:
            raise ValueError(f"pretrain_embed_dim must be <= {MAX_PRETRAIN_EMBED_DIM} (the fused "
                             f"head's pooling plans grow with it), got {pretrain_embed_dim!r}")
        noise_std = _resolve(noise_std, defaults.noise_std)
        for name, value in (("noise_std", noise_std), ("margin", margin)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        epochs = _resolve(epochs, defaults.epochs)
        _check_int("epochs", epochs, 0)
        check_sigma(sigma, geometry.image_size)  # the rule anomaly_map applies to the map
        check_precision(precision)
        recipe = resolve_recipe(_resolve(recipe, defaults.recipe))  # checked before the backbone
        self.backbone = build_backbone(backbone, weights=weights)
        self.head = SimpleNetHead(self.backbone.channels, pretrain_embed_dim,
                                  _resolve(target_embed_dim, defaults.target_embed_dim),
                                  _resolve(hidden, defaults.hidden))
        self.geometry = geometry
        self.noise_std = float(noise_std)
        self.epochs = int(epochs)
        self.margin = float(margin)
        self._recipe_name, self._recipe = recipe
        self.sigma = float(sigma)
        self.precision = precision
        self.image_threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.threshold_info: dict | None = None
        self.register_buffer("_mean", torch.tensor(self.backbone.mean, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.backbone.std, dtype=torch.float32)
                             .view(1, 3, 1, 1), persistent=False)
        self._graphs: dict = {}
        self._compiled = None  # score(compile=True)'s compiled _device_forward
        self._channels_last = False
        self._bfloat16_backbone_cache: tuple | None = None  # (weights state, module), CPU bf16
        self.eval()
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self._mean.device

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.geometry.image_size

    @property
    def resize_mode(self) -> str:
        return self.geometry.resize_mode

    @property
    def resize(self) -> Optional[int]:
        """Crop mode's short side before the crop; None in the other modes."""
        return self.geometry.resize

    @property
    def tiling(self) -> Optional[Tiling]:
        return self.geometry.tiling

    @tiling.setter
    def tiling(self, value: Any) -> None:
        """Another tiling for scoring (e.g. a finer stride); the mode must allow tiling."""
        self.geometry = InputGeometry(self.image_size, self.resize_mode, self.resize, value)

    @property
    def recipe(self) -> str:
        """The training recipe's registered name or text form (`simplenet_fast.recipes`)."""
        return self._recipe_name

    @recipe.setter
    def recipe(self, value: Any) -> None:
        """Another recipe for the next `fit` (the trained weights are unchanged)."""
        self._recipe_name, self._recipe = resolve_recipe(value)

    @property
    def config(self) -> dict:
        """The settings in use (besides backbone weights and device) as plain types: what
        `save` stores and `SimpleNet(**...)` takes back."""
        return {
            "backbone": self.backbone.name,
            "weights_id": self.backbone.weights_id,
            **self.geometry.config(),
            "pretrain_embed_dim": self.head.pretrain_embed_dim,
            "target_embed_dim": self.head.target_embed_dim,
            "hidden": self.head.hidden,
            "noise_std": self.noise_std,
            "epochs": self.epochs,
            "margin": self.margin,
            "recipe": self.recipe,
            "sigma": self.sigma,
            "precision": self.precision,
        }

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() move or replace tensors a captured graph points at, and the
        # backbone the bf16 copy was made from.
        self._graphs.clear()
        self._compiled = None
        self._bfloat16_backbone_cache = None
        return super()._apply(fn, *args, **kwargs)

    @property
    def precision(self) -> str:
        """The precision setting: "float32", "bfloat16" or "auto" (see the class doc)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    @property
    def compute_precision(self) -> str:
        """What `precision` resolves to on the model's device: "float32" or "bfloat16"."""
        return self._compute_precision(None)

    def _compute_precision(self, requested: str | None) -> str:
        requested = self._precision if requested is None else check_precision(requested)
        return resolve_precision(requested, self.device, self.backbone)

    def _bfloat16_backbone(self) -> nn.Module:
        """The backbone as a bfloat16, channels-last copy, for bf16 inference on the CPU.

        oneDNN's fast bf16 convolutions want bf16 weights and channels-last activations; casting
        WideResNet's 25M weights on every call, as autocast does, took 11 ms on 2 cores. The copy
        is made once per weight state (a reloaded or edited backbone gets a new one); it is no
        submodule, so it is neither saved nor trained, and `fit` keeps the float32 backbone
        (SPEC 2 training is float32). It costs half the backbone's float32 memory (50 MB for
        WideResNet-50-2 to layer3).
        """
        backbone = self.backbone
        state = tuple((t.data_ptr(), t._version) for t in (*backbone.parameters(), *backbone.buffers()))
        with _BFLOAT16_BACKBONE_LOCK:  # threads sharing a model make one copy
            cached = self._bfloat16_backbone_cache
            if cached is None or cached[0] != state:
                # ordinary tensors even when called under inference_mode, so that the copy serves
                # any later caller
                with torch.inference_mode(False), torch.no_grad():
                    twin = copy.deepcopy(backbone).to(torch.bfloat16, memory_format=torch.channels_last)
                cached = self._bfloat16_backbone_cache = (state, twin)
        return cached[1]

    # ------------------------------------------------------------------------------ inference
    def _device_forward(self, batch: Tensor, fused: bool | None = None, check: bool = True,
                        real: Tensor | None = None, precision: str | None = None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 `[B, H, W, 3]` on the model's device -> (patch_scores, pred_score, anomaly_map).

        Pure tensor work on the device: no host synchronisation unless `check` (the NaN / Inf
        check of the scores) is True, so that it can be captured in a CUDA graph with
        `check=False`, and no graph break under torch.compile (`simplenet_fast.scoring`).
        `fused=None` takes the compiled head when it has a kernel for the features' device and
        dtype. `real`: None, or int64 `[B, 2]` on the device, the rows and columns of each input
        that hold image pixels; the rest is padding, which is set to the mean colour and kept out
        of the scores and the map (`geometry.mask_padding`). `precision`: "float32" or
        "bfloat16" as resolved by `_compute_precision` (None: the model's setting).
        """
        x = normalise(batch, self._mean, self._std)
        if real is not None:
            x = zero_padding(x, real)
        return self._normalised_forward(x, fused, check, real, precision)

    def _normalised_forward(self, x: Tensor, fused: bool | None = None, check: bool = True,
                            real: Tensor | None = None, precision: str | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """`_device_forward` from the normalised float inputs `[B, 3, H, W]` (padding zeroed)."""
        bf16 = (precision or self.compute_precision) == "bfloat16"
        on_cuda = x.device.type == "cuda"
        if bf16 and on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                features = self.backbone(x)
        elif bf16:
            features = self._bfloat16_backbone()(x.to(torch.bfloat16, memory_format=torch.channels_last))
        else:
            # normalise's output is channels-last already: backbones that run in that layout
            # take it without a copy (the Lite0 fast route converted NCHW back, two copies).
            layout = torch.channels_last if self.backbone.channels_last_input else torch.contiguous_format
            features = self.backbone(x.contiguous(memory_format=layout))
        compute = torch.bfloat16 if bf16 and on_cuda else torch.float32
        scores = self.head.patch_scores(features, fused=fused, compute_dtype=compute,
                                        check_finite=check).float()
        map_scores = scores
        if real is not None:
            scores, map_scores = mask_padding(scores, real, self.image_size)
        pred_score = scores.amax(dim=(1, 2))
        amap = _anomaly_map(map_scores, self.image_size, self.sigma)
        if real is not None:
            amap = mask_padded_map(amap, real)
        return scores, pred_score, amap

    def forward(self, batch: Tensor, real_size: Tensor | None = None) -> AnomalyResult:
        """Score one preprocessed batch: uint8 `[B, H, W, 3]` model inputs (see `preprocess`).

        real_size: None, or `[B, 2]` ints, the rows and columns of each input (from the top-left)
        that hold image pixels ("pad" mode, `Placement.real`); the rest is padding. Maps are at
        the model's input size.
        """
        height, width = self.image_size
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[-1] != 3 \
                or tuple(batch.shape[1:3]) != (height, width):
            raise ValueError(f"forward takes uint8 inputs [B, {height}, {width}, 3] (use score() "
                             f"for images), got {list(batch.shape)} {batch.dtype}")
        real = None if real_size is None else _check_real_size(real_size, batch.shape[0],
                                                                self.image_size)
        with torch.inference_mode():
            out = self._device_forward(batch.to(self.device), real=None if real is None
                                       else real.to(self.device))
        return self._result(*(t.clone() for t in out),
                            scored=None if real is None else real_pixel_mask(
                                real.to(self.device), self.image_size))

    def _result(self, patch_scores: Tensor | None, pred_score: Tensor, amap: Maps,
                scored: Maps | None = None) -> AnomalyResult:
        from .thresholds import threshold_source

        label = None if self.image_threshold is None else pred_score > self.image_threshold
        mask = None
        if self.pixel_threshold is not None:
            mask = _over_threshold(amap, scored, self.pixel_threshold)
        return AnomalyResult(pred_score=pred_score, anomaly_map=amap, patch_scores=patch_scores,
                             pred_label=label, pred_mask=mask,
                             threshold_source=threshold_source(self), scored_mask=scored)

    def prepare(self, image: Any, what: str | None = None, keep_image: bool = False
                ) -> PreparedImage:
        """Decode one image and make it ready for this model (`preprocess.prepare_image`; `what`
        names it in errors, by default its path for a file).

        `score` accepts the result like any image; preparing in worker threads overlaps decoding
        with scoring. keep_image: keep the decoded original (`PreparedImage.image()`, e.g. to
        draw an overlay on it).
        """
        return prepare_image(image, self.geometry, what, keep_image)

    def score(self, images: Any, batch_size: int = 32, fused: bool | None = None,
              cuda_graph: bool = False, map_size: str | None = None, compile: bool = False,
              progress: bool | Callable[[int], Any] | None = None, precision: str | None = None,
              workers: int = 0) -> AnomalyResult:
        """Score images (see `simplenet_fast.preprocess` for every accepted kind).

        Images are decoded and made into model inputs lazily, `batch_size` at a time (with
        tiling: `batch_size` windows at a time, from as many images as it takes), so neither a
        list of 10,000 paths nor a 4000x3000 image sits in memory as model inputs at once; each
        uint8 batch is copied to the device once (pinned, non-blocking on CUDA) and normalised
        there.

        map_size: where the maps live (SPEC 8).
            "model" (the default without tiling): `[B, H, W]` at the model's input size. Pixel
            (i, j) is input pixel (i, j): in "crop" mode that is pixel (top + i, left + j) of the
            scaled image (`model.prepare(image).placement`), in "pad" mode the image fills the
            top-left `placement.real` part and the padding holds the map's lowest value
            (`scored_mask` False).
            "input" (the default, and the only choice, with tiling): each image's map at its
            own (h, w), mapped back through the resize mode (bilinear, align_corners=False: for
            "whole" it is `F.interpolate` of the model-size map to (h, w)); a [B, h, w] tensor
            when all images have the same size, else a list. The border a "crop" cuts off is not
            scored: it holds the image's lowest map value, `scored_mask` and `pred_mask` are
            False there. With tiling, the map is the per-pixel mean of the overlapping windows'
            maps and the image score the max over windows.
            Thresholds are the same numbers at either size (an input-size map interpolates the
            model-size one, so its values stay within the same range).
        fused: None picks the compiled head when available, False the pure-PyTorch reference,
            True insists on the compiled head.
        cuda_graph: on CUDA, capture the device path (normalise, backbone, head, map) once per
            batch size in a `torch.cuda.CUDAGraph` and replay it; a last, smaller batch is padded
            to the captured size. Graphs are dropped when the model moves or its weights change.
            Ignored on the CPU.
        compile: run the device path through `torch.compile(fullgraph=True)` (compiled on the
            first call, in tens of seconds, and again for a new batch shape; kept with the model;
            see `simplenet_fast.scoring`). Not together with cuda_graph.
        progress: True shows a progress bar (tqdm, on stderr); a callable is called with the
            number of images of each batch once it is scored (on CUDA: handed to the device,
            which is synchronised once per call, at the end).
        precision: this call's precision, "float32", "bfloat16" or "auto"; None (default) uses
            `model.precision`. A model trained in float32 scores in bf16 as it is.
        workers: 0 (default) decodes and prepares each image in the calling thread, just before
            its batch; N > 0 has N threads prepare the next batch while the model scores this
            one (image files: decoding is usually the bottleneck on a GPU; PIL releases the GIL
            while it decodes and resizes). Same results, in the same order, and the same errors.
        """
        _check_int("batch_size", batch_size, 1)
        if compile and cuda_graph:
            raise ValueError("compile=True and cuda_graph=True are exclusive: pick one")
        if map_size is None:
            map_size = "input" if self.tiling is not None else "model"
        if map_size not in MAP_SIZES:
            raise ValueError(f"map_size must be one of {MAP_SIZES}, got {map_size!r}")
        if map_size == "model" and self.tiling is not None:
            raise ValueError("with tiling each window has its own model-size map: the maps are "
                             "stitched at each image's own size (map_size='input')")
        precision = self._compute_precision(precision)
        self.head.eval()
        if precision == "bfloat16" and self.device.type == "cuda" and not self._channels_last:
            self._graphs.clear()  # the conversion replaces the backbone's weight tensors
            self.backbone.to(memory_format=torch.channels_last)
            self._channels_last = True
        run = _BatchRunner(self, batch_size, fused, cuda_graph, compile, precision)
        if self.tiling is not None:
            with _progress(progress, images) as report, torch.inference_mode():
                stitched = self._score_tiled(images, run, report, workers)
            # assembled outside inference mode, as below
            amap, scored = _gather_maps([(m, s) for _, m, s in stitched])
            return self._result(None, torch.stack([score for score, _, _ in stitched]), amap,
                                scored)
        with _progress(progress, images) as report, torch.inference_mode():
            outputs = []
            prepared = iter_prepared(images, self.geometry, workers=workers, ahead=batch_size)
            for chunk in batched(prepared, batch_size):
                placements = [p.placement for p in chunk]
                patch_scores, pred_score, amap = run([p.input for p in chunk], placements)
                if map_size == "input":
                    amap = [fill_unscored(*placement.to_image(m))
                            for placement, m in zip(placements, amap)]
                else:
                    amap = [(amap, _model_scored(placements, self.image_size, amap.device))]
                outputs.append((patch_scores, pred_score, amap))
                report(len(chunk))
        run.finish()
        # Concatenated outside inference mode: the result holds ordinary tensors that users can
        # modify in place.
        patch_scores, pred_score = (torch.cat([o[i] for o in outputs]) for i in range(2))
        maps = [pair for o in outputs for pair in o[2]]
        if map_size == "model":
            amap = torch.cat([m for m, _ in maps])
            scored = None if all(s is None for _, s in maps) else torch.cat(
                [s if s is not None else torch.ones_like(m, dtype=torch.bool) for m, s in maps])
        else:
            amap, scored = _gather_maps(maps)
        return self._result(patch_scores, pred_score, amap, scored)

    def _score_tiled(self, images: Any, run: "_BatchRunner", report: Callable[[int], Any],
                     workers: int = 0) -> list[tuple[Tensor, Tensor, Optional[Tensor]]]:
        """`score` with tiling: windows of every image, `batch_size` at a time, stitched back;
        (image score, map, scored mask or None) per image. `report` is called with the number
        of images completed by each batch; `workers` threads decode up to that many images
        ahead (whole images: each can be large)."""
        done: list[tuple[Tensor, Tensor, Optional[Tensor]]] = []
        open_images: deque = deque()
        inputs: list[Tensor] = []
        placed: list[tuple[_Stitcher, int, int, Placement]] = []

        def flush():
            _, pred_score, amap = run(inputs, [p for *_, p in placed])
            for (stitcher, top, left, placement), score, window_map in zip(placed, pred_score, amap):
                stitcher.add(top, left, placement, score, window_map)
            inputs.clear()
            placed.clear()
            completed = len(done)
            while open_images and open_images[0].complete:
                done.append(open_images.popleft().result())
            report(len(done) - completed)

        for prepared in iter_prepared(images, self.geometry, workers=workers):
            stitcher = _Stitcher(prepared, self.device)
            open_images.append(stitcher)
            for top, left, window, placement in prepared.windows():
                inputs.append(window)
                placed.append((stitcher, top, left, placement))
                if len(inputs) == run.batch_size:
                    flush()
        if inputs:
            flush()
        run.finish()
        return done

    def _compiled_forward(self):
        """`_device_forward` through torch.compile(fullgraph=True), built once per model (and
        again after it moves): dynamo's guards recompile it for a new batch shape or argument."""
        if self._compiled is None:
            self._compiled = torch.compile(self._device_forward, fullgraph=True)
        return self._compiled

    def _graph_forward(self, batch: Tensor, batch_size: int, fused: bool | None,
                       real: Tensor | None = None, precision: str | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """`_device_forward` through a CUDA graph captured for a fixed batch shape and precision.

        `batch`: at most `batch_size` uint8 inputs, pinned on the host or on the device; `real`:
        None or their `[n, 2]` real sizes (graphs with and without it are kept apart). Graphs are
        captured for `batch_size`; a smaller batch is zero-padded into that graph (real size =
        the whole input), except when no graph of that size exists yet (an input shorter than
        one batch), which gets its own.
        """
        n = batch.shape[0]
        padded = real is not None
        precision = precision or self.compute_precision
        size = (batch_size if n == batch_size
                or self._graph_key(batch_size, fused, padded, precision) in self._graphs else n)
        key = self._graph_key(size, fused, padded, precision)
        weights = self.head.weights_state()
        entry = self._graphs.get(key)
        if entry is None or entry[0] != weights:
            # New, or its weights changed (a captured graph would replay stale folded weights).
            self._graphs.pop(key, None)
            while len(self._graphs) >= _MAX_GRAPHS:
                del self._graphs[next(iter(self._graphs))]
            entry = (weights, *self._capture(size, fused, padded, precision))
            self._graphs[key] = entry
        _, graph, static_in, static_real, static_out = entry
        static_in[:n].copy_(batch, non_blocking=True)
        if n < size:
            static_in[n:].zero_()
        if padded:
            static_real[:n].copy_(real, non_blocking=True)
            if n < size:
                static_real[n:] = torch.tensor(self.image_size, device=self.device)
        graph.replay()
        # Clones are queued on the same stream after the replay: no host synchronisation.
        return tuple(t[:n].clone() for t in static_out)

    def _graph_key(self, size: int, fused: bool | None, padded: bool, precision: str) -> tuple:
        return (size, fused, padded, self.image_size, precision, str(self.device))

    def _capture(self, batch_size: int, fused: bool | None, padded: bool, precision: str):
        # The first graph checks the features once, eagerly, outside the capture.
        height, width = self.image_size
        static_in = torch.zeros(batch_size, height, width, 3, dtype=torch.uint8, device=self.device)
        static_real = None
        if padded:
            static_real = torch.tensor([list(self.image_size)] * batch_size, dtype=torch.int64,
                                       device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up on a side stream (PyTorch's recipe): lazy inits, cached folds, kernels.
            self._device_forward(static_in, fused, check=True, real=static_real,
                                 precision=precision)
            self._device_forward(static_in, fused, check=False, real=static_real,
                                 precision=precision)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._device_forward(static_in, fused, check=False, real=static_real,
                                              precision=precision)
        return graph, static_in, static_real, static_out

    # ------------------------------------------------------------------------------ training
    def fit(self, images: Any, epochs: int | None = None, batch_size: int = 8,
            seed: int | None = None, progress: bool = True,
            feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES) -> list[float]:
        """Train the adaptor and discriminator on normal images (SPEC.md section 2).

        images: a folder, a list of images or paths (any kind `score` takes), or an iterable such
            as a `torch.utils.data.DataLoader`. A DataLoader must yield image batches: uint8
            (0..255) or float ([0, 1]) tensors `[B, 3, H, W]` (or `[B, 1, H, W]`), or lists of
            paths / images; not `(images, labels)` pairs. It is iterated once: its images are
            made into uint8 model inputs and kept (249 KB per image at 288; with tiling, every
            window's), and `fit` does its own seeded shuffling and batching of them, so the
            loader's batch size does not matter (its order does, as a list's does: the seeded
            shuffle permutes that order). Paths in a list or folder are decoded when needed and
            not kept. Every image goes through the model's geometry (resize mode, tiling) exactly
            as in `score`: each tiling window is one training input. Patches that lie wholly in
            padding ("pad" mode, or windows overhanging a small image) are left out of the
            samples: the discriminator never learns from them.
        epochs: passes over the images; None: `model.epochs` (the backbone's default, 160 = 40 x
            4 for the paper's WideResNet-50-2).
        batch_size: images (windows) per step (8 in the paper); every real patch of these is a
            sample.
        seed: makes the run reproducible: the head's init, the shuffling and the noise all come
            from it, and on the CPU two fits with the same seed give bit-identical weights and
            losses. On CUDA the noise comes from the CUDA generator (other numbers than on the
            CPU) and cuDNN/cuBLAS may round differently from run to run. None draws a seed from
            torch's global generator.
        progress: show a tqdm bar with the epoch and its mean loss.
        feature_cache_bytes: the frozen backbone and the fixed part of the head (unfold, pooling:
            `head.embed`) do not change during training, so they run ONCE per input and their
            output, `[H2, W2, target_embed_dim]` float32 per input, is kept on the model's device
            and reused every epoch: H2*W2*T*4 bytes, 36*36*1536*4 = 8.0 MB per image at the paper
            configuration (2 GiB, the default, holds 269 such images). When the inputs do not
            fit, embeddings are recomputed for every batch of every epoch instead (same results,
            up to the backbone's rounding across batch compositions; with tiling, each batch then
            decodes its images again). 0 disables the cache.

        Training starts from the official init (`head.reset_parameters()`), so a second `fit`
        starts over; thresholds are cleared (they belonged to the old weights). The model's
        `recipe` (`simplenet_fast.recipes`) makes the fake features and sets the loss and
        schedule; optimisers: adaptor AdamW(lr 1e-4, weight decay 0.01), discriminator Adam(lr
        2e-4, weight decay 1e-5). No checkpoint is selected on test data: the weights after the
        last epoch are kept. The head is in eval mode afterwards.

        A fit that does not finish leaves the model as it was before the call: an interrupt or an
        error restores the head and the thresholds, and a loss that is not finite (training
        diverged) raises FloatingPointError after the epoch it happened in, so that no
        half-trained or NaN model can be saved.

        Returns the mean training loss of each epoch.
        """
        from tqdm.auto import tqdm

        epochs = self.epochs if epochs is None else epochs
        for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                                 ("feature_cache_bytes", feature_cache_bytes, 0)):
            _check_int(name, value, low)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
        device = self.device
        data = _TrainingImages(images, self.geometry)
        n = len(data)

        self._graphs.clear()
        before = ({k: v.clone() for k, v in self.head.state_dict().items()},
                  self.image_threshold, self.pixel_threshold, self.threshold_info)
        self.image_threshold = self.pixel_threshold = self.threshold_info = None
        history: list[float] = []
        try:
            _seeded_reset(self.head, seed, device)
            order_generator = torch.Generator().manual_seed(seed)
            noise_generator = torch.Generator(device).manual_seed(seed + 1)  # < 2**64
            trainer = RecipeTrainer(self._recipe, self.head, self.noise_std, self.margin, epochs,
                                    noise_generator)
            cache = (self._embed_all(data, batch_size, feature_cache_bytes)
                     if epochs and feature_cache_bytes else None)
            real_patches = None  # [n, H2, W2] bool on the device when some inputs hold padding
            if epochs and data.padded:
                grid = (cache if cache is not None else self._embed(*data.batch([0]))).shape[1:3]
                real_patches = data.real_patches(grid).to(device)
            self.head.train()
            bar = tqdm(range(epochs), desc="SimpleNet fit", unit="epoch", disable=not progress)
            for _ in bar:
                order = torch.randperm(n, generator=order_generator)
                total = torch.zeros((), device=device)
                steps = 0
                for start in range(0, n, batch_size):
                    index = order[start:start + batch_size]
                    if cache is not None:
                        embeddings = cache[index.to(cache.device)]
                    else:
                        embeddings = self._embed(*data.batch(index.tolist()))
                    if real_patches is not None:
                        embeddings = embeddings[real_patches[index.to(device)]]
                    loss = self._train_step(embeddings, trainer)
                    total += loss.detach()
                    steps += 1
                history.append(float(total) / steps)
                if not math.isfinite(history[-1]):
                    raise FloatingPointError(
                        f"training diverged: the mean loss of epoch {len(history)} is "
                        f"{history[-1]} (recipe {self.recipe!r}, noise_std "
                        f"{self.noise_std:g}); the model is left as it was before fit")
                trainer.end_epoch()
                bar.set_postfix(loss=f"{history[-1]:.4f}")
            trainer.finish()
        except BaseException:
            self.head.load_state_dict(before[0])
            self.image_threshold, self.pixel_threshold, self.threshold_info = before[1:]
            raise
        finally:
            self.head.zero_grad(set_to_none=True)
            self.head.eval()
        return history

    def _embed(self, inputs: Tensor, real: Tensor | None = None) -> Tensor:
        """uint8 inputs on the CPU -> `head.embed` of their features, [b, H2, W2, T] float32.
        `real`: None or [b, 2] real sizes (padding set to the mean colour, as in scoring)."""
        with torch.no_grad():
            x = normalise(inputs.to(self.device), self._mean, self._std)
            if real is not None:
                x = zero_padding(x, real.to(self.device))
            features = self.backbone(x.contiguous())
            return self.head.embed([f.float() for f in features])

    def _embed_all(self, data: "_TrainingImages", batch_size: int, budget: int) -> Tensor | None:
        """Embeddings of every training input, or None when they would not fit in `budget`."""
        n = len(data)
        cache = None
        for start in range(0, n, batch_size):
            embeddings = self._embed(*data.batch(list(range(start, min(n, start + batch_size)))))
            if cache is None:
                need = n * embeddings[0].numel() * embeddings.element_size()
                if need > budget:
                    return None
                cache = embeddings.new_empty(n, *embeddings.shape[1:])
            cache[start:start + embeddings.shape[0]] = embeddings
        return cache

    def _train_step(self, embeddings: Tensor, trainer: RecipeTrainer) -> Tensor:
        """One step of the model's recipe on every patch of a batch; returns the loss. Kept as a
        method of the model so that one model's steps can be wrapped (tests count the patches a
        fit sees; bench/elpv_benchmark.py takes its checkpoints here)."""
        return trainer.step(embeddings)

    # ------------------------------------------------------------------------------ save / load
    def calibrate(self, normal_images: Any, **kwargs):
        """Set both thresholds from held-out normal images; returns the `Thresholds` record.

        See `simplenet_fast.thresholds.calibrate`: method="quantile" (q=0.99 of image scores,
        pixel_q=0.999 of map pixels) or "mean_std" (k=3). Saved with the model.
        """
        from .thresholds import calibrate
        return calibrate(self, normal_images, **kwargs)

    def export_onnx(self, path: str | os.PathLike, batch_size_dynamic: bool = True, opset: int = 17,
                    input_format: str = "float") -> str:
        """Write the scoring path (backbone, folded head, map) as ONNX; returns the path.

        See `simplenet_fast.export.export_onnx` for the graph's inputs and outputs.
        """
        from .export import export_onnx
        return export_onnx(self, path, batch_size_dynamic=batch_size_dynamic, opset=opset,
                           input_format=input_format)

    def save(self, path: str | os.PathLike, include_backbone: bool | None = None) -> None:
        """Write the model to `path` (torch.save of tensors and plain types only).

        The file is written beside `path` under a temporary name and then renamed over it, so a
        failed save (a full disk, an interrupt) leaves no half-written model: `path` holds either
        its old content or the whole new model.

        Kept: the config, the head's weights, the thresholds, and the backbone's identity (name
        and weights id). The backbone's weights are stored too when they cannot be rebuilt from a
        published file (random init, a local file); `include_backbone=True` stores published
        ImageNet weights too (for machines that cannot download them), False refuses to store
        weights that `load` could not get back otherwise.
        A custom `nn.Module` backbone cannot be rebuilt from a file, so saving refuses it.
        """
        name, weights_id = self.backbone.name, self.backbone.weights_id
        if name is None:
            raise ValueError("cannot save a SimpleNet whose backbone is a custom nn.Module: a saved "
                             "model must be rebuildable from the file alone; save "
                             "model.head.state_dict() and rebuild the backbone yourself")
        published = weights_id in _PUBLISHED_WEIGHTS
        store = include_backbone if include_backbone is not None else not published
        if not store and not published:
            raise ValueError(f"backbone weights {weights_id!r} are not a published file, so the "
                             "model could not be rebuilt without them: use include_backbone=True "
                             "(the default)")
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": _stored_config(self.config),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "backbone": ({k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
                         if store else None),
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "threshold_info": None if self.threshold_info is None else dict(self.threshold_info),
        }
        with atomic_open(path, "wb") as f:
            torch.save(payload, f)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: torch.device | str = "cpu") -> "SimpleNet":
        """Read a model written by `save`. Never executes code from the file: it is read with
        `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.

        Reads format versions 1 (before rectangular inputs: a square image_size, crop mode; the
        epochs setting becomes the backbone's default) and 2. Raises FileNotFoundError for a
        missing file and ValueError (naming the file) for anything that is not a readable model
        of these formats, or whose tensors do not fit its config.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path!r} does not exist")
        where = f"model file {path!r}"
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{where} was refused: it holds objects other than tensors and plain "
                             "types, which could run code when unpickled (simplenet_fast loads only "
                             f"with weights_only=True). Details: {_first_line(error)}") from error
        except Exception as error:  # truncated zip, text, anything torch cannot parse
            raise ValueError(f"{where} cannot be read as a simplenet_fast model (truncated, corrupt "
                             f"or another kind of file): {_first_line(error)}") from error
        config, head_state, backbone_state = _check_payload(obj, where)
        _check_head_shapes(config, head_state, where)  # before the constructor allocates them
        try:
            model = cls(backbone=config["backbone"],
                        weights=None if backbone_state is not None else config["weights_id"],
                        **{k: config[k] for k in _CONFIG_ARGS})
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where} has an unusable config: {error}") from error
        try:
            model.head.load_state_dict(head_state, strict=True)
            if backbone_state is not None:
                model.backbone.load_state_dict(backbone_state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{where} holds tensors that do not fit its config "
                             f"({config['backbone']}, embed dims {config['pretrain_embed_dim']}/"
                             f"{config['target_embed_dim']}, hidden {config['hidden']}): "
                             f"{error}") from error
        for part, state in (("head", head_state), ("backbone", backbone_state or {})):
            bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise ValueError(f"{where} holds NaN or Inf in its {part} weights ({bad[:4]}); "
                                 "such a model would score NaN")
        model.backbone.weights_id = config["weights_id"]
        model.image_threshold = obj["image_threshold"]
        model.pixel_threshold = obj["pixel_threshold"]
        model.threshold_info = obj.get("threshold_info")
        model.head.eval()
        return model.to(map_location)


# ---------------------------------------------------------------------------------- helpers
_CONFIG_ARGS = ("image_size", "resize_mode", "resize", "tiling", "pretrain_embed_dim",
                "target_embed_dim", "hidden", "noise_std", "epochs", "margin", "recipe", "sigma",
                "precision")
_CONFIG_TYPES = {"backbone": str, "weights_id": str, "resize_mode": str,
                 "pretrain_embed_dim": int, "target_embed_dim": int, "hidden": int,
                 "noise_std": (int, float), "epochs": int, "margin": (int, float),
                 "sigma": (int, float), "precision": str, "recipe": str}
# Entries a file written by an older release may lack, and what that release did.
_CONFIG_SINCE = {"recipe": "paper"}  # before recipes, fit followed SPEC 2
_V1_CONFIG_TYPES = {"image_size": int, "resize": int}


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _stored_config(config: dict) -> dict:
    """`model.config` with tuples as lists, as the file stores them."""
    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value
    return {k: plain(v) for k, v in config.items()}


def _upgrade_v1(config: dict, where: str) -> dict:
    """A version-1 config (square int image_size, int resize, crop mode) in version 2's terms."""
    for key, kind in _V1_CONFIG_TYPES.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(f"{where}: config entry {key!r} is missing or not "
                             f"{kind.__name__}: {config.get(key)!r}")
    upgraded = {**config, "image_size": [config["image_size"]] * 2, "resize_mode": "crop",
                "tiling": None}
    if "epochs" not in upgraded and upgraded.get("backbone") in ("wide_resnet50_2",
                                                                 "efficientnet_lite0"):
        upgraded["epochs"] = default_config(upgraded["backbone"]).epochs
    return upgraded


def _check_geometry_entries(config: dict, where: str) -> None:
    """Types of the version-2 geometry entries (values are checked by InputGeometry)."""
    def ints(value, length):
        return isinstance(value, (list, tuple)) and len(value) == length and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)

    size, resize, tiling = config.get("image_size"), config.get("resize", "missing"), \
        config.get("tiling", "missing")
    if not ints(size, 2):
        raise ValueError(f"{where}: config entry 'image_size' is missing or not [height, width] "
                         f"ints: {size!r}")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int)):
        raise ValueError(f"{where}: config entry 'resize' is missing or not an int or None: "
                         f"{resize!r}")
    if tiling is not None and not (isinstance(tiling, (list, tuple)) and len(tiling) == 2
                                   and all(ints(t, 2) for t in tiling)):
        raise ValueError(f"{where}: config entry 'tiling' is missing or not None or "
                         f"[[tile_h, tile_w], [stride_h, stride_w]]: {tiling!r}")


def _first_line(error: BaseException) -> str:
    """The informative line of a load error (torch's weights_only message leads with advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error" in line:
            return line.split(". Please use")[0]
    return lines[0] if lines else type(error).__name__


def _check_payload(obj: Any, where: str) -> tuple[dict, dict, dict | None]:
    if not isinstance(obj, dict) or "format" not in obj:
        kind = "a plain state dict" if isinstance(obj, dict) and all(
            isinstance(v, Tensor) for v in obj.values()) else type(obj).__name__
        raise ValueError(f"{where} is not a simplenet_fast model (no 'format' entry; got {kind}); "
                         "models are written by SimpleNet.save")
    if obj["format"] != FORMAT:
        raise ValueError(f"{where} has format {obj['format']!r}, expected {FORMAT!r}")
    version = obj.get("format_version")
    if version is None:
        raise ValueError(f"{where} has no format_version entry")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ValueError(f"{where} has format_version {version!r}; this simplenet_fast reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))} (a file from a "
                         "newer release?)")
    missing = [k for k in ("config", "head", "backbone", "image_threshold", "pixel_threshold")
               if k not in obj]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    config = obj["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config must be a dict, got {type(config).__name__}")
    if version == 1:
        config = _upgrade_v1(config, where)
    config = {**_CONFIG_SINCE, **config}
    _check_geometry_entries(config, where)
    for key, kind in _CONFIG_TYPES.items():
        if key not in config or isinstance(config[key], bool) or not isinstance(config[key], kind):
            raise ValueError(f"{where}: config entry {key!r} is missing or not "
                             f"{getattr(kind, '__name__', 'a number')}: {config.get(key)!r}")
    for key in ("head", "backbone"):
        state = obj[key]
        if state is None and key == "backbone":
            continue
        if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
            raise ValueError(f"{where}: {key!r} must be a state dict of tensors")
    if obj["backbone"] is None and config["weights_id"] not in _PUBLISHED_WEIGHTS:
        raise ValueError(f"{where} stores no backbone weights and its weights id "
                         f"{config['weights_id']!r} is not a published file to rebuild them from")
    for key in ("image_threshold", "pixel_threshold"):
        value = obj[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: {key} must be a number or None, got {value!r}")
    info = obj.get("threshold_info")
    if info is not None and (not isinstance(info, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float)))
            for k, v in info.items())):
        raise ValueError(f"{where}: threshold_info must be None or a flat dict of plain values")
    return config, obj["head"], obj["backbone"]


def _check_head_shapes(config: dict, head: dict, where: str) -> None:
    """The adaptor and first discriminator layer must have the shapes the config declares, checked
    before the model is built: a file declaring hidden=10**9 beside small tensors would otherwise
    make the constructor allocate gigabytes before load_state_dict refuses them."""
    t, h = config["target_embed_dim"], config["hidden"]
    for key, shape in (("adaptor.weight", (t, t)), ("discriminator.linear.weight", (h, t))):
        got = head.get(key)
        if got is None or tuple(got.shape) != shape:
            raise ValueError(f"{where} holds tensors that do not fit its config: {key} should be "
                             f"{list(shape)} (target_embed_dim {t}, hidden {h}), got "
                             f"{None if got is None else list(got.shape)}")


def _seeded_reset(head: SimpleNetHead, seed: int, device: torch.device) -> None:
    """The official init (SPEC 2) from `seed`, without touching the global generators."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        head.reset_parameters()


class _TrainingImages:
    """The training set as an indexable list of model inputs (an iterable is consumed once).

    Paths stay paths and are decoded when their batch is needed; every other source becomes its
    uint8 input(s) at once. With tiling every window is one item, and the last decoded path is
    kept while its windows are cut. `placements[i]` says where item i's pixels landed (None: a
    path that fills its whole input), for the padding masks.
    """

    def __init__(self, images: Any, geometry: InputGeometry):
        self.geometry = geometry
        self.items: list[tuple[str, Any, Optional[tuple[int, int]]]] = []  # what, input, origin
        self.placements: list[Optional[Placement]] = []
        self._decoded: tuple[Optional[Path], Any] = (None, None)
        tiling = geometry.tiling
        for what, source in iter_sources(images):
            if not isinstance(source, (str, os.PathLike)):
                prepared = prepare_image(source, geometry, what)
                if tiling is None:
                    self._add(what, prepared.input, None, prepared.placement)
                for _, _, window, placement in (prepared.windows() if tiling else ()):
                    self._add(what, window, None, placement)
                continue
            path = Path(source)
            if tiling is None:
                # Only padding needs the image's size before it is decoded.
                placement = (geometry.place(*image_header_size(path))
                             if geometry.resize_mode == "pad" else None)
                self._add(what, path, None, placement)
                continue
            rows, cols = tiling.windows(*image_header_size(path))
            placement = geometry.place_window(rows[0][1], cols[0][1])
            for top, _ in rows:
                for left, _ in cols:
                    self._add(what, path, (top, left), placement)

    def _add(self, what: str, item: Any, origin: Optional[tuple[int, int]],
             placement: Optional[Placement]) -> None:
        self.items.append((what, item, origin))
        self.placements.append(placement)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def padded(self) -> bool:
        return any(p is not None and p.padded for p in self.placements)

    def batch(self, index: list[int]) -> tuple[Tensor, Optional[Tensor]]:
        """(uint8 inputs [b, H, W, 3], their real sizes [b, 2], or None without padding)."""
        inputs = []
        for i in index:
            what, item, origin = self.items[i]
            if isinstance(item, Path):
                item = self._load(what, item, origin, self.placements[i])
            inputs.append(item)
        placements = [self.placements[i] for i in index]
        return torch.stack(inputs), _real_sizes(placements, self.geometry.image_size)

    def _load(self, what: str, path: Path, origin: Optional[tuple[int, int]],
              placement: Optional[Placement]) -> Tensor:
        if origin is None:
            return prepare_image(path, self.geometry, what).input
        if self._decoded[0] != path:
            self._decoded = (path, decode(path, what))
        window = decoded_window(self._decoded[1], *origin, *placement.original)
        return model_input(window, placement, what)

    def real_patches(self, grid: Sequence[int]) -> Tensor:
        """[n, grid_h, grid_w] bool: the patches of each item that hold image pixels."""
        height, width = grid
        masks = torch.ones(len(self), height, width, dtype=torch.bool)
        for i, placement in enumerate(self.placements):
            if placement is not None and placement.padded:
                rows, cols = placement.real_grid(grid)
                masks[i, rows:] = False
                masks[i, :, cols:] = False
        return masks


class _BatchRunner:
    """Lists of uint8 inputs through the model's device path, eagerly or through CUDA graphs.

    On CUDA the finiteness check of the scores waits for `finish` (one host sync per call, not
    one per batch); a captured graph cannot check at all.
    """

    def __init__(self, model: SimpleNet, batch_size: int, fused: Optional[bool], cuda_graph: bool,
                 compile: bool = False, precision: Optional[str] = None):
        self.model, self.batch_size, self.fused = model, batch_size, fused
        self.precision = precision  # resolved ("float32" / "bfloat16"), or None: the model's
        self.device = model.device
        self.on_cuda = self.device.type == "cuda"
        self.graph = cuda_graph and self.on_cuda
        self.forward = model._compiled_forward() if compile else model._device_forward
        self.unchecked: list[Tensor] = []

    def __call__(self, inputs: list[Tensor], placements: Sequence[Optional[Placement]]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        batch = _stage_inputs(inputs, pinned=self.on_cuda)
        real = _real_sizes(placements, self.model.image_size)
        if self.on_cuda and real is not None:
            real = real.pin_memory()
        if self.graph:
            # straight from pinned host memory into the graph's static input
            out = self.model._graph_forward(batch, self.batch_size, self.fused, real,
                                            self.precision)
        else:
            out = self.forward(
                batch.to(self.device, non_blocking=True), self.fused, check=not self.on_cuda,
                real=None if real is None else real.to(self.device, non_blocking=True),
                precision=self.precision)
        if self.on_cuda:
            self.unchecked.append(out[0])
        return out

    def finish(self) -> None:
        for scores in self.unchecked:
            check_scores(scores)  # SPEC 6: NaN never passes, graphs included
        self.unchecked.clear()


class _Stitcher:
    """One tiled image's map and score, accumulated window by window (`geometry.Tiling`): the
    map is the per-pixel mean over the windows that score the pixel, the score the max."""

    def __init__(self, prepared: PreparedImage, device: torch.device):
        self.size = prepared.size
        self.rows, self.cols = prepared.geometry.tiling.windows(*prepared.size)
        self.remaining = len(self.rows) * len(self.cols)
        self.total = torch.zeros(self.size, device=device)
        self.counts: Optional[tuple[Tensor, Tensor]] = None
        self.score: Optional[Tensor] = None

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def add(self, top: int, left: int, placement: Placement, score: Tensor, model_map: Tensor
            ) -> None:
        window_map, scored_rows, scored_cols = placement.to_image(model_map)
        if self.counts is None:  # every window of an image has the same placement
            self.counts = (_coverage(self.size[0], self.rows, scored_rows),
                           _coverage(self.size[1], self.cols, scored_cols))
        height, width = placement.original
        self.total[top:top + height, left:left + width] += window_map
        self.score = score if self.score is None else torch.maximum(self.score, score)
        self.remaining -= 1

    def result(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(image score, map [h, w], scored mask or None)."""
        rows, cols = self.counts
        # In place and per axis: the windows form a grid, so the count is rows x cols.
        self.total.div_(rows.clamp(min=1)[:, None]).div_(cols.clamp(min=1)[None, :])
        amap, scored = fill_unscored(self.total, rows > 0, cols > 0)
        return self.score, amap, scored


def _stage_inputs(inputs: list[Tensor], pinned: bool) -> Tensor:
    """The uint8 batch `[B, H, W, 3]` of model inputs, stacked straight into page-locked memory
    when `pinned` (one copy, not stack then pin: the host-to-device copy can then run
    asynchronously)."""
    if not pinned:
        return torch.stack(inputs)
    batch = torch.empty((len(inputs), *inputs[0].shape), dtype=torch.uint8, pin_memory=True)
    return torch.stack(inputs, out=batch)


def _coverage(length: int, windows: list[tuple[int, int]], scored: Tensor) -> Tensor:
    """How many windows score each pixel along one axis."""
    count = torch.zeros(length, device=scored.device)
    for start, pixels in windows:
        count[start:start + pixels] += scored.to(count.dtype)
    return count


def _real_sizes(placements: Sequence[Optional[Placement]], image_size: tuple[int, int]
                ) -> Optional[Tensor]:
    """int64 [B, 2] real sizes of the inputs, or None when none of them holds padding."""
    if not any(p is not None and p.padded for p in placements):
        return None
    return torch.tensor([p.real if p is not None else image_size for p in placements],
                        dtype=torch.int64)


def _model_scored(placements: Sequence[Placement], image_size: tuple[int, int],
                  device: torch.device) -> Optional[Tensor]:
    """[B, H, W] scored pixels of model-size maps (the real part), None when all are scored."""
    real = _real_sizes(placements, image_size)
    return None if real is None else real_pixel_mask(real.to(device), image_size)


def _check_real_size(real_size: Any, batch: int, image_size: tuple[int, int]) -> Tensor:
    real = torch.as_tensor(real_size)
    if real.shape != (batch, 2) or real.is_floating_point() or real.dtype == torch.bool:
        raise ValueError(f"real_size must be [{batch}, 2] ints (rows, cols of image pixels per "
                         f"input), got {list(real.shape)} {real.dtype}")
    real = real.to(torch.int64)
    limits = torch.tensor(image_size)
    if bool(((real < 1) | (real > limits)).any()):
        raise ValueError(f"real_size entries must lie in 1..{list(image_size)}, got "
                         f"{real.tolist()}")
    return real


def _gather_maps(pairs: list[tuple[Tensor, Optional[Tensor]]]) -> tuple[Maps, Optional[Maps]]:
    """Per-image (map, scored) -> (maps, scored masks): stacked when all maps have one size,
    else lists; scored is None when every pixel of every map was scored. Called outside
    inference mode, so that users get ordinary tensors they may modify in place."""
    maps = [m for m, _ in pairs]
    scored = None
    if any(s is not None for _, s in pairs):
        scored = [s if s is not None else torch.ones_like(m, dtype=torch.bool) for m, s in pairs]
    if len({tuple(m.shape) for m in maps}) == 1:
        return torch.stack(maps), None if scored is None else torch.stack(scored)
    return _ordinary(maps), None if scored is None else _ordinary(scored)


def _ordinary(tensors: list[Tensor]) -> list[Tensor]:
    """Inference-mode tensors copied into ordinary ones (the others as they are)."""
    return [t.clone() if t.is_inference() else t for t in tensors]


def _over_threshold(maps: Maps, scored: Optional[Maps], threshold: float) -> Maps:
    """`maps > threshold` on scored pixels, False elsewhere; same structure as `maps`."""
    if isinstance(maps, Tensor):
        over = maps > threshold
        return over if scored is None else over & scored
    scored = scored if scored is not None else [None] * len(maps)
    return [m > threshold if s is None else (m > threshold) & s for m, s in zip(maps, scored)]


@contextlib.contextmanager
def _progress(progress: bool | Callable[[int], Any] | None, images: Any):
    """`score`'s progress argument as a function called with each batch's image count."""
    if progress is True:
        from tqdm.auto import tqdm
        with tqdm(total=count_images(images), desc="scoring", unit="img") as bar:
            yield bar.update
    elif callable(progress):
        yield progress
    elif progress is None or progress is False:
        yield lambda done: None
    else:
        raise ValueError("progress must be True, False, None or a callable taking the number of "
                         f"images scored, got {progress!r}")


# ---------------------------------------------------------------------------------- module level
MODEL_ENV = "SIMPLENET_FAST_MODEL"
NO_MODEL_MESSAGE = (
    "simplenet_fast.score(images) has no model to use: call simplenet_fast.use(model_or_path) "
    f"once, or set the environment variable {MODEL_ENV} to the path of a saved model "
    "(`simplenet-fast train` makes one); or pass model=...")

_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()
_LOADED_MAX = 4
_DEFAULT: "SimpleNet | tuple[str, str | None] | None" = None  # what use() set: a model or (path, device)
_DEFAULT_LOCK = threading.Lock()


def use(model: "SimpleNet | str | os.PathLike | None", device: torch.device | str | None = None
        ) -> "SimpleNet | None":
    """Set the model that `score(images)` uses when called without `model=`; returns it.

    `model` is a `SimpleNet` or the path of a saved one (loaded now, so that a bad file fails
    here, through the same cache as `score`; a file rewritten later is loaded again when next
    used). `device` applies to a path, as in `score`. `use(None)` clears the setting, and `score`
    falls back to the `SIMPLENET_FAST_MODEL` environment variable again. Thread-safe; the setting
    is shared by all threads of the process.
    """
    global _DEFAULT
    if model is None or isinstance(model, SimpleNet):
        if device is not None:
            raise ValueError("device applies to a model path; move the SimpleNet with .to() instead")
        default, loaded = model, model
    else:
        _check_model_path(model)
        default = (os.path.realpath(model), None if device is None else str(torch.device(device)))
        loaded = _load_cached(os.fspath(model), device)
    with _DEFAULT_LOCK:
        _DEFAULT = default
    return loaded


def score(images: Any, model: "SimpleNet | str | os.PathLike | None" = None,
          device: torch.device | str | None = None, **kwargs) -> AnomalyResult:
    """Score images with a `SimpleNet` or the path of a saved one.

    Without `model`, the default model: the one set by `simplenet_fast.use(model_or_path)`, else
    the path in the `SIMPLENET_FAST_MODEL` environment variable (read at every call); with
    neither, a ValueError says how to set one. Loaded models are cached by (real path,
    modification time, size, device), so calling this in a loop loads the file once; a rewritten
    file is loaded again. `device` applies to paths only (default: the CPU, or the device given
    to `use`). Other keyword arguments (`batch_size`, `fused`, `cuda_graph`, `precision`,
    `workers`) go to `SimpleNet.score`. Thread-safe.
    """
    if model is None:
        model, default_device = _default_model()
        device = default_device if device is None else device
    if isinstance(model, SimpleNet):
        if device is not None:
            raise ValueError("device applies to a model path; move the SimpleNet with .to() instead")
        return model.score(images, **kwargs)
    _check_model_path(model)
    return _load_cached(os.fspath(model), device).score(images, **kwargs)


def _default_model() -> "tuple[SimpleNet | str, str | None]":
    """(model or path, device) that `score` uses without `model=`; see `score`."""
    with _DEFAULT_LOCK:
        default = _DEFAULT
    if isinstance(default, SimpleNet):
        return default, None
    if default is not None:
        return default
    path = os.environ.get(MODEL_ENV, "")
    if not path:
        raise ValueError(NO_MODEL_MESSAGE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the environment variable {MODEL_ENV} names the model file "
                                f"{path!r}, which does not exist")
    return path, None


def _check_model_path(model: Any) -> None:
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a SimpleNet or the path of a saved one, got "
                        f"{type(model).__name__}")
    if not os.path.isfile(model):
        raise FileNotFoundError(f"model file {os.fspath(model)!r} does not exist")


def _load_cached(path: str, device: torch.device | str | None) -> SimpleNet:
    """`SimpleNet.load(path, device)` through the cache of loaded models (see `score`)."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size, str(torch.device(device or "cpu")))
    with _LOADED_LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            loaded = SimpleNet.load(path, map_location=device or "cpu")
            for old in [k for k in _LOADED if k[0] == path]:
                del _LOADED[old]
            while len(_LOADED) >= _LOADED_MAX:
                del _LOADED[next(iter(_LOADED))]
            _LOADED[key] = loaded
    return loaded


__all__ = ["SimpleNet", "AnomalyResult", "score", "use"]
