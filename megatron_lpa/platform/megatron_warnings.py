"""megatron-core's import-time warnings about Transformer Engine and Apex, as one line of ours.

Without TE and Apex, importing megatron-core warns five times (once per module that falls back),
before any flag is read, ``--help`` included. ``filter_optional_kernel_warnings`` (applied by
``megatron_lpa/__init__.py``, so before any of our modules imports megatron-core) ignores exactly
those messages; ``optional_kernels_line`` says once, at the start of training, what runs instead.
"""

import warnings

_MESSAGES = (r"Transformer Engine and Apex are not installed\.", r"Apex is not installed\.")


def filter_optional_kernel_warnings() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings(
            "ignore", message=message, category=UserWarning, module=r"megatron\.core"
        )


def optional_kernels_line() -> str:
    """What megatron-core runs without TE and Apex, or "" when they are installed."""
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    if HAVE_TE or not USING_PYTORCH_OPTIMIZER:
        return ""
    return (
        "Without Transformer Engine and Apex: torch's AdamW inside megatron-core's optimizer, "
        "megatron-core's local multi-tensor ops, and megatron_lpa's norms, SDPA attention and "
        "kernels (megatron_lpa/ops, PyTorch fallbacks where not built)."
    )
