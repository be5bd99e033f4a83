"""Triton kernels for the safety signal, each beside its PyTorch reference."""
