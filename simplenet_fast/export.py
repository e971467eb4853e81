"""ONNX export of the whole scoring path: normalisation, backbone, folded head, image score, map.

`export_onnx(model, path)` writes one ONNX file that runs without Python or PyTorch (onnxruntime,
TensorRT, OpenVINO, ...):

- **Input** ``image``: float32 ``[B, 3, H, W]``, RGB, values in [0, 1], where (H, W) is the
  model's ``image_size`` (288 x 288 in the paper): the model input that `simplenet_fast.preprocess`
  makes, divided by 255. Resizing, cropping, padding and tiling stay outside the graph
  (deployments decode and resize with their own libraries; `SimpleNet.prepare(image).placement`
  and `simplenet_fast.geometry` give the geometry). With ``input_format="uint8"`` the input is
  instead the model input as decoded, uint8 ``[B, H, W, 3]`` (HWC), exactly what
  `SimpleNet.forward` takes. The batch axis is dynamic unless ``batch_size_dynamic=False``.
- **Second input** ``real_size``, for models with ``resize_mode="pad"`` only: int64 ``[B, 2]``,
  the rows and columns of each input (from the top-left) that hold image pixels
  (`Placement.real`). The graph sets the rest to the mean colour and keeps it out of the image
  score and the map, exactly as `SimpleNet.forward(batch, real_size)` does.
- **Outputs** ``pred_score`` ``[B]`` (max of the raw patch scores, SPEC 1.9), ``anomaly_map``
  ``[B, H, W]`` (SPEC 1.10: bilinear upsample and scipy-'reflect' Gaussian blur) and
  ``patch_scores`` ``[B, h, w]``, the same names and meanings as `AnomalyResult` with
  ``map_size="model"`` (mapping maps back to the image's pixels is left to the caller).
- The head is SPEC 4's fold, written with standard ONNX ops: zero pad and 9 shifted slices stacked
  in the unfold order ``c*9 + ky*3 + kx``, a Gather of each pooling plan's index and a weighted
  sum (never materialising the upsampled layer3 unfold), MatMul with the folded weights, a
  bilinear Resize (``align_corners=False``) of the layer3 hidden term, bias, LeakyReLU, a dot with
  the output weights and a negation. The map's upsample and blur are two MatMuls with constant
  per-axis matrices (`postprocess.axis_operator`), the same ones PyTorch scoring uses.
- The model's thresholds and how they were set are stored as metadata (``image_threshold``,
  ``pixel_threshold``, ``threshold_source``, ``image_size`` (JSON [H, W]), ``resize_mode``,
  ``resize``, ``tiling``, ``input_format``, ...)
  when the ``onnx`` package is installed; `onnx_metadata(path)` reads them back.

`check_onnx(model, path)` runs the file with onnxruntime and compares it with `SimpleNet.forward`
on the same crops (SPEC 6: float32 within 1e-4 relative).
"""
from __future__ import annotations

import copy
import io
import json
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._fold import TAPS, upsample_hidden
from ._io import atomic_open
from .geometry import mask_padded_map, mask_padding, zero_padding
from .postprocess import axis_operator

__all__ = ["export_onnx", "check_onnx", "onnx_metadata", "OnnxScoring", "INPUT_FORMATS"]

INPUT_FORMATS = ("float", "uint8")
INPUT_NAME = "image"
REAL_SIZE_NAME = "real_size"
OUTPUT_NAMES = ("pred_score", "anomaly_map", "patch_scores")


