"""The per-worker training loop: one module-level function of a typed config, run by Ray Train.

Each worker builds MlTr from the resolved :class:`~mltr.model.MlTrConfig` it is handed, wraps it in
DDP (``ray.train.torch.prepare_model``), streams its shard of the decoded, augmented batches from
Ray Data, and every epoch trains, then evaluates the model and its EMA on the calibration split and
on ``val``, gathers the metrics across workers, and reports them with a checkpoint (rank 0 writes
it; ``ray.train.report`` is a barrier every worker reaches once per epoch). Restarts
(``FailureConfig.max_failures``, or the same run name started again) resume from
``ray.train.get_checkpoint()``. Rank 0 logs each epoch to MLflow exactly once.

Model selection is honest: the calibration split (a slice of ``train`` that is never trained on)
chooses the weights (model or EMA), their per-class thresholds and, across epochs, the best epoch
(:data:`SELECTION_METRIC`); ``val`` is only reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from torch import nn

from mltr import tracking
from mltr.checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    Selection,
    TrainState,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from mltr.config import OptimConfig
from mltr.errors import TrainingDiverged
from mltr.losses import build_loss
from mltr.metrics import MetricAccumulator, MetricResult, best_f1_thresholds, mean_average_precision
from mltr.model import MlTr, MlTrConfig, autocast, normalize

log = logging.getLogger(__name__)

# Reported every epoch: the calibration mAP of the weights that epoch would ship. It ranks the
# checkpoints (the best one is the run's model) and is what a sweep's scheduler compares.
SELECTION_METRIC = "selection_mAP"
# Epochs trained so far, resumes included: the time a sweep's scheduler counts in (Tune's own
# training_iteration starts again at 1 when a trial is restored).
EPOCHS_DONE_KEY = "epochs_done"
START_EPOCH_KEY = "start_epoch"  # logged by every start of the loop: a resume shows where it began


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs, resolved once on the driver (``train_loop_config["loop"]``, as plain data)."""

    model: MlTrConfig
    optim: OptimConfig
    train_rows: int  # rows trained on per epoch: the train split less its calibration slice
    shuffle_buffer: int  # rows in each worker's local shuffle buffer (0: none)
    mlflow_uri: str
    mlflow_run_id: str
    init_from: str | None = None  # Swin or MlTr weights to start from (a fresh run only)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``train_loop_config`` carries); :meth:`from_dict` rebuilds it."""
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "model": dataclasses.asdict(self.model),
            "optim": dataclasses.asdict(self.optim),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        return cls(**{**data, "model": MlTrConfig(**data["model"]), "optim": OptimConfig(**data["optim"])})


# --- pieces of the loop, each testable on its own -----------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_input(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch's uint8 images on ``device``, normalised by the model's own input contract."""
    config: MlTrConfig = unwrap(model).config
    return normalize(batch["image"].to(device, non_blocking=True), config.mean, config.std)


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


def epoch_batches(rows: int, world_size: int, batch_size: int, epoch: int) -> int:
    """Batches each of ``world_size`` consumers takes from a multi-pass stream in ``epoch``.

    A stream of ``rows`` per pass, split equally, holds ``floor(passes * rows / world_size)`` rows
    per consumer. Taking ``floor((epoch + 1) * rows / (world_size * batch_size))`` full batches by
    the end of ``epoch`` keeps every consumer at the same count (DDP needs equal steps), never
    asks for more than the stream holds, and loses less than one batch per consumer over the run.
    """
    per_step = world_size * batch_size
    if rows < per_step:
        raise ValueError(
            f"{rows} rows per epoch cannot fill one batch of {batch_size} on each of {world_size} workers"
        )
    return (epoch + 1) * rows // per_step - epoch * rows // per_step


def optimizer_steps(train_rows: int, world_size: int, batch_size: int, accumulate: int, epochs: int) -> int:
    """Optimiser steps of the whole run on each worker: every epoch ends with a step."""
    return sum(
        math.ceil(epoch_batches(train_rows, world_size, batch_size, epoch) / accumulate)
        for epoch in range(epochs)
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup: float = 0.2
) -> torch.optim.lr_scheduler.LRScheduler:
    """OneCycle over the run, warming up for a ``warmup`` fraction; a run of under 3 steps keeps the peak rate.

    OneCycle divides by the length of each phase, so both phases must span more than one step:
    short runs (a 1-epoch fine-tune of a small dataset) get a warm-up of at least 1.5 steps and
    a decay of at least as much.
    """
    if total_steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    pct_start = min(max(warmup, 1.5 / total_steps), 1.0 - 1.5 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start
    )


