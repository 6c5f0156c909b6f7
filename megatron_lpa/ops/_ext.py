"""The compiled kernels of ``csrc/`` (``megatron_lpa._C``), imported once.

``setup.py`` builds them when a CUDA build of torch and nvcc are present. Each op in this package
calls its function on ``kernels_for(tensor)``: the extension, or its PyTorch fallback
``reference.py`` (same names and signatures) on CPU tensors, and on GPU tensors when the extension
was not built (with one warning).
"""

import warnings
from types import ModuleType

import torch

from megatron_lpa.ops import reference

try:
    from megatron_lpa import _C
except ImportError:
    _C = None

HAVE_LPA_CUDA = _C is not None
_warned = False


def kernels_for(tensor: torch.Tensor) -> ModuleType:
    """The ops for ``tensor``: the compiled kernels for a CUDA tensor, else ``reference``."""
    global _warned
    if not tensor.is_cuda:
        return reference
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            "megatron_lpa's fused CUDA kernels are not built (no megatron_lpa._C); using the "
            "slower PyTorch fallbacks. Build them with `pip install --no-build-isolation -e .` on "
            "a machine with nvcc and a CUDA build of torch."
        )
    return reference if _C is None else _C
