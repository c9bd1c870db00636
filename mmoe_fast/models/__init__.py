"""The multi-task models (``x[B, D] -> [B, T]``), by name in ``MODELS``, and the one way to build them by name.

MMoE, OMoE, the per-task baselines and CGC/PLE run their experts on the fused ops; Shared-Bottom and ESMM's
bottom are plain ``nn.Linear`` MLPs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from .baselines import CrossStitch, L2Constrained, SingleTask, TensorFactorization, TuckerLinear
from .common import TASK_TYPES, MultiTaskModel, Towers
from .esmm import ESMM
from .mmoe import MMoE, MMoELayer, OMoE, OMoELayer
from .ple import CGC, MIXTURES, PLE, ExtractionLayer
from .shared_bottom import SharedBottom

# Every model by its CLI name (and its checkpoint name).
MODELS: dict[str, type[MultiTaskModel]] = {
    "mmoe": MMoE, "omoe": OMoE, "shared-bottom": SharedBottom, "single-task": SingleTask,
    "l2-constrained": L2Constrained, "cross-stitch": CrossStitch, "tensor-factorization": TensorFactorization,
    "esmm": ESMM, "cgc": CGC, "ple": PLE,
}

__all__ = [
    "CGC", "ESMM", "MIXTURES", "MODELS", "PLE", "TASK_TYPES", "CrossStitch", "ExtractionLayer", "L2Constrained",
    "MMoE", "MMoELayer", "MultiTaskModel", "OMoE", "OMoELayer", "SharedBottom", "SingleTask", "TensorFactorization",
    "Towers", "TuckerLinear", "build_model", "count_parameters", "fused_backend", "model_name", "model_options",
]


def model_options(name: str) -> list[str]:
    """The keyword options ``MODELS[name]`` takes besides ``in_features``, ``num_tasks`` and ``task_types``."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    own = set(inspect.signature(MODELS[name].__init__).parameters) - {"self", "in_features", "num_tasks", "task_types"}
    return sorted(own)


def build_model(
    name: str, in_features: int, num_tasks: int, *, task_types: Sequence[str] | None = None, **options,
) -> MultiTaskModel:
    """``MODELS[name](in_features, num_tasks, task_types=task_types, **options)``, mapping ``x[B, in_features]``
    to ``[B, num_tasks]``; an unknown name or an option the model does not take is a ValueError naming it."""
    accepted = model_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} takes no option {', '.join(unknown)} (it takes {', '.join(accepted)})")
    return MODELS[name](in_features, num_tasks, task_types=task_types, **options)


def model_name(model: nn.Module) -> str | None:
    """The name of ``type(model)`` in ``MODELS``, or None for a class that is not registered (a subclass, say)."""
    return next((name for name, cls in MODELS.items() if type(model) is cls), None)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, to size-match models as the paper does."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fused_backend(model: nn.Module) -> str | None:
    """The ``backend`` setting of the model's fused layers, or None when it has none."""
    return next((m.backend for m in model.modules() if isinstance(getattr(m, "backend", None), str)), None)