# What a schedule keeps in each optimizer group (OneCycle's rates and momenta, LambdaLR's base rate).
SCHEDULE_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state but keep the keys this run's scheduler set in its groups.

    ``load_state_dict`` replaces every group's settings with the checkpoint's. The schedule is this
    run's (:func:`restore_schedule`): a run extended past 3 steps (OneCycle) from a checkpoint of a
    shorter one (a constant rate) would otherwise lose ``max_lr`` and start its warm-up from the
    constant rate's ``initial_lr``. A run on its checkpoint's own schedule has the same keys anyway.
    """
    own = [{key: group[key] for key in SCHEDULE_KEYS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, own, strict=True):
        group.update(keys)


def restore_schedule(
    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any], steps_done: int
) -> None:
    """Load a checkpoint's schedule (after its optimizer): the same schedule continues where it stopped.

    A run whose schedule is not its checkpoint's (extended with more epochs, or resumed on another
    number of workers) continues on its own at ``steps_done``, the steps its finished epochs take in
    this run's shape, as a schedule defined over epochs does (timm's). An extended run's learning
    rate goes back to where the longer OneCycle is at that point and anneals to the new end,
    rather than staying at the finished schedule's final rate (the peak / 25e4).
    """
    total = getattr(scheduler, "total_steps", None)
    if total is None or state.get("total_steps") == total:
        scheduler.load_state_dict(state)
        return
    # This run's schedule at the step before (with the checkpoint's step count, so torch sees a
    # scheduler that has stepped before); one step on sets the optimizer's rates.
    scheduler.load_state_dict(
        {
            **scheduler.state_dict(),
            "last_epoch": min(steps_done, total) - 1,
            "_step_count": state["_step_count"],
        }
    )
    scheduler.step()


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An EMA of the model's parameters and floating-point buffers (BatchNorm's statistics).

    Integer buffers (the windows' relative position indices, BatchNorm's step count) are copied:
    averaged, ``v * decay + v * (1 - decay)`` in float32 truncates back to ``v - 1`` for many
    decays (0.9999 among them), and the EMA then reads the wrong position biases.
    """
    floats = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)

    def average(ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor], n_averaged) -> None:
        if ema_tensors[0].is_floating_point():  # AveragedModel groups the tensors by dtype
            floats(ema_tensors, model_tensors, n_averaged)
        else:
            for ema_tensor, model_tensor in zip(ema_tensors, model_tensors, strict=True):
                ema_tensor.copy_(model_tensor)

    return torch.optim.swa_utils.AveragedModel(unwrap(model), multi_avg_fn=average, use_buffers=True)


