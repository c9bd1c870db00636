"""Kernel bodies: pure functions of buffers and sizes (activation codes and tolerances: ``mmoe_fast.contract``).

- Triton (``@triton.jit``): ``common.py`` (activations, the expert GEMM tile), ``gating.py``,
  ``mixture.py``, ``linear.py``; launched from ``mmoe_fast/backends/triton.py``.
- Numba (``@njit(parallel=True, cache=True)``): ``numba_kernels.py``, on NumPy arrays; wrapped by
  ``mmoe_fast/backends/numba.py``.
Nothing here knows autograd or nn.Modules.
"""
