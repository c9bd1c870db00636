"""The contract every backend keeps: activations and their one integer encoding, tolerances, the backend protocol.

Imported by ``ops.py``, every backend, the kernels and the test harness; it imports nothing of the package,
so nothing below ``ops.py`` needs the test harness. The backend protocol, with shapes:

- ``gate_softmax(x[B, D], Wg[T, D, E], bg[T, E] | None) -> G[B, T, E]``
- ``gate_softmax_backward(dG[B, T, E], G, x, Wg, input_grad=True) -> (dx[B, D], dWg[T, D, E], dbg[T, E])``
- ``expert_mixture(a[B, K] | a[B, E, K], W[E, K, H], b[E, H] | None, G[B, T, E], activation) -> m[T, B, H]``
- ``expert_mixture_backward(dm[T, B, H], a, W, b, G, activation, input_grad=True) -> (da like a, dW, db[E, H], dG)``
- ``grouped_linear(a, W[E, K, N], b[E, N] | None, activation) -> out[B, E, N]``
- ``grouped_linear_backward(dout[B, E, N], a, W, b, activation, input_grad=True) -> (da like a, dW, db[E, N])``

Kernels get contiguous tensors of one dtype and device, already validated (``ops.py`` does that), and
return new contiguous tensors in the input dtype; ``db``/``dbg`` are returned even when there is no bias
(``ops.py`` drops them). With ``input_grad=False`` nothing needs ``da``/``dx``: a backend may skip it and
return None in its place. The required backward members get only the forward's inputs (and ``G`` for the
gate) and recompute what they need. Optional members:

- ``mmoe(x, W, b, Wg, bg, activation) -> m[T, B, H]`` and ``mmoe_backward(dm, x, W, b, Wg, bg, activation)
  -> (dx, dW, db, dWg, dbg)`` (also taking ``input_grad``): gates and mixture in one pass (else ``ops.py``
  composes the two ops);
- ``tolerance(dtype) -> float``: the relative error it promises, when looser than ``TOLERANCE`` (tf32);
- ``mmoe_train``, ``expert_mixture_train``, ``grouped_linear_train``: the forward under eager autograd, returning
  ``(out, saved)`` with what its backward wants kept (the pre-activations, and ``mmoe``'s gates);
  the backend's backward members then also take ``saved=`` (empty: recompute). Without them the eager backward
  recomputes.
- ``<op>_replicas(S, per, *tensors, *others)`` for an op or backward op (``gate_softmax``, ``mmoe_backward``,
  ...): S replicas at once, for the ops' vmap rules. The tensors come in the op's argument order, each
  ``[S, ...]`` where its flag in ``per`` is true, else one tensor every replica shares; the other arguments
  follow, less the backend name. Returns the op's results with a leading ``[S]`` (a gradient not asked for:
  an ``[S, 0]`` tensor). Without it, the vmap rule calls the op once per replica.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

# The activations of every op, and the integer each kernel family (C++, numba) receives for them.
ACTIVATION_CODES = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3}
ACTIVATIONS = ("relu", "silu", "gelu", "identity")
IDENTITY, RELU, SILU, GELU = (ACTIVATION_CODES[a] for a in ("identity", "relu", "silu", "gelu"))

# Relative error ||out - ref|| / ||ref|| against the float64 oracle, forward and every gradient.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TF32_TOLERANCE = 1e-3  # fp32 operands through tf32 tensor cores (a GPU backend's tolerance(), when it uses them)


def check_activation(activation: str) -> str:
    """``activation`` when it is one of ``ACTIVATIONS``, else a ValueError naming the choices."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


@runtime_checkable
class Backend(Protocol):
    """The members every backend module defines (see the module docstring for shapes)."""

    def unavailable_reason(self) -> Optional[str]:
        """Why it cannot run on this machine; None when it can."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it runs tensors of ``device`` and ``dtype``."""

    def gate_softmax(self, x: Tensor, Wg: Tensor, bg: Optional[Tensor]) -> Tensor: ...

    def gate_softmax_backward(
        self, dG: Tensor, G: Tensor, x: Tensor, Wg: Tensor, input_grad: bool = True
    ) -> tuple[Optional[Tensor], Tensor, Tensor]: ...

    def expert_mixture(self, a: Tensor, W: Tensor, b: Optional[Tensor], G: Tensor, activation: str) -> Tensor: ...

    def expert_mixture_backward(
        self, dm: Tensor, a: Tensor, W: Tensor, b: Optional[Tensor], G: Tensor, activation: str, input_grad: bool = True
    ) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]: ...

    def grouped_linear(self, a: Tensor, W: Tensor, b: Optional[Tensor], activation: str) -> Tensor: ...

    def grouped_linear_backward(
        self, dout: Tensor, a: Tensor, W: Tensor, b: Optional[Tensor], activation: str, input_grad: bool = True
    ) -> tuple[Optional[Tensor], Tensor, Tensor]: ...


REQUIRED = ("unavailable_reason", "supports", "gate_softmax", "gate_softmax_backward", "expert_mixture",
            "expert_mixture_backward", "grouped_linear", "grouped_linear_backward")
OPTIONAL = ("mmoe", "mmoe_backward", "tolerance", "mmoe_train", "expert_mixture_train", "grouped_linear_train")


def missing_members(module: ModuleType) -> list[str]:
    """The required members ``module`` lacks (empty: it implements the protocol)."""
    return [name for name in REQUIRED if not callable(getattr(module, name, None))]


def tolerance(module: ModuleType, dtype: torch.dtype) -> float:
    """The relative error ``module`` promises for ``dtype``: its own ``tolerance`` or the contract's."""
    own = getattr(module, "tolerance", None)
    return own(dtype) if own is not None else TOLERANCE[dtype]


def fused_mmoe(module: ModuleType):
    """``(mmoe, mmoe_backward)`` of a backend that fuses gates and mixture; None for a missing one."""
    return getattr(module, "mmoe", None), getattr(module, "mmoe_backward", None)
