"""Triton kernel bodies (``@triton.jit``), installed as ``mmoe_fast.kernels``.

Pure kernels: buffers and sizes in, buffers out. Launchers live in ``mmoe_fast/backends/triton.py``.
"""