def rng_state() -> dict[str, Any]:
    """This process's random generators as plain containers and tensors (loadable with ``weights_only``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order, on every rank (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_state(states: list[dict[str, Any]], rank: int, seed: int) -> bool:
    """Restore this rank's own generators from a checkpoint's per-rank states; returns whether it could.

    A rank the checkpoint has no state for (the run resumed on more workers) is seeded afresh from
    ``seed`` and its rank instead, so no two ranks ever draw the same numbers.
    """
    if rank < len(states):
        set_rng_state(states[rank])
        return True
    seed_everything(seed + rank + 7919 * len(states))
    return False


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def accumulation(i: int, batches: int, accumulate: int) -> tuple[int, bool]:
    """(micro-batches in the optimizer step that batch ``i`` of an epoch of ``batches`` joins,
    whether batch ``i`` ends that step). A step every ``accumulate`` batches, and every epoch ends
    with one: its last step may gather fewer, and each of its losses is divided by that number,
    so that its gradient is their mean too, not a fraction of it."""
    start = i - i % accumulate
    size = min(accumulate, batches - start)
    return size, i + 1 == start + size


def forward_backward(
    model: nn.Module,
    criterion: nn.Module,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    accumulate: int,
    sync: bool = True,
) -> float:
    """One micro-batch: normalise the uint8 images on the device, forward, loss, backward; returns the loss.

    ``accumulate`` is the number of micro-batches of the step this one joins (see
    :func:`accumulation`): the loss is divided by it, so the step's gradient is their mean.

    ``sync=False`` on the micro-batches before the last of an accumulation: a DDP model then skips
    its gradient all-reduce (``no_sync``), which the last micro-batch does for all of them.
    A loss that is not a number is returned as it is: :func:`any_rank_diverged` decides, at the
    step, with the other workers, and no step takes it.
    """
    skip = not sync and isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if skip else contextlib.nullcontext():
        images = model_input(model, batch, device)
        with autocast(device):
            logits = model(images)
        loss = (
            criterion(logits.float(), batch["targets"].to(device), batch["ignore_mask"].to(device))
            / accumulate
        )
        loss.backward()
    return loss.item() * accumulate  # after backward: the host waits for it once the step is queued


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every worker: one all-reduce, and every worker gets the answer."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_over_ranks(total: float, count: int, device: torch.device) -> float:
    """``sum(total) / sum(count)`` over the workers (one all-reduce; every worker gets it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return total / max(count, 1)
    value = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    return value[0].item() / max(value[1].item(), 1.0)


def any_rank_diverged(finite: bool, device: torch.device) -> bool:
    """Whether any worker's loss since the last step is not finite; every worker gets the same answer.

    All stop at the same step: one that raised alone would leave the others waiting in their next
    all-reduce until Ray Train tore the group down, and a worker's exception is a failure that
    ``--max-failures`` retries, though a diverged run diverges again. The loop returns instead
    (:func:`diverged`), and :func:`mltr.trainer.fit` raises it on the driver.
    """
    return not all_ranks(finite, device)


def diverged(epoch: int, epochs: int, batch: int, lr: float, loss: float) -> TrainingDiverged:
    """What the loop returns when training diverged: where, at which learning rate, what to change."""
    what = (
        f"the training loss is {loss}"
        if not math.isfinite(loss)
        else "another worker's training loss is not a number"
    )
    return TrainingDiverged(
        f"epoch {epoch + 1} of {epochs}, batch {batch + 1}, lr {lr:.3g}: {what}: training diverged; "
        "lower --lr, or pass --grad-clip"
    )


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


EVAL_KEEP_BYTES = 256 * 2**20  # per worker and split: evaluation batches kept in memory across epochs


class EvalBatches:
    """One evaluation split's batches on this worker, every epoch: streamed in the first, and kept
    for the others when every worker's share fits in ``limit_bytes``.

    Evaluation rows are not augmented, so each epoch reads what the first read; streaming them
    again costs a Ray Data execution (read and decode tasks) per split and epoch: 0.7 s of the
    1.2-1.4 s an epoch's evaluation took on the demo's data with 2 workers. Whether to keep them
    is decided by all workers together, after the first epoch: the split is dynamic
    (``equal=False``), and a worker streaming while another replayed its batches would be handed
    the other's rows as well, and count them twice.
    """

    def __init__(self, shard, batch_size: int, device: torch.device, limit_bytes: int = EVAL_KEEP_BYTES):
        self.shard, self.batch_size, self.device, self.limit_bytes = shard, batch_size, device, limit_bytes
        self.kept: list[dict[str, torch.Tensor]] | None = None
        self.decided = False  # after the first epoch: keep (self.kept) or stream every epoch

    def __iter__(self):
        if self.decided:
            yield from self.kept if self.kept is not None else self.stream()
            return
        kept: list | None = []
        size = 0
        for batch in self.stream():
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in batch.values() if torch.is_tensor(t))
                if size <= self.limit_bytes:
                    kept.append(batch)
                else:
                    kept = None  # too large to keep: streamed every epoch
            yield batch
        # Reached by every worker at the same point: evaluate() reads each split to its end.
        self.decided = True
        self.kept = kept if all_ranks(kept is not None, self.device) else None

    def stream(self):
        # On the CPU: the metrics accumulate there, and kept batches hold no accelerator memory.
        return self.shard.iter_torch_batches(batch_size=self.batch_size, device="cpu")


def evaluate(models: dict[str, nn.Module], batches, device: torch.device) -> dict[str, MetricAccumulator]:
    """Run every model over the batches; one accumulator per model, gathered across workers.

    The models share one input contract (the model and its EMA): images are normalised once.
    """
    accumulators = {name: MetricAccumulator() for name in models}
    for model in models.values():
        model.eval()
    first = next(iter(models.values()))
    with torch.no_grad():
        for batch in batches:
            images = model_input(first, batch, device)
            for name, model in models.items():
                with autocast(device):
                    logits = model(images)
                accumulators[name].update(logits.float().cpu(), batch["targets"], batch["ignore_mask"])
    return {name: acc.gather() for name, acc in accumulators.items()}


