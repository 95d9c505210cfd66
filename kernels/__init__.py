"""Triton kernels (installed as ``fastgraph.kernels``), each with its PyTorch reference."""
