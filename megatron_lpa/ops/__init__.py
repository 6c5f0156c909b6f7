"""Fused kernels (csrc/, compiled as ``megatron_lpa._C``) with their PyTorch fallbacks."""
