"""mmoe_fast: fused Multi-gate Mixture-of-Experts ops, models and training."""

from .backends import describe as describe_backends
from .checkpoint import CheckpointError, load, save
from .inference import InferenceSession, export_onnx
from .models import (
    CGC,
    ESMM,
    MODELS,
    PLE,
    CrossStitch,
    ExtractionLayer,
    L2Constrained,
    MMoE,
    MMoELayer,
    OMoE,
    OMoELayer,
    SharedBottom,
    SingleTask,
    TensorFactorization,
    Towers,
    build_model,
    count_parameters,
)
from .ops import available_backends, decomposed, expert_mixture, gate_softmax, grouped_linear, mmoe
from .train_many import fit_many

__version__ = "0.1.0"

__all__ = [
    "CGC", "ESMM", "MODELS", "PLE", "CheckpointError", "CrossStitch", "ExtractionLayer", "InferenceSession",
    "L2Constrained", "MMoE", "MMoELayer", "OMoE", "OMoELayer", "SharedBottom", "SingleTask", "TensorFactorization",
    "Towers", "available_backends", "build_model", "count_parameters", "decomposed", "describe_backends",
    "expert_mixture", "export_onnx", "fit_many", "gate_softmax", "grouped_linear", "load", "mmoe", "save",
]
