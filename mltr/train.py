"""The per-worker training loop: one module-level function of a typed config, run by Ray Train.

Each worker builds MlTr, wraps it in DDP (``ray.train.torch.prepare_model``), streams its shard
of the decoded, augmented batches from Ray Data, and every epoch trains, evaluates the model and
its EMA on its shard of ``val``, gathers the metrics across workers, and reports them with a
checkpoint (rank 0 writes it; ``ray.train.report`` is a barrier every worker reaches once per
epoch). Restarts (``FailureConfig.max_failures``, or the same run name started again) resume
from ``ray.train.get_checkpoint()``. Rank 0 logs each epoch to MLflow exactly once.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from mltr import tracking
from mltr.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from mltr.losses import build_loss
from mltr.metrics import MetricAccumulator, best_f1_thresholds, mean_average_precision
from mltr.model import MlTr, create_model
from pipeline.ingest import epoch_batches, normalize

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"  # optimiser, scheduler, scaler, EMA, epoch, RNG, history
MODEL_FILE = "model.pt"  # MlTr's own checkpoint format: mltr.load_model() rebuilds it
EMA_FILE = "model_ema.pt"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, TRAIN_STATE)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class TrainConfig:
    """Train MlTr on a converted dataset with Ray Train (DDP) and track it in MLflow."""

    data: str = _help("converted dataset: <out>/<dataset> as written by preprocess (local or s3://)", "")
    model: str = _help("model variant (mltr_tiny, mltr_s, mltr_m, mltr_l, mltr_xl)", "mltr_tiny")
    image_size: int | None = _help("input side in pixels (default: the variant's)", None)
    window_size: int | None = _help("attention window in tokens (default: the variant's)", None)
    head: Literal["pool", "query"] = _help("classifier head", "pool")
    loss: Literal["asl", "bce", "focal"] = _help("multi-label loss", "asl")
    epochs: int = _help("training epochs", 10)
    batch_size: int = _help("images per worker per step", 32)
    lr: float = _help("peak learning rate of the OneCycle schedule (AdamW)", 2e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to norms, biases, position tables)", 0.05)
    grad_clip: float = _help("clip the gradient norm to this (0 disables)", 1.0)
    accumulate: int = _help("gradient accumulation steps per optimiser step", 1)
    ema_decay: float = _help("decay of the EMA of the weights", 0.998)
    drop_path_rate: float | None = _help("stochastic depth (default: the variant's)", None)
    randaugment: bool = _help("RandAugment in the training transforms", True)
    crop_min_scale: float = _help("smallest image area a random crop keeps (1.0: no cropping)", 0.5)
    cutout_p: float = _help("probability of a cutout rectangle (random erasing) per image", 0.5)
    shuffle_buffer: int = _help("rows in each worker's local shuffle buffer", 256)
    num_workers: int = _help("Ray Train workers (DDP processes)", 2)
    use_gpu: bool = _help("one GPU per worker", False)
    cpus_per_worker: float = _help("CPUs each Train worker reserves; the rest feed Ray Data", 1.0)
    decode_actors: int | None = _help(
        "Ray Data actors (one CPU each) decoding and augmenting the training stream "
        "(default: the cluster's CPUs beside the Train workers, less one for validation)",
        None,
    )
    workdir: str = _help("local folder for the embedded defaults (Ray results, MLflow SQLite store)", "work")
    storage: str | None = _help(
        "checkpoints and Ray results: a folder or s3://bucket/prefix (default: <workdir>/ray_results)", None
    )
    name: str | None = _help(
        "run name; the same name again resumes it (default: <dataset>-<model>-<time>)", None
    )
    max_failures: int = _help("worker failures survived by restarting from the last checkpoint", 0)
    init_from: str | None = _help("start from a Swin (Microsoft or timm layout) or MlTr checkpoint", None)
    mlflow_uri: str | None = _help(
        "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in workdir)", None
    )
    experiment: str = _help("MLflow experiment", "mltr")
    seed: int = _help("random seed", 0)
    address: str | None = _help("Ray address (default: RAY_ADDRESS, else a local Ray)", None)

    def __post_init__(self):
        if not self.data:
            raise ValueError("--data is required: the converted dataset, <out>/<dataset>")
        for name in ("epochs", "batch_size", "accumulate", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.decode_actors is not None and self.decode_actors < 1:
            raise ValueError(f"--decode-actors must be at least 1, got {self.decode_actors}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")

    def model_overrides(self, num_classes: int) -> dict[str, Any]:
        overrides: dict[str, Any] = {"num_classes": num_classes, "head": self.head}
        for name in ("image_size", "window_size", "drop_path_rate"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        return overrides


@dataclass(frozen=True)
class LoopContext:
    """What the driver resolves once and every worker needs (passed through ``train_loop_config``)."""

    config: TrainConfig
    num_classes: int
    image_size: int
    train_rows: int
    mlflow_uri: str
    mlflow_run_id: str


class SplitDataConfig(ray.train.DataConfig):
    """How the datasets reach the workers: ``train`` split equally, the others so every row is read once.

    DDP needs the same number of steps on every worker, so the training stream is split with
    ``equal=True`` (as Ray Train does for every dataset). Evaluation needs every row once, and
    ``equal=True`` drops up to ``world_size - 1`` of them: the other datasets are split with
    ``equal=False``; their metrics are gathered across workers, whatever each worker got.
    """

    def __init__(self, equal: tuple[str, ...] = ("train",)):
        super().__init__(datasets_to_split=list(equal))
        self.equal = frozenset(equal)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = super().configure(
            {name: ds for name, ds in datasets.items() if name in self.equal},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if name in self.equal:
                continue
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = split
        return output


# --- pieces of the loop, each testable on its own -----------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights, none on ``no_weight_decay()`` parameters."""
    module = unwrap(model)
    skip = module.no_weight_decay()
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def optimizer_steps(train_rows: int, world_size: int, batch_size: int, accumulate: int, epochs: int) -> int:
    """Optimiser steps of the whole run on each worker: every epoch ends with a step."""
    return sum(
        math.ceil(epoch_batches(train_rows, world_size, batch_size, epoch) / accumulate)
        for epoch in range(epochs)
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """OneCycle over the run with a 20% warm-up; a run of under 3 steps keeps the peak rate.

    OneCycle divides by the length of each phase, so its warm-up must span more than one step:
    short runs (a 1-epoch fine-tune of a small dataset) get a longer warm-up fraction.
    """
    if total_steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=max(0.2, 1.5 / total_steps)
    )


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    module = unwrap(model)
    return torch.optim.swa_utils.AveragedModel(
        module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def forward_backward(
    model: nn.Module,
    criterion: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    accumulate: int,
) -> float:
    """One micro-batch: normalise the uint8 images on the device, forward, loss, backward; returns the loss."""
    images = normalize(batch["image"].to(device, non_blocking=True))
    with autocast(device):
        logits = model(images)
    loss = (
        criterion(logits.float(), batch["targets"].to(device), batch["ignore_mask"].to(device)) / accumulate
    )
    loss.backward()
    return loss.item() * accumulate


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ema: torch.optim.swa_utils.AveragedModel | None,
    grad_clip: float,
) -> None:
    """Clip, step, advance the schedule (never past its end) and the EMA."""
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None and scheduler.last_epoch < getattr(scheduler, "total_steps", math.inf):
        scheduler.step()
    if ema is not None:
        ema.update_parameters(unwrap(model))


