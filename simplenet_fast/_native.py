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
    """What the compiled core was built with: CPU vector path, OpenMP, CUDA architectures; and
    `cpu_bfloat16`, whether this CPU computes bfloat16 natively (`precision="bfloat16"` and
    `"auto"` use it; simplenet_fast._precision)."""
    from ._precision import cpu_has_native_bfloat16

    module = native()
    if module is None:
        info = {"compiled": False, "cpu_isa": None, "openmp": False, "cuda": False, "cuda_archs": ""}
    else:
        info = {"compiled": True, **module.build_info()}
    return {**info, "cpu_bfloat16": cpu_has_native_bfloat16()}