def select(
    calib: dict[str, MetricAccumulator], val: dict[str, MetricAccumulator]
) -> tuple[Selection, dict[str, MetricResult], dict[str, MetricResult]]:
    """Choose the weights on the calibration split; fit their thresholds there; score them on val.

    ``calib`` and ``val`` hold one gathered accumulator per model (``"model"``, ``"ema"``). Returns
    the selection and every model's calibration and val metrics at the default threshold (the
    per-epoch curves).
    """
    calib_results = {name: acc.compute() for name, acc in calib.items()}
    chosen = max(calib_results, key=lambda name: calib_results[name].mAP)
    logits, targets, ignore = calib[chosen].tensors()
    thresholds = best_f1_thresholds(logits, targets, ignore)
    val_results = {name: acc.compute() for name, acc in val.items()}
    at_thresholds = val[chosen].compute(threshold=thresholds)
    val_logits, val_targets, val_ignore = val[chosen].tensors()
    selection = Selection(
        weights=chosen,
        calib_mAP=calib_results[chosen].mAP,
        thresholds=thresholds.tolist(),
        val=at_thresholds.as_dict(),
        calib_per_class_ap=calib_results[chosen].per_class_ap.tolist(),
        val_per_class_ap=at_thresholds.per_class_ap.tolist(),
        val_pr_curve=micro_pr_curve(val_logits, val_targets, val_ignore),
    )
    return selection, calib_results, val_results


# --- the loop -----------------------------------------------------------------------------------------


