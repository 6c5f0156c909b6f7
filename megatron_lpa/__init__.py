"""megatron_lpa: pretraining Low-dimensional Projected Attention models on megatron-core."""

__version__ = "0.1.0"
