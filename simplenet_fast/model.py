"""SimpleNet: backbone + head + pre/post-processing, with `fit`, `score`, `save` and `load`.

The model follows anomalib's split: `SimpleNet` is a plain `nn.Module` whose inference path returns
a typed result (`AnomalyResult`, anomalib's field names); training lives in `fit` and touches only
the head (SPEC.md section 2). Inference follows SPEC section 1 and is one pure-tensor device
function, `_device_forward`, shared by the eager path and the CUDA-graph path.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._precision import check_precision, resolve_precision
from .backbones import build_backbone
from .head import SimpleNetHead, check_scores
from .postprocess import anomaly_map as _anomaly_map, check_sigma
from .preprocess import iter_batches, iter_sources, normalise, preprocess_image

FORMAT = "simplenet_fast"
FORMAT_VERSION = 1

# SPEC 2: the official optimisers and constant learning rates.
ADAPTOR_LR, ADAPTOR_WEIGHT_DECAY = 1e-4, 0.01        # AdamW
DISCRIMINATOR_LR, DISCRIMINATOR_WEIGHT_DECAY = 2e-4, 1e-5  # Adam

DEFAULT_FEATURE_CACHE_BYTES = 2 * 1024**3
_PUBLISHED_WEIGHTS = ("imagenet",)  # weights a registry backbone rebuilds by name: not stored
_MAX_GRAPHS = 4  # captured CUDA graphs kept per model (each holds its own memory pool)
_BFLOAT16_BACKBONE_LOCK = threading.Lock()  # SimpleNet._bfloat16_backbone: one copy per model
# Bounds on what a model (and so a model file) may declare: sizes that drive allocations no
# tensor in the file accounts for. MAX_SIDE: image_size and resize (the paper uses 288 / 329);
# MAX_PRETRAIN_EMBED_DIM: the fold's pooling matrices are [P, C*9] float64 (1.2 GB at 16384 with
# WideResNet's 1024 layer3 channels; the paper uses 1536).
MAX_SIDE = 8192
MAX_PRETRAIN_EMBED_DIM = 16384


@dataclass
class AnomalyResult:
    """What `SimpleNet.score` returns; field names are anomalib's.

    pred_score:   [B] float, image score = max of the raw patch scores (SPEC 1.9).
    anomaly_map:  [B, image_size, image_size] float, SPEC 1.10, aligned with the centre crop the
                  model sees (not with the original image: see `SimpleNet.score`).
    patch_scores: [B, h, w] float, raw patch scores on the stride-8 grid (36x36 at 288).
    pred_label:   [B] bool, `pred_score > model.image_threshold`, or None without that threshold.
    pred_mask:    [B, image_size, image_size] bool, `anomaly_map > model.pixel_threshold`, or None.
    threshold_source: where the thresholds came from (`simplenet_fast.thresholds`): "none",
                  "user-set", or the calibration rule.
    All tensors live on the model's device.
    """

    pred_score: Tensor
    anomaly_map: Tensor
    patch_scores: Tensor
    pred_label: Optional[Tensor] = None
    pred_mask: Optional[Tensor] = None
    threshold_source: str = "none"

    def __len__(self) -> int:
        return int(self.pred_score.shape[0])


class SimpleNet(nn.Module):
    """SimpleNet (Liu et al., CVPR 2023): a frozen backbone and a trained adaptor + discriminator.

    Args:
        backbone: "wide_resnet50_2" (the paper's), "efficientnet_lite0", or an `nn.Module` (see
            `simplenet_fast.backbones.build_backbone`).
        weights: "imagenet" (WideResNet: torchvision's published file, downloaded once into the
            torch hub cache), the path of a local state-dict file, or None (random init).
        image_size: side of the centre crop the model sees (288 in the paper).
        resize: the short side is resized to this before cropping (329 in the paper).
        pretrain_embed_dim, target_embed_dim, hidden: head sizes (SPEC 1.5, 1.6, 1.8).
        noise_std, margin: training noise and loss margin (SPEC 2).
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
        image_threshold, pixel_threshold: None, or the floats `score` compares against to fill
            `pred_label` / `pred_mask`.
        threshold_info: None, or the record (a flat dict of plain types) of how the thresholds
            were calibrated, written by `simplenet_fast.thresholds`; saved with the model.
    """

    def __init__(
        self,
        backbone: Any = "wide_resnet50_2",
        weights: Any = "imagenet",
        image_size: int = 288,
        resize: int = 329,
        pretrain_embed_dim: int = 1536,
        target_embed_dim: int = 1536,
        hidden: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        sigma: float = 4.0,
        precision: str = "float32",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (("image_size", image_size), ("resize", resize)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
                raise ValueError(f"{name} must be an int in 1..{MAX_SIDE}, got {value!r}")
        if isinstance(pretrain_embed_dim, int) and pretrain_embed_dim > MAX_PRETRAIN_EMBED_DIM:
            raise ValueError(f"pretrain_embed_dim must be <= {MAX_PRETRAIN_EMBED_DIM} (the fused "
                             f"head's pooling plans grow with it), got {pretrain_embed_dim!r}")
        if resize < image_size:
            raise ValueError(f"resize ({resize}, the short side before cropping) must be >= "
                             f"image_size ({image_size}, the crop)")
        for name, value in (("noise_std", noise_std), ("margin", margin)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        check_sigma(sigma, (image_size, image_size))  # the rule anomaly_map applies to the map
        check_precision(precision)
        self.backbone = build_backbone(backbone, weights=weights)
        self.head = SimpleNetHead(self.backbone.channels, pretrain_embed_dim, target_embed_dim, hidden)
        self.image_size = int(image_size)
        self.resize = int(resize)
        self.noise_std = float(noise_std)
        self.margin = float(margin)
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
        self._channels_last = False
        self._bfloat16_backbone_cache: tuple | None = None  # (weights state, module), CPU bf16
        self.eval()
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self._mean.device

    def config(self) -> dict:
        """Constructor arguments (besides backbone weights and device) as plain types."""
        return {
            "backbone": self.backbone.name,
            "weights_id": self.backbone.weights_id,
            "image_size": self.image_size,
            "resize": self.resize,
            "pretrain_embed_dim": self.head.pretrain_embed_dim,
            "target_embed_dim": self.head.target_embed_dim,
            "hidden": self.head.hidden,
            "noise_std": self.noise_std,
            "margin": self.margin,
            "sigma": self.sigma,
            "precision": self.precision,
        }

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .float() move or replace tensors a captured graph points at, and the
        # backbone the bf16 copy was made from.
        self._graphs.clear()
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
                        precision: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 `[B, S, S, 3]` on the model's device -> (patch_scores, pred_score, anomaly_map).

        Pure tensor work on the device: no host synchronisation unless `check` (the NaN / Inf
        check of the scores) is True, so that it can be captured in a CUDA graph with
        `check=False`. `fused=None` takes the compiled head when it has a kernel for
        the features' device and dtype. `precision`: "float32" or "bfloat16" as resolved by
        `_compute_precision` (None: the model's setting).
        """
        bf16 = (precision or self.compute_precision) == "bfloat16"
        on_cuda = batch.device.type == "cuda"
        x = normalise(batch, self._mean, self._std)
        if bf16 and on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                features = self.backbone(x)
        elif bf16:
            features = self._bfloat16_backbone()(x.to(torch.bfloat16, memory_format=torch.channels_last))
        else:
            features = self.backbone(x.contiguous())
        compute = torch.bfloat16 if bf16 and on_cuda else torch.float32
        scores = self.head.patch_scores(features, fused=fused, compute_dtype=compute,
                                        check_finite=check).float()
        pred_score = scores.amax(dim=(1, 2))
        amap = _anomaly_map(scores, (self.image_size, self.image_size), self.sigma)
        return scores, pred_score, amap

    def forward(self, batch: Tensor) -> AnomalyResult:
        """Score one preprocessed batch: uint8 `[B, S, S, 3]` crops (see `preprocess`)."""
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[-1] != 3 \
                or tuple(batch.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(f"forward takes uint8 crops [B, {self.image_size}, {self.image_size}, 3] "
                             f"(use score() for images), got {list(batch.shape)} {batch.dtype}")
        with torch.inference_mode():
            out = self._device_forward(batch.to(self.device))
        return self._result(*(t.clone() for t in out))

    def _result(self, patch_scores: Tensor, pred_score: Tensor, amap: Tensor) -> AnomalyResult:
        from .thresholds import threshold_source

        label = None if self.image_threshold is None else pred_score > self.image_threshold
        mask = None if self.pixel_threshold is None else amap > self.pixel_threshold
        return AnomalyResult(pred_score=pred_score, anomaly_map=amap, patch_scores=patch_scores,
                             pred_label=label, pred_mask=mask,
                             threshold_source=threshold_source(self))

    def score(self, images: Any, batch_size: int = 32, fused: bool | None = None,
              cuda_graph: bool = False, precision: str | None = None) -> AnomalyResult:
        """Score images (see `simplenet_fast.preprocess` for every accepted kind).

        Images are decoded and cropped lazily, `batch_size` at a time, so a list of 10,000 paths
        never sits in memory at once; each uint8 batch is copied to the device once (pinned,
        non-blocking on CUDA) and normalised there.

        The anomaly map is at the model's input size, `image_size x image_size`, aligned with the
        centre crop the model sees: pixel (i, j) of the map is pixel (top + i, left + j) of the
        image after its short side was resized to `resize` (see `preprocess.resized_size` and
        `preprocess.crop_offset`); the border the crop cuts off is not scored.

        fused: None picks the compiled head when available, False the pure-PyTorch reference,
            True insists on the compiled head.
        cuda_graph: on CUDA, capture the device path (normalise, backbone, head, map) once per
            batch size in a `torch.cuda.CUDAGraph` and replay it; a last, smaller batch is padded
            to the captured size. Graphs are dropped when the model moves or its weights change.
            Ignored on the CPU.
        precision: this call's precision, "float32", "bfloat16" or "auto"; None (default) uses
            `model.precision`. A model trained in float32 scores in bf16 as it is.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = self.device
        on_cuda = device.type == "cuda"
        precision = self._compute_precision(precision)
        self.head.eval()
        if precision == "bfloat16" and on_cuda and not self._channels_last:
            self._graphs.clear()  # the conversion replaces the backbone's weight tensors
            self.backbone.to(memory_format=torch.channels_last)
            self._channels_last = True
        outputs: list[tuple[Tensor, Tensor, Tensor]] = []
        with torch.inference_mode():
            for batch in iter_batches(images, batch_size, self.image_size, self.resize):
                if on_cuda:
                    batch = batch.pin_memory()
                if cuda_graph and on_cuda:
                    # straight from pinned host memory into the graph's static input
                    out = self._graph_forward(batch, batch_size, fused, precision)
                else:
                    # On CUDA the finiteness check waits for the end (one host sync per call,
                    # not one per batch); a captured graph cannot check at all.
                    out = self._device_forward(batch.to(device, non_blocking=True), fused,
                                               check=not on_cuda, precision=precision)
                outputs.append(out)
        # Concatenated outside inference mode: the result holds ordinary tensors that users can
        # modify in place.
        patch_scores, pred_score, amap = (torch.cat([o[i] for o in outputs]) for i in range(3))
        if on_cuda:
            check_scores(patch_scores)  # SPEC 6: NaN never passes, graphs included
        return self._result(patch_scores, pred_score, amap)

    def _graph_forward(self, batch: Tensor, batch_size: int, fused: bool | None,
                       precision: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`_device_forward` through a CUDA graph captured for a fixed batch shape and precision.

        `batch`: at most `batch_size` uint8 crops, pinned on the host or on the device. Graphs are
        captured for `batch_size`; a smaller batch is zero-padded into that graph, except when no
        graph of that size exists yet (an input shorter than one batch), which gets its own.
        """
        n = batch.shape[0]
        precision = precision or self.compute_precision
        size = (batch_size if n == batch_size
                or self._graph_key(batch_size, fused, precision) in self._graphs else n)
        key = self._graph_key(size, fused, precision)
        weights = self.head.weights_state()
        entry = self._graphs.get(key)
        if entry is None or entry[0] != weights:
            # New, or its weights changed (a captured graph would replay stale folded weights).
            self._graphs.pop(key, None)
            while len(self._graphs) >= _MAX_GRAPHS:
                del self._graphs[next(iter(self._graphs))]
            entry = (weights, *self._capture(size, fused, precision))
            self._graphs[key] = entry
        _, graph, static_in, static_out = entry
        static_in[:n].copy_(batch, non_blocking=True)
        if n < size:
            static_in[n:].zero_()
        graph.replay()
        # Clones are queued on the same stream after the replay: no host synchronisation.
        return tuple(t[:n].clone() for t in static_out)

    def _graph_key(self, size: int, fused: bool | None, precision: str) -> tuple:
        return (size, fused, precision, str(self.device))

    def _capture(self, batch_size: int, fused: bool | None, precision: str):
        # The first graph checks the features once, eagerly, outside the capture.
        size = self.image_size
        static_in = torch.zeros(batch_size, size, size, 3, dtype=torch.uint8, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up on a side stream (PyTorch's recipe): lazy inits, cached folds, kernels.
            self._device_forward(static_in, fused, check=True, precision=precision)
            self._device_forward(static_in, fused, check=False, precision=precision)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._device_forward(static_in, fused, check=False, precision=precision)
        return graph, static_in, static_out

    # ------------------------------------------------------------------------------ training
    def fit(self, images: Any, epochs: int = 160, batch_size: int = 8, seed: int | None = None,
            progress: bool = True, feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES
            ) -> list[float]:
        """Train the adaptor and discriminator on normal images (SPEC.md section 2).

        images: a folder, a list of images or paths (any kind `score` takes), or an iterable such
            as a `torch.utils.data.DataLoader`. A DataLoader must yield image batches: uint8
            (0..255) or float ([0, 1]) tensors `[B, 3, H, W]` (or `[B, 1, H, W]`), or lists of
            paths / images; not `(images, labels)` pairs. It is iterated once: its images are
            cropped to uint8 and kept (249 KB per image at 288), and `fit` does its own seeded
            shuffling and batching of them, so the loader's batch size does not matter (its order
            does, as a list's does: the seeded shuffle permutes that order). Paths in a list or
            folder are decoded when needed and not kept.
        epochs: passes over the images (the official schedule is 160 = 40 x 4).
        batch_size: images per step (8 in the paper); every patch of these images is a sample.
        seed: makes the run reproducible: the head's init, the shuffling and the noise all come
            from it, and on the CPU two fits with the same seed give bit-identical weights and
            losses. On CUDA the noise comes from the CUDA generator (other numbers than on the
            CPU) and cuDNN/cuBLAS may round differently from run to run. None draws a seed from
            torch's global generator.
        progress: show a tqdm bar with the epoch and its mean loss.
        feature_cache_bytes: the frozen backbone and the fixed part of the head (unfold, pooling:
            `head.embed`) do not change during training, so they run ONCE per image and their
            output, `[H2, W2, target_embed_dim]` float32 per image, is kept on the model's device
            and reused every epoch: H2*W2*T*4 bytes, 36*36*1536*4 = 8.0 MB per image at the paper
            configuration (2 GiB, the default, holds 269 such images). When the images do not fit,
            embeddings are recomputed for every batch of every epoch instead (same results, up to
            the backbone's rounding across batch compositions). 0 disables the cache.

        Training starts from the official init (`head.reset_parameters()`), so a second `fit`
        starts over; thresholds are cleared (they belonged to the old weights). Optimisers:
        adaptor AdamW(lr 1e-4, weight decay 0.01), discriminator Adam(lr 2e-4, weight decay
        1e-5), constant rates. No checkpoint is selected on test data: the weights after the
        last epoch are kept. The head is in eval mode afterwards.

        Returns the mean training loss of each epoch.
        """
        from tqdm.auto import tqdm

        for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                                 ("feature_cache_bytes", feature_cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
        device = self.device
        data = _TrainingImages(images, self.image_size, self.resize)
        n = len(data)

        self._graphs.clear()
        self.image_threshold = self.pixel_threshold = self.threshold_info = None
        _seeded_reset(self.head, seed, device)
        order_generator = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator(device).manual_seed(seed + 1)  # < 2**64
        adaptor_opt = torch.optim.AdamW(self.head.adaptor.parameters(), lr=ADAPTOR_LR,
                                        weight_decay=ADAPTOR_WEIGHT_DECAY)
        disc_opt = torch.optim.Adam(self.head.discriminator.parameters(), lr=DISCRIMINATOR_LR,
                                    weight_decay=DISCRIMINATOR_WEIGHT_DECAY)

        cache = (self._embed_all(data, batch_size, feature_cache_bytes)
                 if epochs and feature_cache_bytes else None)
        history: list[float] = []
        self.head.train()
        try:
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
                        embeddings = self._embed(data.batch(index.tolist()))
                    loss = self._train_step(embeddings, noise_generator, adaptor_opt, disc_opt)
                    total += loss.detach()
                    steps += 1
                history.append(float(total) / steps)
                bar.set_postfix(loss=f"{history[-1]:.4f}")
        finally:
            self.head.zero_grad(set_to_none=True)
            self.head.eval()
        return history

    def _embed(self, crops: Tensor) -> Tensor:
        """uint8 crops on the CPU -> `head.embed` of their features, [b, H2, W2, T] float32."""
        with torch.no_grad():
            batch = crops.to(self.device)
            features = self.backbone(normalise(batch, self._mean, self._std).contiguous())
            return self.head.embed([f.float() for f in features])

    def _embed_all(self, data: "_TrainingImages", batch_size: int, budget: int) -> Tensor | None:
        """Embeddings of every training image, or None when they would not fit in `budget`."""
        n = len(data)
        cache = None
        for start in range(0, n, batch_size):
            embeddings = self._embed(data.batch(list(range(start, min(n, start + batch_size)))))
            if cache is None:
                need = n * embeddings[0].numel() * embeddings.element_size()
                if need > budget:
                    return None
                cache = embeddings.new_empty(n, *embeddings.shape[1:])
            cache[start:start + embeddings.shape[0]] = embeddings
        return cache

    def _train_step(self, embeddings: Tensor, noise_generator: torch.Generator,
                    adaptor_opt: torch.optim.Optimizer, disc_opt: torch.optim.Optimizer) -> Tensor:
        """One SPEC 2 step on every patch of a batch; returns the loss (a 0-dim tensor)."""
        head = self.head
        true_feats = head.adaptor(embeddings.reshape(-1, head.target_embed_dim))
        noise = torch.randn(true_feats.shape, generator=noise_generator, device=true_feats.device)
        fake_feats = true_feats + noise * self.noise_std
        # BatchNorm in training mode sees the true and the fake halves together (SPEC 2).
        logits = head.discriminator(torch.cat([true_feats, fake_feats]))
        true_logits, fake_logits = logits[:len(true_feats)], logits[len(true_feats):]
        # Truncated L1 on the logits (scores are minus logits): true above +margin, fake below -margin.
        loss = F.relu(self.margin - true_logits).mean() + F.relu(fake_logits + self.margin).mean()
        adaptor_opt.zero_grad(set_to_none=True)
        disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        adaptor_opt.step()
        disc_opt.step()
        return loss

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
            "config": self.config(),
            "head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()},
            "backbone": ({k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
                         if store else None),
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "threshold_info": None if self.threshold_info is None else dict(self.threshold_info),
        }
        torch.save(payload, os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: torch.device | str = "cpu") -> "SimpleNet":
        """Read a model written by `save`. Never executes code from the file: it is read with
        `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers.

        Raises FileNotFoundError for a missing file and ValueError (naming the file) for anything
        that is not a readable model of this format and version, or whose tensors do not fit its
        config.
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
_CONFIG_ARGS = ("image_size", "resize", "pretrain_embed_dim", "target_embed_dim", "hidden",
                "noise_std", "margin", "sigma", "precision")
_CONFIG_TYPES = {"backbone": str, "weights_id": str, "image_size": int, "resize": int,
                 "pretrain_embed_dim": int, "target_embed_dim": int, "hidden": int,
                 "noise_std": (int, float), "margin": (int, float), "sigma": (int, float),
                 "precision": str}


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
    if version != FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version!r}; this simplenet_fast reads "
                         f"version {FORMAT_VERSION} (a file from a newer release?)")
    missing = [k for k in ("config", "head", "backbone", "image_threshold", "pixel_threshold")
               if k not in obj]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    config = obj["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{where}: config must be a dict, got {type(config).__name__}")
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
    """The training set as an indexable list: paths stay paths (decoded per batch), every other
    source becomes its uint8 crop at once (and an iterable is consumed once)."""

    def __init__(self, images: Any, image_size: int, resize: int):
        self.image_size, self.resize = image_size, resize
        self.items: list[tuple[str, Any]] = []
        for what, source in iter_sources(images):
            if isinstance(source, (str, os.PathLike)):
                self.items.append((what, Path(source)))
            else:
                self.items.append((what, preprocess_image(source, image_size, resize, what)))

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, index: list[int]) -> Tensor:
        crops = []
        for i in index:
            what, item = self.items[i]
            if isinstance(item, Path):
                item = preprocess_image(item, self.image_size, self.resize, what)
            crops.append(item)
        return torch.stack(crops)


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
    to `use`). Other keyword arguments (`batch_size`, `fused`, `cuda_graph`, `precision`) go to
    `SimpleNet.score`. Thread-safe.
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