def micro_pr_curve(logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor, points: int = 200):
    """Micro-averaged precision-recall curve over all non-ignored entries, thinned to about ``points``."""
    keep = ~ignore.bool()
    scores, positive = logits[keep].float(), targets[keep].bool()
    order = torch.argsort(scores, descending=True)
    hits = positive[order].double().cumsum(0)
    ranks = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    precision = hits / ranks
    recall = hits / max(float(positive.sum()), 1.0)
    step = max(1, hits.numel() // points)
    return recall[::step].tolist(), precision[::step].tolist()


def label_frequency_baseline(
    train_targets: np.ndarray, val_targets: np.ndarray, val_ignore: np.ndarray
) -> float:
    """mAP of scoring every validation image with the classes' training frequencies (a model that sees nothing)."""
    frequency = train_targets.mean(axis=0, keepdims=True)
    scores = np.broadcast_to(frequency, val_targets.shape).copy()
    return mean_average_precision(scores, val_targets, val_ignore)[0]


def evaluate(models: dict[str, nn.Module], batches, device: torch.device) -> dict[str, MetricAccumulator]:
    """Run every model over the batches; one accumulator per model, gathered across workers."""
    accumulators = {name: MetricAccumulator() for name in models}
    for model in models.values():
        model.eval()
    with torch.no_grad():
        for batch in batches:
            images = normalize(batch["image"].to(device, non_blocking=True))
            for name, model in models.items():
                with autocast(device):
                    logits = model(images)
                accumulators[name].update(logits.float().cpu(), batch["targets"], batch["ignore_mask"])
    return {name: acc.gather() for name, acc in accumulators.items()}


# --- the loop -----------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker; ``loop_config["ctx"]`` is a :class:`LoopContext`."""
    ctx: LoopContext = loop_config["ctx"]
    cfg = ctx.config
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    model: MlTr = create_model(cfg.model, **cfg.model_overrides(ctx.num_classes))
    if cfg.init_from:
        missing, unexpected = load_pretrained(model, cfg.init_from)
        if rank == 0:
            log.info(
                "init from %s: %d missing, %d unexpected keys", cfg.init_from, len(missing), len(unexpected)
            )
    model = ray.train.torch.prepare_model(model)
    ema = make_ema(model, cfg.ema_decay).to(device)
    criterion = build_loss(cfg.loss)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    total_steps = optimizer_steps(ctx.train_rows, world, cfg.batch_size, cfg.accumulate, cfg.epochs)
    scheduler = make_scheduler(optimizer, cfg.lr, total_steps)
    # bf16 needs no loss scaling; the scaler is kept (disabled) so fp16 can be switched on without a new format.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    start_epoch, history, best = 0, [], {"val_mAP": -1.0, "epoch": -1}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAIN_STATE, map_location="cpu", weights_only=False)
            unwrap(model).load_state_dict(load_checkpoint(Path(folder) / MODEL_FILE)["state_dict"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", state["epoch"])

    client = MlflowClient(ctx.mlflow_uri) if rank == 0 else None
    if client is not None:
        # Epochs checkpointed but not logged (the worker died in between) are logged now.
        for record in history:
            tracking.log_epoch(client, ctx.mlflow_run_id, record["epoch"], record["metrics"])

    # The train split is one stream of all the epochs (see pipeline.ingest), read by one iterator
    # and cut into epochs by batch count; after a restart it starts again from its first pass.
    train_stream = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None
        )
    )
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        ema.train()
        started, seen, loss_sum, wait = time.perf_counter(), 0, 0.0, 0.0
        batches = epoch_batches(ctx.train_rows, world, cfg.batch_size, epoch)
        optimizer.zero_grad(set_to_none=True)
        for i in range(batches):
            fetch = time.perf_counter()
            batch = next(train_stream, None)
            if batch is None:
                raise RuntimeError(
                    f"the training stream ended in epoch {epoch} after {i} of {batches} batches"
                )
            wait += time.perf_counter() - fetch
            loss_sum += forward_backward(model, criterion, batch, device, cfg.accumulate)
            if (i + 1) % cfg.accumulate == 0 or i + 1 == batches:  # every epoch ends with a step
                optimizer_step(model, optimizer, scheduler, ema, cfg.grad_clip)
            seen += batch["image"].shape[0]
        train_seconds = time.perf_counter() - started

        val_batches = val_shard.iter_torch_batches(batch_size=cfg.batch_size * 2)
        # Unwrapped: evaluation needs no DDP, and workers may hold different numbers of val rows.
        results = evaluate({"model": unwrap(model), "ema": ema.module}, val_batches, device)
        model_metrics = results["model"].compute()
        ema_metrics = results["ema"].compute()
        chosen_name, chosen = max((("model", model_metrics), ("ema", ema_metrics)), key=lambda kv: kv[1].mAP)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / batches,
            "train_images_per_s_per_worker": seen / max(train_seconds, 1e-9),
            "data_wait_s": wait,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"val_{k}": v for k, v in model_metrics.as_dict().items()},
            **{f"val_ema_{k}": v for k, v in ema_metrics.as_dict().items()},
            "val_best_of_mAP": chosen.mAP,
            "val_images": len(results["model"]),
        }
        is_best = chosen.mAP > best["val_mAP"]
        if is_best:
            best = {"val_mAP": chosen.mAP, "epoch": epoch, "weights": chosen_name}
        history.append({"epoch": epoch, "metrics": metrics})

        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                module = unwrap(model)
                logits, targets, ignore = results[chosen_name].tensors()
                thresholds = best_f1_thresholds(logits, targets, ignore)
                pr_curve = micro_pr_curve(logits, targets, ignore)
                extra = {"epoch": epoch, "metrics": metrics, "thresholds": thresholds.tolist()}
                save_checkpoint(module, Path(folder) / MODEL_FILE, extra=extra)
                save_checkpoint(ema.module, Path(folder) / EMA_FILE, extra=extra)
                torch.save(
                    {
                        "epoch": epoch,
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": rng_state(),
                        "history": history,
                        "best": best,
                        "per_class_ap": {
                            "model": model_metrics.per_class_ap.tolist(),
                            "ema": ema_metrics.per_class_ap.tolist(),
                        },
                        "thresholds": thresholds.tolist(),
                        "pr_curve": pr_curve,
                        "weights": chosen_name,
                    },
                    Path(folder) / TRAIN_STATE,
                )
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if client is not None:
            tracking.log_epoch(client, ctx.mlflow_run_id, epoch, metrics)
            log.info(
                "epoch %d: loss %.4f, val mAP %.4f (EMA %.4f), %.0f images/s/worker",
                epoch,
                metrics["train_loss"],
                model_metrics.mAP,
                ema_metrics.mAP,
                metrics["train_images_per_s_per_worker"],
            )
