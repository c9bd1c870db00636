"""Low-latency CPU inference of a trained model, and its export to ONNX.

``InferenceSession(model)`` copies the weights of an ``MMoE``, ``OMoE`` or ``SharedBottom`` once,
packed into the C++ kernels' panel layout (mixture and towers), and ``run(x)`` answers ``[B, T]`` with
one call into ``mmoe_fast._C``: no autograd, no torch dispatch, nothing allocated but the output
(scratch buffers belong to the calling thread and are kept). Without ``_C`` it runs the model eagerly.
``export_onnx(model, path)`` writes the same model with standard ONNX operators and a dynamic batch.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backends import cpp
from .contract import ACTIVATION_CODES
from .models import MMoE, SharedBottom

__all__ = ["InferenceSession", "export_onnx"]

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _linears(seq: nn.Sequential) -> list[tuple[nn.Linear, bool]]:
    """(layer, followed by ReLU) for a Sequential of nn.Linear and nn.ReLU (towers, a shared bottom)."""
    layers: list[tuple[nn.Linear, bool]] = []
    for module in seq:
        if isinstance(module, nn.Linear):
            layers.append((module, False))
        elif isinstance(module, nn.ReLU) and layers and not layers[-1][1]:
            layers[-1] = (layers[-1][0], True)
        else:
            raise TypeError(f"cannot pack {type(module).__name__} (towers are nn.Linear and nn.ReLU)")
    return layers


def _model_dtype(model: nn.Module) -> torch.dtype:
    params = list(model.parameters())
    if not params:
        raise TypeError("model has no parameters")
    dtype, device = params[0].dtype, params[0].device
    if any(p.dtype != dtype or p.device != device for p in params):
        raise TypeError("every parameter of the model must share one dtype and one device")
    return dtype


class InferenceSession:
    """A trained model packed for CPU inference: ``run(x[B, D]) -> [B, T]``, equal to ``model.eval()(x)``.

    ``x`` is a torch tensor or a numpy array (the answer has the same kind), in the model's dtype
    (float32 or float64 runs the C++ kernels). The session is a snapshot: later changes to the model's
    weights do not reach it. ``run`` releases the GIL; any number of threads may call it at once.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, (MMoE, SharedBottom)):
            raise TypeError(f"InferenceSession packs MMoE, OMoE or SharedBottom models, got {type(model).__name__}")
        self.dtype = _model_dtype(model)
        self.num_tasks = model.num_tasks
        self.in_features = self._in_features(model)
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"InferenceSession runs on the CPU; the model is on {device} (use model.cpu())")
        self._native = cpp.unavailable_reason() is None and cpp.supports(device, self.dtype)
        if self._native:
            with torch.no_grad():
                self._session = self._pack(model)
        else:  # no _C (or a dtype it lacks): the eager model, on a private copy
            self._model = copy.deepcopy(model).eval()
            self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """``"cpp"`` when the packed C++ model answers, ``"eager"`` when the model itself runs."""
        return "cpp" if self._native else "eager"

    @staticmethod
    def _in_features(model: nn.Module) -> int:
        if isinstance(model, MMoE):
            return model.mixture.in_features
        return _linears(model.bottom)[0][0].in_features

    def _pack(self, model: nn.Module):
        def c(t):
            return None if t is None else t.detach().to(self.dtype).contiguous()

        def ptr(t):
            return 0 if t is None else t.data_ptr()

        session = cpp.session_class(self.dtype)(self.in_features, self.num_tasks)
        if isinstance(model, MMoE):
            layer = model.mixture
            act = ACTIVATION_CODES[layer.activation]
            ws, bs = [c(w) for w in layer.expert_weights], [c(b) for b in layer.expert_biases]
            for w, b in zip(ws[:-1], bs[:-1]):
                session.add_hidden(ptr(w), ptr(b), *w.shape, act)
            wg, bg = c(layer.gate_weight), c(layer.gate_bias)
            session.set_mixture(ptr(ws[-1]), ptr(bs[-1]), *ws[-1].shape, act, ptr(wg), ptr(bg), wg.shape[0])
        else:
            for lin, relu in _linears(model.bottom):
                w, b = c(lin.weight.t()[None]), c(None if lin.bias is None else lin.bias[None])
                session.add_hidden(ptr(w), ptr(b), *w.shape, ACTIVATION_CODES["relu" if relu else "identity"])
        for t, tower in enumerate(model.towers.towers):
            for lin, relu in _linears(tower):
                w, b = c(lin.weight), c(lin.bias)
                session.add_tower_layer(t, ptr(w), ptr(b), lin.in_features, lin.out_features, relu)
        return session

    def _reject(self, x) -> None:
        """Raise the error that says what is wrong with ``x``."""
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise TypeError(f"x must be a torch.Tensor or a numpy.ndarray, got {type(x).__name__}")
        if len(x.shape) != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape [B, D] = [?, {self.in_features}], got {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            raise ValueError(f"x is on device {x.device} but the session runs on the CPU")
        raise TypeError(f"x has dtype {x.dtype} but the session runs {self.dtype}")

    def run(self, x, out=None):
        """Every task's output ``[B, T]`` for ``x[B, D]`` (torch tensor or numpy array, the model's dtype).

        ``out``: an optional contiguous ``[B, T]`` buffer of the same kind and dtype to write into
        (then nothing at all is allocated).
        """
        if isinstance(x, torch.Tensor):  # checks kept few and cheap: at B = 1 they are part of the latency
            shape = x.shape
            if len(shape) != 2 or shape[1] != self.in_features or x.dtype != self.dtype or not x.is_cpu:
                self._reject(x)
            if not self._native:
                with self._lock, torch.inference_mode():
                    return self._model(x) if out is None else out.copy_(self._model(x))
            if not x.is_contiguous():
                x = x.contiguous()
            B = shape[0]
            if out is None:
                out = torch.empty(B, self.num_tasks, dtype=self.dtype)
            elif out.shape != (B, self.num_tasks) or out.dtype != self.dtype or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {self.dtype} tensor of shape {(B, self.num_tasks)}")
            if B:
                self._session.run(x.data_ptr(), out.data_ptr(), B)
            return out
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != self.in_features \
                or x.dtype != _NUMPY.get(self.dtype):
            self._reject(x)
        if out is not None and (out.shape != (x.shape[0], self.num_tasks) or out.dtype != x.dtype
                                or not out.flags.c_contiguous):
            raise ValueError(f"out must be a contiguous {x.dtype} array of shape {(x.shape[0], self.num_tasks)}")
        if not self._native:
            y = self.run(torch.from_numpy(x)).numpy()
            return y if out is None else np.copyto(out, y) or out
        x = np.ascontiguousarray(x)
        if out is None:
            out = np.empty((x.shape[0], self.num_tasks), dtype=x.dtype)
        if x.shape[0]:
            self._session.run(x.ctypes.data, out.ctypes.data, x.shape[0])
        return out

    __call__ = run


# ---- ONNX -----------------------------------------------------------------------------------------

_ONNX_TYPES = {torch.float32: 1, torch.float64: 11}  # onnx.TensorProto.FLOAT, DOUBLE


class _Graph:
    """A small builder over onnx.helper: every node gets a fresh output name."""

    def __init__(self, dtype: torch.dtype) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.dtype = dtype
        self.nodes, self.inits = [], []

    def const(self, value, name: str, integer: bool = False) -> str:
        arr = np.asarray(value, dtype=np.int64 if integer else _NUMPY[self.dtype])
        name = f"{name}_{len(self.inits)}"
        self.inits.append(self.numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def act(self, h: str, activation: str) -> str:
        if activation == "relu":
            return self.op("Relu", h)
        if activation == "silu":
            return self.op("Mul", h, self.op("Sigmoid", h))
        if activation == "gelu":  # tanh form, as the kernels: 0.5 h (1 + tanh(c (h + a h^3)))
            cube = self.op("Mul", self.op("Mul", h, h), h)
            inner = self.op("Mul", self.op("Add", h, self.op("Mul", cube, self.const(0.044715, "gelu_a"))),
                            self.const(0.7978845608028654, "gelu_c"))
            one_plus = self.op("Add", self.op("Tanh", inner), self.const(1.0, "one"))
            return self.op("Mul", self.op("Mul", h, one_plus), self.const(0.5, "half"))
        return h

    def linear(self, h: str, lin: nn.Linear, relu: bool) -> str:
        h = self.op("MatMul", h, self.const(lin.weight.detach().t().cpu().numpy(), "w"))
        if lin.bias is not None:
            h = self.op("Add", h, self.const(lin.bias.detach().cpu().numpy(), "b"))
        return self.op("Relu", h) if relu else h


def _mixture_graph(g: _Graph, x: str, layer) -> str:
    """M[B, G, H] of an MMoE/OMoE layer (G gates)."""
    ws = [w.detach().cpu() for w in layer.expert_weights]
    bs = [b.detach().cpu() for b in layer.expert_biases]
    E = ws[0].shape[0]
    # First expert layer on the shared x: one MatMul [B, D] x [D, E*N], then [B, E, N] -> [E, B, N].
    w0, b0 = ws[0], bs[0]
    h = g.op("MatMul", x, g.const(w0.permute(1, 0, 2).reshape(w0.shape[1], -1).numpy(), "w"))
    h = g.act(g.op("Add", h, g.const(b0.reshape(-1).numpy(), "b")), layer.activation)
    h = g.op("Reshape", h, g.const([0, E, w0.shape[2]], "shape", integer=True))
    if len(ws) > 1:
        h = g.op("Transpose", h, perm=[1, 0, 2])
        for w, b in zip(ws[1:], bs[1:]):  # deeper layers: batched MatMul [E, B, K] x [E, K, N]
            h = g.op("Add", g.op("MatMul", h, g.const(w.numpy(), "w")), g.const(b[:, None, :].numpy(), "b"))
            h = g.act(h, layer.activation)
        h = g.op("Transpose", h, perm=[1, 0, 2])
    wg = layer.gate_weight.detach().cpu()
    G = wg.shape[0]
    logits = g.op("MatMul", x, g.const(wg.permute(1, 0, 2).reshape(wg.shape[1], -1).numpy(), "wg"))
    if layer.gate_bias is not None:
        logits = g.op("Add", logits, g.const(layer.gate_bias.detach().cpu().reshape(-1).numpy(), "bg"))
    gates = g.op("Softmax", g.op("Reshape", logits, g.const([0, G, E], "shape", integer=True)), axis=-1)
    return g.op("MatMul", gates, h)


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17) -> None:
    """Write ``model`` (MMoE, OMoE or SharedBottom) to ``path`` as ONNX: input ``x[batch, D]``,
    output ``y[batch, T]``, standard operators only (MatMul, Add, Softmax, Relu, ...). Needs ``onnx``."""
    try:
        import onnx
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("export_onnx needs the 'onnx' package: pip install 'mmoe-fast[onnx]'") from exc
    if not isinstance(model, (MMoE, SharedBottom)):
        raise TypeError(f"export_onnx writes MMoE, OMoE or SharedBottom models, got {type(model).__name__}")
    dtype = _model_dtype(model)
    if dtype not in _ONNX_TYPES:
        raise TypeError(f"export_onnx writes float32 or float64 models, got {dtype}")
    g = _Graph(dtype)
    if isinstance(model, MMoE):
        mixed = _mixture_graph(g, "x", model.mixture)
        gates = model.mixture.gate_weight.shape[0]
        index = [g.const(t if gates > 1 else 0, "task", integer=True) for t in range(model.num_tasks)]
        inputs = [g.op("Gather", mixed, i, axis=1) for i in index]
    else:
        h = "x"
        for lin, relu in _linears(model.bottom):
            h = g.linear(h, lin, relu)
        inputs = [h] * model.num_tasks
    outs = []
    for tower, h in zip(model.towers.towers, inputs):
        for lin, relu in _linears(tower):
            h = g.linear(h, lin, relu)
        outs.append(h)
    y = g.op("Concat", *outs, axis=1)
    g.nodes.append(onnx.helper.make_node("Identity", [y], ["y"]))
    D = InferenceSession._in_features(model)
    elem = _ONNX_TYPES[dtype]
    graph = onnx.helper.make_graph(
        g.nodes, type(model).__name__, [onnx.helper.make_tensor_value_info("x", elem, ["batch", D])],
        [onnx.helper.make_tensor_value_info("y", elem, ["batch", model.num_tasks])], g.inits,
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="mmoe_fast")
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
