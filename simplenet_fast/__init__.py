"""simplenet_fast: fast, faithful SimpleNet (CVPR 2023) image anomaly detection."""
from ._native import build_info
from . import ops  # registers torch.ops.simplenet_fast.* (the fused head as a PyTorch operator)
from .head import SimpleNetHead
from .model import AnomalyResult, SimpleNet, score, use
from .postprocess import anomaly_map

__all__ = ["SimpleNet", "SimpleNetHead", "score", "use", "anomaly_map", "AnomalyResult", "build_info"]
__version__ = "0.1.0"