def log_start(client: MlflowClient, run_id: str, history: list[dict[str, Any]], start_epoch: int) -> None:
    """What a start of the run logs before it trains: the epochs its checkpoint holds that MLflow
    lacks (the worker died between the two, or the store is new), then where it starts (0, then
    the epoch after each checkpoint it resumed from)."""
    for record in history:
        tracking.log_epoch(client, run_id, record["epoch"], record["metrics"])
    client.log_metric(run_id, START_EPOCH_KEY, start_epoch, step=start_epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> TrainingDiverged | None:
    """Ray Train's entry point on every worker; ``loop_config["loop"]`` is a :meth:`LoopConfig.to_dict`.

    Returns (on every worker, at the same step) a :class:`~mltr.errors.TrainingDiverged` when the
    training loss stopped being a number: rank 0's is ``Result.return_value``.
    """
    cfg = LoopConfig.from_dict(loop_config["loop"])
    opt = cfg.optim
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(opt.seed + rank)

    model = MlTr(cfg.model)
    if cfg.init_from:
        missing, unexpected = load_pretrained(model, cfg.init_from)
        if rank == 0:
            log.info(
                "init from %s: %d missing, %d unexpected keys", cfg.init_from, len(missing), len(unexpected)
            )
    model = ray.train.torch.prepare_model(model)
    ema = make_ema(model, opt.ema_decay).to(device)
    criterion = build_loss(opt.loss)
    optimizer = torch.optim.AdamW(param_groups(model, opt.weight_decay), lr=opt.lr)
    total_steps = optimizer_steps(cfg.train_rows, world, opt.batch_size, opt.accumulate, opt.epochs)
    scheduler = make_scheduler(optimizer, opt.lr, total_steps, opt.warmup)
    # bf16 needs no loss scaling; the scaler is kept (disabled) so fp16 can be switched on without a new format.
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    start_epoch, history, best_epoch, best_score = 0, [], -1, -math.inf

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = TrainState.load(Path(folder) / STATE_FILE)
            unwrap(model).load_state_dict(load_checkpoint(Path(folder) / MODEL_FILE)["state_dict"])
        ema.load_state_dict(state.ema)
        restore_optimizer(optimizer, state.optimizer)
        done = optimizer_steps(cfg.train_rows, world, opt.batch_size, opt.accumulate, state.epoch + 1)
        restore_schedule(scheduler, state.scheduler, done)
        scaler.load_state_dict(state.scaler)
        if not restore_rng_state(state.rng, rank, opt.seed) and rank == 0:
            log.info("the checkpoint holds RNG states for %d workers; the others start fresh", len(state.rng))
        start_epoch, history = state.epoch + 1, state.history
        best_epoch, best_score = state.best_epoch, state.best_calib_mAP
        if rank == 0:
            log.info("resuming from the checkpoint of epoch %d", state.epoch)

    client = MlflowClient(cfg.mlflow_uri) if rank == 0 else None
    if client is not None:
        log_start(client, cfg.mlflow_run_id, history, start_epoch)

    # The train split is one stream of all the epochs (see pipeline.ingest), read by one iterator
    # and cut into epochs by batch count; after a restart it starts again from its first pass.
    train_stream = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=opt.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None
        )
    )
    calib_batches, val_batches = (
        EvalBatches(ray.train.get_dataset_shard(name), opt.batch_size * 2, device)
        for name in ("calib", "val")
    )
    for epoch in range(start_epoch, opt.epochs):
        model.train()
        ema.train()
        started, seen, loss_sum, wait = time.perf_counter(), 0, 0.0, 0.0
        batches = epoch_batches(cfg.train_rows, world, opt.batch_size, epoch)
        optimizer.zero_grad(set_to_none=True)
        bad_loss = 0.0  # the first loss since the last step that is not a number, if any
        for i in range(batches):
            fetch = time.perf_counter()
            batch = next(train_stream, None)
            if batch is None:
                raise RuntimeError(
                    f"the training stream ended in epoch {epoch} after {i} of {batches} batches"
                )
            wait += time.perf_counter() - fetch
            group, step = accumulation(i, batches, opt.accumulate)
            value = forward_backward(model, criterion, batch, device, group, sync=step)
            loss_sum += value
            if not math.isfinite(value) and math.isfinite(bad_loss):
                bad_loss = value
            if step:
                if any_rank_diverged(math.isfinite(bad_loss), device):  # no step takes it
                    return diverged(epoch, opt.epochs, i, optimizer.param_groups[0]["lr"], bad_loss)
                optimizer_step(model, optimizer, scheduler, ema, opt.grad_clip)
            seen += batch["image"].shape[0]
        train_seconds = time.perf_counter() - started
        train_loss = mean_over_ranks(loss_sum, batches, device)  # every worker's, not rank 0's alone

        # Unwrapped: evaluation needs no DDP, and workers may hold different numbers of rows.
        models = {"model": unwrap(model), "ema": ema.module}
        calib = evaluate(models, calib_batches, device)
        val = evaluate(models, val_batches, device)
        selection, calib_results, val_results = select(calib, val)
        if selection.calib_mAP > best_score:
            best_epoch, best_score = epoch, selection.calib_mAP
        metrics = {
            "epoch": epoch,
            EPOCHS_DONE_KEY: epoch + 1,
            "train_loss": train_loss,
            "train_images_per_s_per_worker": seen / max(train_seconds, 1e-9),
            "data_wait_s": wait,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"calib_{name}_mAP": result.mAP for name, result in calib_results.items()},
            SELECTION_METRIC: selection.calib_mAP,
            "calib_images": len(calib["model"]),
            **{
                f"val_{name}_{k}": v
                for name, result in val_results.items()
                for k, v in result.as_dict().items()
            },
            "val_selected_mAP": selection.val_mAP,
            "val_images": len(val["model"]),
        }
        history.append({"epoch": epoch, "metrics": metrics})

        rng = gather_rng_states()  # every rank's own generators, saved with the checkpoint
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                extra = {"epoch": epoch, "thresholds": selection.thresholds}
                save_checkpoint(unwrap(model), Path(folder) / MODEL_FILE, extra=extra)
                save_checkpoint(ema.module, Path(folder) / EMA_FILE, extra=extra)
                TrainState(
                    epoch=epoch,
                    selection=selection,
                    best_epoch=best_epoch,
                    best_calib_mAP=best_score,
                    history=history,
                    rng=rng,
                    ema=ema.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(),
                ).save(Path(folder) / STATE_FILE)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)
        if client is not None:
            tracking.log_epoch(client, cfg.mlflow_run_id, epoch, metrics)
            log.info(
                "epoch %d: loss %.4f, calibration mAP %.4f (%s), val mAP %.4f (model %.4f, EMA %.4f), "
                "%.0f images/s/worker",
                epoch,
                metrics["train_loss"],
                selection.calib_mAP,
                selection.weights,
                selection.val_mAP,
                metrics["val_model_mAP"],
                metrics["val_ema_mAP"],
                metrics["train_images_per_s_per_worker"],
            )
