"""MlTr: the model, its losses, its metrics and checkpoint I/O.

``create_model("mltr_s", num_classes=80)`` builds a variant (any :class:`MlTrConfig` field can be
overridden), ``load_pretrained(model, path)`` starts it from Swin or MlTr weights.
"""

from mltr.checkpoint import LoadResult, load_checkpoint, load_model, load_pretrained, save_checkpoint
from mltr.losses import build_loss
from mltr.metrics import MetricAccumulator, mean_average_precision
from mltr.model import VARIANTS, MlTr, MlTrConfig, create_model, list_models

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
