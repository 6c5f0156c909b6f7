"""The compiled kernels of ``csrc/`` (``megatron_lpa._C``), imported once.

``setup.py`` builds them when a CUDA build of torch and nvcc are present. Each op in this package
asks ``kernels_for(tensor)`` and runs its PyTorch fallback (``reference.py``) when it gets None: on
CPU tensors always, on GPU tensors only when the extension was not built (with one warning).
"""

import warnings
from types import ModuleType
from typing import Optional

import torch

try:
    from megatron_lpa import _C
except ImportError:
    _C = None

HAVE_LPA_CUDA = _C is not None
_warned = False


def kernels_for(tensor: torch.Tensor) -> Optional[ModuleType]:
    """The compiled kernels for a CUDA ``tensor``, or None when the PyTorch fallback must run."""
    global _warned
    if not tensor.is_cuda:
        return None
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            "megatron_lpa's fused CUDA kernels are not built (no megatron_lpa._C); using the slower "
            "PyTorch fallbacks. Build them with `pip install --no-build-isolation -e .` on a machine "
            "with nvcc and a CUDA build of torch."
        )
    return _C
