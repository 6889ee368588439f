"""The trainer builder that ``jobs.train`` and the sweeps share: one resolved run in, one ``TorchTrainer`` out.

    run = TrainRun(name, model=MlTrConfig, optim=OptimConfig, data=DataPlan, scaling=ScalingArgs,
                   storage_path=..., mlflow_uri=..., mlflow_run_id=...)
    result = fit(build_trainer(run))
    best = best_checkpoint(result)           # ranked by the calibration split's mAP

Everything here is resolved on the driver: the model config, the datasets (built by the caller
from the dataset's manifest, read once), the storage and the MLflow run. The workers receive a
:class:`~mltr.train.LoopConfig` holding only what they use. The caller may add Ray Train callbacks
(a Tune sweep adds ``TuneReportCallback``); there is one training loop, :func:`mltr.train.train_loop_per_worker`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.data
import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from mltr import tracking
from mltr.checkpoint import STATE_FILE, TrainState
from mltr.config import OptimConfig, ScalingArgs
from mltr.data_config import SplitDataConfig
from mltr.errors import TrainingDiverged
from mltr.model import MlTrConfig
from mltr.train import SELECTION_METRIC, LoopConfig, log_start, train_loop_per_worker

# Datasets a run reads: the training stream, the calibration slice of train, and val (reported only).
DATASETS = ("train", "calib", "val")


@dataclass(frozen=True)
class DataPlan:
    """The run's datasets (lazy Ray Datasets built on the driver) and what the loop needs to know of them."""

    datasets: Mapping[str, ray.data.Dataset]  # DATASETS: "train" is a stream of every epoch
    train_rows: int  # rows of one pass of the training stream (train less its calibration slice)
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: none)

    def __post_init__(self):
        if set(self.datasets) != set(DATASETS):
            raise ValueError(f"a run needs the datasets {DATASETS}, got {sorted(self.datasets)}")


@dataclass(frozen=True)
class TrainRun:
    """One training run, resolved: what :func:`build_trainer` turns into a ``TorchTrainer``."""

    name: str  # the Train run's name: the same (storage_path, name) again resumes it
    model: MlTrConfig
    optim: OptimConfig
    data: DataPlan
    scaling: ScalingArgs
    storage_path: str  # a local folder, or a path on storage_filesystem
    mlflow_uri: str
    mlflow_run_id: str
    storage_filesystem: pafs.FileSystem | None = None  # None: storage_path is local
    max_failures: int = 0  # worker failures survived by restarting from the last checkpoint
    init_from: str | None = None

    def loop_config(self) -> LoopConfig:
        return LoopConfig(
            model=self.model,
            optim=self.optim,
            train_rows=self.data.train_rows,
            shuffle_buffer=self.data.shuffle_buffer,
            mlflow_uri=self.mlflow_uri,
            mlflow_run_id=self.mlflow_run_id,
            init_from=self.init_from,
        )


def build_trainer(run: TrainRun, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The ``TorchTrainer`` of ``run``: DDP workers running the one training loop, checkpoints ranked
    by :data:`~mltr.train.SELECTION_METRIC`, ``callbacks`` added to its ``RunConfig``."""
    return TorchTrainer(
        train_loop_per_worker,
        # Plain data: Ray Train's controller and DatasetManager unpickle the config (and the data
        # config) though only the workers use it; a LoopConfig would import torch and MLflow into
        # both (~3 s and ~600 MB each, every run).
        train_loop_config={"loop": run.loop_config().to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.scaling.num_workers,
            use_gpu=run.scaling.use_gpu,
            resources_per_worker=run.scaling.resources_per_worker(),
            placement_strategy=run.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=run.storage_path,
            storage_filesystem=run.storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SELECTION_METRIC, checkpoint_score_order="max"
            ),
            callbacks=list(callbacks) or None,
        ),
        datasets=dict(run.data.datasets),
        dataset_config=SplitDataConfig(equal=("train",)),
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, raising the :class:`~mltr.errors.TrainingDiverged` its workers returned.

    A run that diverged is the user's to fix, not a failure to retry: the workers return it
    together (:func:`mltr.train.any_rank_diverged`) rather than raise, so ``--max-failures`` does
    not start them again to diverge again; the job prints it as one line and exits 2.
    """
    with _sigint_restored():
        result = trainer.fit()
    if isinstance(result.return_value, TrainingDiverged):
        raise result.return_value
    return result


@contextlib.contextmanager
def _sigint_restored() -> Iterator[None]:
    """Put back the process's SIGINT handler once ``fit()`` is over.

    In the main thread ``fit()`` installs a handler that aborts the run's controller on Ctrl-C, and
    leaves it installed: after the run, Ctrl-C would "abort" a finished run and do nothing else,
    and the handler's hold on the controller's actor handle keeps the controller, its
    DatasetManager and split coordinators alive until the next run (in a long-lived driver, a
    test session, for good). Elsewhere (a Tune trial's thread) ``fit()`` installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def stored_result(
    storage_path: str, name: str, storage_filesystem: pafs.FileSystem | None = None
) -> ray.train.Result | None:
    """The result of the Train run ``name`` under ``storage_path``, ``None`` when there is none."""
    path = f"{storage_path.rstrip('/')}/{name}"
    try:
        return ray.train.Result.from_path(path, storage_filesystem=storage_filesystem)
    except RuntimeError:  # no run of that name there yet, or none of its checkpoints registered
        return None


def epochs_held(result: ray.train.Result | None) -> int:
    """How many epochs a Train run's checkpoints hold (a resume starts at that epoch)."""
    if result is None or result.checkpoint is None:
        return 0
    return int((result.metrics or {}).get("epoch", -1)) + 1


def completed_result(
    storage_path: str, name: str, epochs: int, storage_filesystem: pafs.FileSystem | None = None
) -> ray.train.Result | None:
    """The result of the Train run ``name`` under ``storage_path`` when its checkpoints hold all
    ``epochs``, else ``None`` (no run of that name there yet, or one still to train)."""
    result = stored_result(storage_path, name, storage_filesystem)
    return result if epochs_held(result) >= epochs else None


def trained_result(run: TrainRun, client: MlflowClient) -> ray.train.Result | None:
    """The Train run's result when its checkpoints already hold every epoch, else ``None``.

    A run that failed after training (its model could not be logged) or whose MLflow store was
    lost has nothing left to train: the driver logs what the loop would log at such a start (the
    epochs MLflow lacks, where it started) and no worker group is started.
    """
    result = completed_result(run.storage_path, run.name, run.optim.epochs, run.storage_filesystem)
    if result is None:
        return None
    history: list = []
    if set(range(run.optim.epochs)) - set(tracking.logged_epochs(client, run.mlflow_run_id)):
        with result.checkpoint.as_directory() as folder:
            history = TrainState.load(Path(folder) / STATE_FILE).history
    log_start(client, run.mlflow_run_id, history, run.optim.epochs)
    return result


def best_checkpoint(result: ray.train.Result) -> ray.train.Checkpoint:
    """The checkpoint of the epoch with the best calibration score (the latest one if none is ranked)."""
    best = result.get_best_checkpoint(SELECTION_METRIC, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"the run at {result.path} finished without a checkpoint")
    return best