class OnnxScoring(nn.Module):
    """The scoring path of a `SimpleNet` in export-friendly ops (module doc).

    Every constant (backbone weights, fold, pooling plans, blur taps and indices) is a buffer, so
    it becomes an initializer of the graph. Grid sizes are fixed at construction from one dry run
    of the backbone at ``image_size``; only the batch axis varies. With ``resize_mode="pad"`` the
    forward takes the real sizes as a second input (module doc).
    """

    def __init__(self, model, input_format: str = "float"):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.input_format = input_format
        self.image_size = tuple(model.image_size)
        self.takes_real_size = model.resize_mode == "pad"
        backbone = model.backbone
        if any(t.device.type != "cpu" or t.dtype != torch.float32
               for t in list(backbone.parameters()) + list(backbone.buffers())
               if t.is_floating_point()):
            backbone = copy.deepcopy(backbone).to(device="cpu", dtype=torch.float32)
        self.backbone = backbone.eval()
        self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))

        folded = model.head.folded("cpu")
        self.negative_slope = float(folded.negative_slope)
        self.channels = tuple(int(c) for c in model.head.channels)
        for name, plan in (("2", folded.pool2), ("3", folded.pool3)):
            self.register_buffer(f"index{name}", plan.index.reshape(-1).long())
            self.register_buffer(f"plan_weight{name}",
                                 plan.weight.float().reshape(plan.columns, plan.width, 1, 1))
            setattr(self, f"columns{name}", plan.columns)
            setattr(self, f"width{name}", plan.width)
        self.register_buffer("weight2", folded.weight2.float().clone())
        self.register_buffer("weight3", folded.weight3.float().clone())
        self.register_buffer("bias", folded.bias.float().reshape(1, -1, 1, 1).clone())
        self.register_buffer("w_out", folded.w_out.float().reshape(1, -1).clone())

        with torch.no_grad():
            f2, f3 = self.backbone(torch.zeros(1, 3, *self.image_size))
        self.grid2 = tuple(int(s) for s in f2.shape[-2:])
        self.grid3 = tuple(int(s) for s in f3.shape[-2:])
        if (f2.shape[1], f3.shape[1]) != self.channels:
            raise ValueError(f"backbone gives {f2.shape[1]}, {f3.shape[1]} channels but the head "
                             f"expects {self.channels}")

        # SPEC 1.10's upsample and blur are linear and separable: two constant matrices, the same
        # ones `postprocess.anomaly_map` multiplies by.
        cpu = torch.device("cpu")
        height, width = self.image_size
        self.register_buffer("map_rows", axis_operator(self.grid2[0], height, float(model.sigma),
                                                       cpu, torch.float32).clone())
        self.register_buffer("map_cols", axis_operator(self.grid2[1], width, float(model.sigma),
                                                       cpu, torch.float32).T.contiguous())

    # ------------------------------------------------------------------------------ pieces
    def _pool(self, f: Tensor, index: Tensor, weight: Tensor, channels: int, columns: int,
              width: int, grid: tuple[int, int]) -> Tensor:
        """[B, C, H, W] -> [B, columns, H, W]: the composed pooling of the 3x3 unfold (SPEC 4)."""
        h, w = grid
        padded = F.pad(f, (1, 1, 1, 1))  # SPEC 1.3: zero padding 1
        shifted = [padded[:, :, ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)]
        unfolded = torch.stack(shifted, dim=2).reshape(-1, channels * TAPS, h, w)  # c*9 + ky*3 + kx
        gathered = unfolded.index_select(1, index).reshape(-1, columns, width, h, w)
        return (gathered * weight).sum(dim=2)

    def patch_scores(self, f2: Tensor, f3: Tensor) -> Tensor:
        (h2, w2), (h3, w3) = self.grid2, self.grid3
        pooled2 = self._pool(f2, self.index2, self.plan_weight2, self.channels[0], self.columns2,
                             self.width2, self.grid2)
        pooled3 = self._pool(f3, self.index3, self.plan_weight3, self.channels[1], self.columns3,
                             self.width3, self.grid3)
        hidden = self.weight2.shape[0]
        hidden2 = torch.matmul(self.weight2, pooled2.reshape(-1, self.columns2, h2 * w2))
        hidden3 = torch.matmul(self.weight3, pooled3.reshape(-1, self.columns3, h3 * w3))
        hidden3 = upsample_hidden(hidden3.reshape(-1, hidden, h3, w3), (h2, w2))
        h = hidden2.reshape(-1, hidden, h2, w2) + hidden3 + self.bias
        h = F.leaky_relu(h, self.negative_slope)
        logits = torch.matmul(self.w_out, h.reshape(-1, hidden, h2 * w2))  # [B, 1, h2*w2]
        return -logits.reshape(-1, h2, w2)

    def anomaly_map(self, scores: Tensor) -> Tensor:
        return torch.matmul(torch.matmul(self.map_rows, scores), self.map_cols)

    def forward(self, image: Tensor, real_size: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        if self.input_format == "uint8":
            x = image.permute(0, 3, 1, 2).float() / 255.0
        else:
            x = image
        x = (x - self.mean) / self.std
        if real_size is not None:
            x = zero_padding(x, real_size)
        f2, f3 = self.backbone(x)
        scores = self.patch_scores(f2, f3)
        map_scores = scores
        if real_size is not None:  # the same ops as SimpleNet._device_forward
            scores, map_scores = mask_padding(scores, real_size, self.image_size)
        pred_score = scores.reshape(-1, self.grid2[0] * self.grid2[1]).amax(dim=1)
        amap = self.anomaly_map(map_scores)
        if real_size is not None:
            amap = mask_padded_map(amap, real_size)
        return pred_score, amap, scores


def export_onnx(model, path: str | os.PathLike, batch_size_dynamic: bool = True, opset: int = 17,
                input_format: str = "float", example_batch: int = 2) -> str:
    """Write the model's scoring path to `path` as ONNX (module doc); returns the path.

    model: a `SimpleNet`. Its head is folded from the current weights; the export runs on the CPU
        in float32 whatever the model's device and precision.
    batch_size_dynamic: a dynamic batch axis (default); False fixes it to `example_batch`.
    opset: ONNX opset (17 by default; 13 or later is needed for the ops used).
    input_format: "float" (``[B, 3, H, W]`` float32 in [0, 1]) or "uint8" (``[B, H, W, 3]``).
    The file is written under a temporary name beside `path` and renamed when complete, so a
    failed export leaves nothing half-written at `path`.
    """
    if not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    if not isinstance(example_batch, int) or example_batch < 1:
        raise ValueError(f"example_batch must be a positive int, got {example_batch!r}")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    scoring = OnnxScoring(model, input_format).eval()
    height, width = scoring.image_size
    if input_format == "uint8":
        example = (torch.zeros(example_batch, height, width, 3, dtype=torch.uint8),)
    else:
        example = (torch.zeros(example_batch, 3, height, width),)
    input_names = [INPUT_NAME]
    if scoring.takes_real_size:
        example += (torch.tensor([[height, width]] * example_batch, dtype=torch.int64),)
        input_names.append(REAL_SIZE_NAME)
    dynamic_axes = None
    if batch_size_dynamic:
        dynamic_axes = {**{name: {0: "batch"} for name in input_names},
                        **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    kwargs: dict[str, Any] = {}
    import inspect
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        # The TorchScript exporter: no onnxscript dependency, and its op choices are the ones
        # checked in tests/test_export.py.
        kwargs["dynamo"] = False
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        # Slices with step 1 only; this note concerns ops the exporter generates itself.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        buffer = io.BytesIO()
        torch.onnx.export(scoring, example, buffer, input_names=input_names,
                          output_names=list(OUTPUT_NAMES), opset_version=opset,
                          dynamic_axes=dynamic_axes, do_constant_folding=True, **kwargs)
    data = _with_metadata(buffer.getvalue(), model, input_format)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return path


def _metadata(model, input_format: str) -> dict[str, str]:
    from .thresholds import threshold_source

    def text(value):
        return "" if value is None else repr(float(value))

    backbone = model.backbone
    from . import __version__
    config = model.config
    real = ", real_size int64 [B, 2]" if model.resize_mode == "pad" else ""
    return {
        "producer": f"simplenet_fast {__version__}",
        "input_format": input_format,
        "input_description": ("float32 [B, 3, H, W] RGB in [0, 1]" if input_format == "float"
                              else "uint8 [B, H, W, 3] RGB") + real,
        "image_size": json.dumps(list(config["image_size"])),
        "resize_mode": config["resize_mode"],
        "resize": "" if config["resize"] is None else str(config["resize"]),
        "tiling": "" if config["tiling"] is None else json.dumps(config["tiling"]),
        "backbone": str(getattr(backbone, "name", None)),
        "image_threshold": text(model.image_threshold),
        "pixel_threshold": text(model.pixel_threshold),
        "threshold_source": threshold_source(model),
    }


def _with_metadata(data: bytes, model, input_format: str) -> bytes:
    """The serialized ONNX model with our metadata (unchanged without the onnx package)."""
    try:
        import onnx
    except ImportError:
        return data
    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in _metadata(model, input_format).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata `export_onnx` stored (empty without the onnx package at export time)."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx(model, path: str | os.PathLike, batch_sizes: Sequence[int] = (1, 3), seed: int = 0,
               images: Tensor | None = None) -> dict[str, float]:
    """Run `path` with onnxruntime and compare it with `model` on the same uint8 inputs.

    images: uint8 inputs ``[N, H, W, 3]`` (default: random ones, seeded); each batch size in
    `batch_sizes` scores the first that many. A "pad" model gets seeded random real sizes (the
    first input whole). Returns the worst relative error (L2 norm of the difference over the L2
    norm of PyTorch's values, SPEC 6) and the worst absolute error of each output, over all batch
    sizes. Needs onnxruntime.
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install onnxruntime"
                          ) from error
    height, width = model.image_size
    n = max(batch_sizes)
    generator = torch.Generator().manual_seed(seed)
    if images is None:
        images = torch.randint(0, 256, (n, height, width, 3), generator=generator,
                               dtype=torch.uint8)
    real = None
    if model.resize_mode == "pad":
        real = torch.stack([torch.randint(1, height + 1, (len(images),), generator=generator),
                            torch.randint(1, width + 1, (len(images),), generator=generator)], 1)
        real[0] = torch.tensor([height, width])
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    info = session.get_inputs()[0]
    uint8 = "uint8" in info.type
    worst: dict[str, float] = {}
    for b in batch_sizes:
        inputs = images[:b]
        expected = model(inputs, None if real is None else real[:b])
        feed = {info.name: inputs.numpy() if uint8
                else (inputs.permute(0, 3, 1, 2).float() / 255.0).numpy()}
        if real is not None:
            feed[REAL_SIZE_NAME] = real[:b].numpy()
        got = dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), feed)))
        for name in OUTPUT_NAMES:
            ref = getattr(expected, name).detach().double().cpu().numpy()
            out = got[name].astype(np.float64)
            if out.shape != ref.shape:
                raise AssertionError(f"ONNX output {name} has shape {out.shape}, PyTorch {ref.shape}")
            if not np.isfinite(out).all():
                raise AssertionError(f"ONNX output {name} holds NaN or Inf")
            rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
            worst[f"{name}_rel"] = max(worst.get(f"{name}_rel", 0.0), rel)
            worst[f"{name}_abs"] = max(worst.get(f"{name}_abs", 0.0), float(np.abs(out - ref).max()))
    return worst
