"""megatron_lpa: pretraining Low-dimensional Projected Attention models on megatron-core."""

from megatron_lpa.platform.megatron_warnings import filter_optional_kernel_warnings

__version__ = "0.1.0"

# Before any of our modules imports megatron-core, which warns as it is imported.
filter_optional_kernel_warnings()
