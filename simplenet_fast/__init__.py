"""simplenet_fast: fast, faithful SimpleNet (CVPR 2023) image anomaly detection."""
from ._native import build_info
from .head import SimpleNetHead
from .postprocess import anomaly_map

__all__ = ["SimpleNetHead", "anomaly_map", "build_info"]
__version__ = "0.1.0"
