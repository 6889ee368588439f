"""The training run's configuration by component: model, optimisation and schedule, scaling.

Each component is a frozen dataclass a job composes (``jobs.train.TrainConfig`` adds augmentation,
data and run); the command line is generated from their fields, flat (``--lr``, ``--model``), with
the help text in ``metadata["help"]`` and, where the flag is not the field's name, ``metadata["flag"]``.

:class:`ModelArgs` is what a user asks for; :meth:`ModelArgs.resolve` turns it into the
:class:`~mltr.model.MlTrConfig` the run builds, once, on the driver: workers receive that config,
never the arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mltr.errors import ConfigError
from mltr.model import VARIANTS, MlTrConfig


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A config field with its help text (and its flag's name, if not the field's)."""
    return field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


@dataclass(frozen=True)
class ModelArgs:
    """Which model to train: a named variant, a few overrides, and optional starting weights."""

    variant: str = option("mltr_tiny", f"model variant ({', '.join(VARIANTS)})", flag="model")
    image_size: int | None = option(None, "input side in pixels (default: the variant's)")
    window_size: int | None = option(None, "attention window in tokens (default: the variant's)")
    head: Literal["pool", "query"] = option("pool", "classifier head")
    drop_path_rate: float | None = option(None, "stochastic depth (default: the variant's)")
    init_from: str | None = option(None, "start from a Swin (Microsoft or timm layout) or MlTr checkpoint")

    def resolve(self, num_classes: int) -> MlTrConfig:
        """The model's full config for ``num_classes`` classes; raises ``ValueError`` naming what to change."""
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown model {self.variant!r}; choose one of: {', '.join(VARIANTS)}")
        overrides: dict[str, Any] = {"num_classes": num_classes, "head": self.head}
        for name in ("image_size", "window_size", "drop_path_rate"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return dataclasses.replace(VARIANTS[self.variant], **overrides)


@dataclass(frozen=True)
class OptimConfig:
    """Loss, optimiser (AdamW), schedule (OneCycle), EMA and the number of epochs."""

    loss: Literal["asl", "bce", "focal"] = option("asl", "multi-label loss")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(32, "images per worker per step")
    lr: float = option(2e-4, "peak learning rate of the OneCycle schedule (AdamW)")
    warmup: float = option(0.2, "fraction of the optimiser steps that warm the learning rate up")
    weight_decay: float = option(0.05, "AdamW weight decay (not applied to norms, biases, position tables)")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 disables)")
    accumulate: int = option(1, "gradient accumulation steps per optimiser step")
    ema_decay: float = option(0.998, "decay of the EMA of the weights")
    seed: int = option(0, "random seed")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0.0 < self.warmup < 1.0:
            raise ConfigError(f"--warmup must be a fraction in (0, 1), got {self.warmup}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay:g}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be 0 (off) or more, got {self.grad_clip:g}")


@dataclass(frozen=True)
class ScalingArgs:
    """How many Train workers, on what."""

    num_workers: int = option(2, "Ray Train workers (DDP processes)")
    use_gpu: bool = option(False, "GPUs for the workers (one each unless --gpus-per-worker)")
    gpus_per_worker: float = option(1.0, "GPUs each worker reserves with --use-gpu (fractions share a GPU)")
    cpus_per_worker: float = option(1.0, "CPUs each Train worker reserves; the rest feed Ray Data")
    oversubscribe: bool = option(
        False, "on a local Ray, allow workers that need more CPUs than this machine has"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "how the workers' placement group spreads them over nodes (SPREAD: one per node if it can)"
    )
    wait_for_resources: float = option(
        0.0,
        "seconds to wait for an autoscaling cluster to grow to what the run needs (asked of its "
        "autoscaler) before refusing it; 0: refuse a cluster too small at once",
    )

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be positive, got {self.cpus_per_worker}")
        if self.gpus_per_worker <= 0:
            raise ConfigError(f"--gpus-per-worker must be positive, got {self.gpus_per_worker}")
        if self.wait_for_resources < 0:
            raise ConfigError(
                f"--wait-for-resources must be 0 or more seconds, got {self.wait_for_resources:g}"
            )

    def resources_per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.use_gpu else {})}
