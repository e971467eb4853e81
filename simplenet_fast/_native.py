"""Import of the compiled core, tolerant of its absence (STYLE.md: the package imports without it)."""
from __future__ import annotations

import warnings


def _load():
    try:
        from . import _C
    except ImportError as error:  # a source checkout without a build, or a broken install
        warnings.warn(f"simplenet_fast._C could not be imported ({error}); the fused head is "
                      "unavailable and scoring uses the pure-PyTorch reference", RuntimeWarning,
                      stacklevel=2)
        return None
    return _C


_MODULE = _load()


def native():
    """The compiled module `simplenet_fast._C`, or None (warned about once, at import) when it is
    missing. A plain module attribute, so that torch.compile reads it without tracing a cache."""
    return _MODULE


def build_info() -> dict:
    """What the compiled core was built with: CPU vector path, OpenMP, CUDA architectures."""
    module = native()
    if module is None:
        return {"compiled": False, "cpu_isa": None, "openmp": False, "cuda": False, "cuda_archs": ""}
    return {"compiled": True, **module.build_info()}
