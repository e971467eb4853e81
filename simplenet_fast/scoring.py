"""A SimpleNet's scoring path as a plain `nn.Module`, for torch.compile and torch.export.

`ScoringModule(model)` runs normalisation, the backbone, the fused head (the registered operator
`torch.ops.simplenet_fast.patch_scores`, see `simplenet_fast.ops`), the image score and the
anomaly map (`torch.ops.simplenet_fast.anomaly_map`): exactly `SimpleNet.score`'s device path,
with no host synchronisation and no graph break, so that

    torch.compile(ScoringModule(model), fullgraph=True)     # what score(compile=True) runs
    torch.export.export(ScoringModule(model), (images,))    # or export_program(model)

both capture it whole. Inputs: ``input_format="uint8"`` takes the crops `SimpleNet.forward`
takes, uint8 ``[B, H, W, 3]``; ``"float"`` takes float32 ``[B, 3, H, W]`` RGB in [0, 1] (the input
divided by 255, as the ONNX export does), and, for "pad" models, optionally each input's real
size. Outputs: ``(pred_score [B], anomaly_map [B, H, W],
patch_scores [B, h, w])``, `AnomalyResult`'s fields in the ONNX export's order. Thresholds are
not applied (compare with ``model.image_threshold`` / ``pixel_threshold``).

A saved program runs in other inference code once `simplenet_fast` is imported (which registers
the operators); nothing else of the package is needed:

    ep = export_program(model)                 # dynamic batch axis
    torch.export.save(ep, "scoring.pt2")
    ...
    import simplenet_fast                      # registers torch.ops.simplenet_fast.*
    scoring = torch.export.load("scoring.pt2").module()
    pred_score, anomaly_map, patch_scores = scoring(images)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _fused
from .geometry import zero_padding
from .preprocess import normalise

__all__ = ["ScoringModule", "export_program", "INPUT_FORMATS"]

INPUT_FORMATS = ("uint8", "float")


class ScoringModule(nn.Module):
    """The scoring path of `model` (module doc). It holds `model` itself: weights are shared, and
    a weight update shows at the next call (of the eager or compiled module)."""

    def __init__(self, model, input_format: str = "uint8"):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        self.model = model
        self.input_format = input_format

    def forward(self, images: Tensor, real_size: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """real_size: None, or int64 `[B, 2]`, the rows and columns of each input that hold image
        pixels ("pad" mode, `Placement.real`), as `SimpleNet.forward` takes it."""
        model = self.model
        height, width = model.image_size
        if self.input_format == "uint8":
            expected, dtype = [height, width, 3], torch.uint8
        else:
            expected, dtype = [3, height, width], torch.float32
        if images.dim() != 4 or list(images.shape[1:]) != expected or images.dtype != dtype:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"{self.input_format} input must be {dtype} [B, {shape}], got "
                             f"{list(images.shape)} {images.dtype}")
        if self.input_format == "uint8":
            x = normalise(images, model._mean, model._std)
        else:
            x = (images - model._mean) / model._std
        if real_size is not None:
            x = zero_padding(x, real_size)
        scores, pred_score, amap = model._normalised_forward(
            x, real=real_size, precision=model.compute_precision)
        return pred_score, amap, scores


def export_program(model, input_format: str = "float", dynamic_batch: bool = True,
                   example_batch: int = 2) -> torch.export.ExportedProgram:
    """`torch.export.export` of `ScoringModule(model, input_format)` on the model's device.

    The program holds the model's weights (the head's raw tensors: the fold happens inside the
    operator) and the operators `simplenet_fast::patch_scores` and `::anomaly_map`.
    dynamic_batch: any batch size from 1 up to the fused head's limit (module `_fused`), else
    `example_batch` only.
    """
    if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 2:
        raise ValueError(f"example_batch must be an int >= 2 (a batch of 1 would be specialised), "
                         f"got {example_batch!r}")
    module = ScoringModule(model, input_format).eval()
    height, width = model.image_size
    if input_format == "uint8":
        example = torch.zeros(example_batch, height, width, 3, dtype=torch.uint8,
                              device=model.device)
    else:
        example = torch.zeros(example_batch, 3, height, width, device=model.device)
    dynamic_shapes = None
    if dynamic_batch:
        with torch.no_grad():
            features = model.backbone(torch.zeros(1, 3, height, width, device=model.device))
        limit = _fused.max_batch(features[0].shape[-2:], features[1].shape[-2:])
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=limit)},)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
