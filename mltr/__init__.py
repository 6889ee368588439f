"""MlTr: the model, its losses, its metrics and checkpoint I/O.

``create_model("mltr_s", num_classes=80)`` builds a variant (any :class:`MlTrConfig` field can be
overridden), ``load_pretrained(model, path)`` starts it from Swin or MlTr weights.

The names below are imported on first use (PEP 562): ``import mltr.errors`` (what the data
pipeline's processes need) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name, and the module it lives in.
_EXPORTS = {
    "LoadResult": "mltr.checkpoint",
    "load_checkpoint": "mltr.checkpoint",
    "load_model": "mltr.checkpoint",
    "load_pretrained": "mltr.checkpoint",
    "save_checkpoint": "mltr.checkpoint",
    "build_loss": "mltr.losses",
    "MetricAccumulator": "mltr.metrics",
    "mean_average_precision": "mltr.metrics",
    "VARIANTS": "mltr.model",
    "MlTr": "mltr.model",
    "MlTrConfig": "mltr.model",
    "create_model": "mltr.model",
    "list_models": "mltr.model",
}

__all__ = [
    "VARIANTS",
    "LoadResult",
    "MetricAccumulator",
    "MlTr",
    "MlTrConfig",
    "build_loss",
    "create_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "load_pretrained",
    "mean_average_precision",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from mltr.checkpoint import LoadResult, load_checkpoint, load_model, load_pretrained, save_checkpoint
    from mltr.losses import build_loss
    from mltr.metrics import MetricAccumulator, mean_average_precision
    from mltr.model import VARIANTS, MlTr, MlTrConfig, create_model, list_models


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mltr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
