"""Sweep window sizes, losses and learning rates of the training ``jobs.train`` runs, with Ray Tune.

    python -m jobs.tune --data s3://bucket/datasets/coco --config coco --window-sizes 7,14 --losses bce,focal,asl
    python -m jobs.tune --data ./datasets/coco --config tiny --window-sizes 2,4 --losses bce,asl --epochs 3

Each trial is a Tune driver function that builds its ``TorchTrainer`` with the same builder as
``jobs.train`` (``mltr.trainer.build_trainer``) plus ``TuneReportCallback``, and fits it: one
training loop. The grid of window sizes x losses is crossed with ``--num-samples`` learning rates
sampled log-uniformly from ``--lr-range`` (or the grid ``--lrs``). ASHA (default) stops weak trials
on the selection metric (the calibration split's mAP) after ``--grace-epochs``; every trial is
a child run of the sweep's MLflow run, logged exactly as a ``jobs.train`` run. The same ``--name``
again resumes the sweep. Ends with one JSON line: ``best``, ``trials``, ``parent_run_id``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from jobs import train as train_job
from jobs._config import component, opt, parse_config, replace_flat, to_dict
from jobs._runtime import init_ray, run_job, setup_logging, wait_for_resources, withdraw_resource_request
from mltr import sweep as sweep_report
from mltr import tracking
from mltr.errors import ConfigError
from mltr.losses import LOSSES
from mltr.sweep import FAILED, FINISHED, INTERRUPTED, STOPPED, TrialRecord
from mltr.train import EPOCHS_DONE_KEY, SELECTION_METRIC
from mltr.trainer import build_trainer, fit
from pipeline.storage import resolve as resolve_storage

log = logging.getLogger("jobs.tune")

DRIVER_CPU = 0.01  # a trial's driver only waits on its Trainer (Tune refuses 0: an empty head bundle)
SWEEP_TAG = "mltr.sweep_name"  # on the sweep's parent run
STOPPED_EARLY_TAG = "mltr.stopped_early"  # "true" on a trial run the scheduler stopped
TRIAL_TAG = "mltr.trial_id"  # on each trial's child run


@dataclass(frozen=True)
class SweepArgs:
    """What the sweep varies, and how it schedules the trials."""

    window_sizes: tuple[int, ...] = opt((), "window sizes to sweep, comma-separated (default: the model's)")
    losses: tuple[str, ...] = opt(("asl",), "losses to sweep, comma-separated: bce, focal, asl")
    lr_range: tuple[float, ...] = opt(
        (1e-5, 1e-3), "peak learning rates are sampled log-uniformly from low,high"
    )
    lrs: tuple[float, ...] = opt((), "peak learning rates to sweep as a grid, instead of sampling --lr-range")
    num_samples: int = opt(1, "learning rates sampled for each window size x loss")
    max_concurrent_trials: int | None = opt(
        None, "trials at once (default: as many as the cluster's CPUs/GPUs hold)"
    )
    workers_per_trial: int | None = opt(None, "Train workers of each trial (default: --num-workers)")
    scheduler: Literal["asha", "fifo"] = opt(
        "asha", "asha stops weak trials early on the calibration mAP; fifo runs every trial to the end"
    )
    grace_epochs: int = opt(1, "ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: int = opt(2, "ASHA: each rung keeps the best 1/N of the trials that reach it")

    def __post_init__(self):
        unknown = [loss for loss in self.losses if loss not in LOSSES]
        if unknown or not self.losses:
            raise ConfigError(f"--losses: unknown {unknown or 'none given'}; choose from {', '.join(LOSSES)}")
        if len(self.lr_range) != 2 or not 0 < self.lr_range[0] <= self.lr_range[1]:
            raise ConfigError(f"--lr-range must be low,high with 0 < low <= high, got {self.lr_range}")
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError(f"--lrs must be positive, got {self.lrs}")
        if any(w < 1 for w in self.window_sizes):
            raise ConfigError(f"--window-sizes must be positive, got {self.window_sizes}")
        for name in ("num_samples", "grace_epochs", "max_concurrent_trials", "workers_per_trial"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor must be at least 2, got {self.reduction_factor}")
        for name in ("window_sizes", "losses", "lrs"):  # a value twice is the same trials twice
            values = getattr(self, name)
            twice = sorted({v for v in values if values.count(v) > 1}, key=str)
            if twice:
                raise ConfigError(
                    f"--{name.replace('_', '-')} names {', '.join(map(str, twice))} more than once"
                )


@dataclass(frozen=True)
class SweepConfig:
    """Sweep window sizes, losses and learning rates of MlTr training with Ray Tune, tracked in MLflow."""

    sweep: SweepArgs = component(SweepArgs)
    train: train_job.TrainConfig = component(train_job.TrainConfig)


@dataclass(frozen=True)
class TrialContext:
    """What every trial's driver needs, resolved once by the sweep (handed over by ``tune.with_parameters``)."""

    resolved: train_job.Resolved  # the manifest, calibration split and baseline, read once
    sweep_name: str
    parent_run_id: str
    storage: str  # where the trials' Train runs live: <storage>/<sweep>-trials/<sweep>-<trial id>


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """One trial: ``jobs.train``'s run with this trial's window, loss and learning rate, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    config = replace_flat(
        ctx.resolved.config,
        window_size=params["window_size"],
        loss=params["loss"],
        lr=params["lr"],
        name=f"{ctx.sweep_name}-{trial_id}",  # deterministic: a restarted trial resumes its checkpoint
        storage=ctx.storage,
    )
    finished = _finished_run(ctx.resolved.mlflow_uri, config.run.experiment, config.run.name)
    if finished is not None:  # trained and logged before the sweep was interrupted: nothing to redo
        log.info(
            "trial %s: its run %s finished before the sweep stopped; not trained again", trial_id, finished
        )
        return
    model = config.model.resolve(ctx.resolved.manifest.num_classes)
    resolved = dataclasses.replace(ctx.resolved, config=config, model=model)
    train_run, client = train_job.start(resolved, parent_run_id=ctx.parent_run_id, tags={TRIAL_TAG: trial_id})
    with tracking.run_outcome(client, train_run.mlflow_run_id):
        trainer = build_trainer(train_run, callbacks=[TuneReportCallback()])
        train_job.report(resolved, train_run, client, fit(trainer))


def _finished_run(mlflow_uri: str, experiment: str, train_name: str) -> str | None:
    """The MLflow run of the trial's Train run when it already finished and logged its model. A
    sweep interrupted after a trial's run closed but before Tune recorded the trial's end restores
    that trial; training it again would be refused (its run finished its epochs) and fail it."""
    client = MlflowClient(mlflow_uri)
    found = client.get_experiment_by_name(experiment)
    runs = tracking.runs_tagged(client, [found.experiment_id], tracking.NAME_TAG, train_name) if found else []
    if runs and runs[0].info.status == "FINISHED" and runs[0].data.tags.get("mltr.model_uri"):
        return runs[0].info.run_id
    return None


class LastEpochASHA(ASHAScheduler):
    """ASHA whose rungs lie before the last epoch (``max_t`` is ``--epochs`` - 1) and which never
    stops a trial past them. Its rungs are not saved with the experiment: a trial restored from
    its checkpoint of the second-to-last epoch reports its last epoch first, and plain ASHA would
    judge it there, at a rung that other trials filled since the restart, and could stop it
    before it logs the model it trained."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) > self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def _trial_name(trial) -> str:
    return trial.trial_id


def trial_train(config: SweepConfig) -> train_job.TrainConfig:
    """The training flags every trial starts from: ``--workers-per-trial`` workers, at least one
    decode actor, and the first of ``--window-sizes`` (the model is resolved and checked with it,
    not with a preset's window the sweep does not use)."""
    sweep, train = config.sweep, config.train
    return replace_flat(
        train,
        num_workers=sweep.workers_per_trial or train.scaling.num_workers,
        decode_actors=train.data.decode_actors or 1,
        **({"window_size": sweep.window_sizes[0]} if sweep.window_sizes else {}),
    )


def local_cpus(config: SweepConfig) -> int:
    """Logical CPUs of a local Ray for the sweep: --max-concurrent-trials trials (one by default)."""
    wanted = config.sweep.max_concurrent_trials or 1
    train = trial_train(config)
    return max(train_job.local_cpus(train), math.ceil(trial_cpus(train) * wanted))


def trial_cpus(train: train_job.TrainConfig) -> float:
    """CPUs one trial occupies: its Train workers, its decode actors, one for evaluation, its driver."""
    return train_job.run_cpus(train) + DRIVER_CPU


def concurrency(config: SweepConfig, train: train_job.TrainConfig, resources: dict[str, float]) -> int:
    """Trials at once: ``--max-concurrent-trials``, else what the cluster's CPUs (and GPUs) hold."""
    need = trial_cpus(train)
    cpus = resources.get("CPU", 0)
    if cpus < need:
        raise ConfigError(
            f"a trial needs {need:g} CPUs ({train.scaling.num_workers} workers x {train.scaling.cpus_per_worker:g}, "
            f"{train.data.decode_actors or 1} decode actors, {train_job.EVAL_CPUS} for evaluation; Ray Data's "
            f"tasks run outside the trial's placement group) and the cluster has {cpus:g}: lower "
            f"--workers-per-trial, --cpus-per-worker or --decode-actors, or {train_job.grow_hint(train.scaling)}"
        )
    fits = math.floor(cpus / need)
    if train.scaling.use_gpu:
        per_trial_gpus = train.scaling.num_workers * train.scaling.gpus_per_worker
        fits = min(fits, math.floor(resources.get("GPU", 0) / per_trial_gpus))
        if fits < 1:
            raise ConfigError(
                f"a trial needs {per_trial_gpus:g} GPUs, the cluster has {resources.get('GPU', 0):g}: lower "
                f"--workers-per-trial or --gpus-per-worker, or {train_job.grow_hint(train.scaling)}"
            )
    return config.sweep.max_concurrent_trials or max(1, fits)


class Progress(Callback):
    """Prints one line per trial event: what runs, what is done, the best selection metric so far."""

    def __init__(self, total: int, epochs: int):
        self.total, self.epochs = total, epochs
        self.done: set[str] = set()
        self.running: set[str] = set()
        self.best: tuple[float, str] | None = None

    def _say(self, trial, text: str) -> None:
        c = trial.config
        best = f"best so far {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        print(
            f"[sweep] {trial.trial_id} (window {c['window_size']}, {c['loss']}, lr {c['lr']:.1e}): {text} | "
            f"running {len(self.running)}, done {len(self.done)}/{self.total} | {best}",
            flush=True,
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        score = result.get(SELECTION_METRIC)
        if score is not None and math.isfinite(score) and (self.best is None or score > self.best[0]):
            self.best = (score, trial.trial_id)
        self._say(trial, f"epoch {result.get(EPOCHS_DONE_KEY)}/{self.epochs}, {SELECTION_METRIC} {score:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._say(trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._say(trial, "FAILED (the sweep goes on)")


def _error_line(error: BaseException | None) -> str | None:
    """The exception a trial raised, in one line (a Ray task error wraps it after a header)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _records(
    results, experiment_path: str, fs, client: MlflowClient, parent_run_id: str
) -> list[TrialRecord]:
    """One record per trial: its status from Tune, its figures from its MLflow child run (or Tune's history)."""
    from ray.tune import ExperimentAnalysis

    # Statuses and configs from Tune's experiment state: a restored trial that failed before it
    # reported anything has no config in its Result.
    trials = {t.trial_id: t for t in ExperimentAnalysis(experiment_path, storage_filesystem=fs).trials}
    children = {run.data.tags.get(TRIAL_TAG): run for run in _child_runs(client, parent_run_id)}
    records = []
    for result in results:
        trial_id = Path(result.path).name
        trial = trials.get(trial_id)
        status = trial.status if trial else "PENDING"
        params = (trial.config if trial else None) or result.config
        history = result.metrics_dataframe
        ran = int((result.metrics or {}).get(EPOCHS_DONE_KEY) or 0)
        child = children.get(trial_id)
        metrics = child.data.metrics if child else {}
        if result.error is not None or status == "ERROR":
            state = FAILED
        elif child is not None and child.info.status == "FINISHED":  # jobs.train's report closed it
            state = FINISHED
            ran = max(ran, int(metrics.get(EPOCHS_DONE_KEY, 0)))
        elif status == "TERMINATED":  # the scheduler stopped it before its report
            state = STOPPED
        else:
            state = INTERRUPTED
        scored = (
            history[SELECTION_METRIC].dropna()
            if history is not None and SELECTION_METRIC in history
            else None
        )
        if state == FINISHED:
            calib, val = metrics.get("calib_mAP"), metrics.get("val_mAP")
        elif state != FAILED and scored is not None and len(scored):  # a failed trial is not scored
            row = history.loc[scored.idxmax()]
            calib, val = float(row[SELECTION_METRIC]), float(row.get("val_selected_mAP", math.nan))
        else:
            calib = val = None
        tags = child.data.tags if child else {}
        records.append(
            TrialRecord(
                trial_id=trial_id,
                window_size=int(params["window_size"]),
                loss=params["loss"],
                lr=float(params["lr"]),
                status=state,
                epochs=ran,
                calib_mAP=calib,
                val_mAP=val,
                mlflow_run_id=child.info.run_id if child else None,
                model_uri=tags.get("mltr.model_uri"),
                checkpoint=tags.get("mltr.checkpoint"),
                error=_error_line(result.error),
            )
        )
    return records


def _child_runs(client: MlflowClient, parent_run_id: str, status: str | None = None) -> list:
    """The sweep's trial runs (those with a given status only, if one is named)."""
    where = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    if status is not None:
        where += f" and attributes.status = '{status}'"
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=where)


# Tune runs each trial's driver (a function trainable) in an actor of this class.
TRIAL_ACTOR_CLASS = "ImplicitFunc"


def _wait_for_trials_to_exit(timeout_s: float = 15.0) -> None:
    """Return once no trial actor of this sweep is alive (or after ``timeout_s``).

    ``Tuner.fit`` returns having asked its trial actors to stop and killed those still running, but
    not having seen them exit. A trial cut short is torn down as it goes, and its driver's own
    handler (``tracking.run_outcome``) may then mark its MLflow run FAILED: after the sweep marked it
    KILLED, when that write waited on the store's lock. Closing a cut trial's run only once its
    actor has exited makes the sweep's status the last one written. Needs the State API (Ray
    Train's clean-up needs it too); without it, the runs are closed at once.
    """
    import ray
    from ray.util.state import list_actors

    filters = [("job_id", "=", ray.get_runtime_context().get_job_id()), ("state", "!=", "DEAD")]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            actors = list_actors(filters=filters, limit=10_000, raise_on_missing_output=False)
        except Exception as error:  # no dashboard on this cluster: nothing to wait with
            log.debug("could not list the trial actors (%s): their runs are closed at once", error)
            return
        # The class's name, or its qualified name when it was defined in a function.
        alive = [a for a in actors if a.class_name.rsplit(".", 1)[-1] == TRIAL_ACTOR_CLASS]
        if not alive:
            return
        if time.monotonic() > deadline:
            log.warning(
                "%d trial actor(s) still alive %.0f s after the sweep ended; closing their runs anyway",
                len(alive),
                timeout_s,
            )
            return
        time.sleep(0.25)


def _kill_running_children(client: MlflowClient, parent_run_id: str) -> None:
    """An interrupted sweep: every trial run still RUNNING was cut short (KILLED), whatever Tune says."""
    for run in _child_runs(client, parent_run_id, status="RUNNING"):
        client.set_terminated(run.info.run_id, status="KILLED")


def _close_children(client: MlflowClient, records: list[TrialRecord]) -> None:
    """A trial the scheduler stopped (or an interrupt cut) cannot close its own MLflow run: close it here.

    Its driver was stopped mid-run: the run is still RUNNING, or FAILED by the driver's own
    handler as it was torn down (:func:`_wait_for_trials_to_exit` first). Either way it was cut
    short: KILLED.
    """
    for record in records:
        if record.mlflow_run_id is None or record.status not in (STOPPED, INTERRUPTED):
            continue
        if client.get_run(record.mlflow_run_id).info.status in ("RUNNING", "FAILED"):
            client.set_tag(record.mlflow_run_id, STOPPED_EARLY_TAG, str(record.status == STOPPED).lower())
            client.set_terminated(record.mlflow_run_id, status="KILLED")


# Flags that may differ when a sweep of the same name is run again: where it runs, not what it is.
RESTART_FREE = {
    "address", "mlflow_uri", "max_concurrent_trials", "max_failures", "oversubscribe", "name",
    "wait_for_resources",
}  # fmt: skip


PATH_FLAGS = ("data", "workdir", "storage", "init_from")  # compared as absolute paths when local


def param_values(config: SweepConfig) -> dict[str, str]:
    """The sweep's flags as the parent run's params (MLflow keeps strings), local paths made absolute."""
    values = to_dict(config)
    for key in PATH_FLAGS:
        value = values.get(key)
        if value and "://" not in value:
            values[key] = str(Path(value).resolve())
    return {k: json.dumps(v) if isinstance(v, list) else str(v)[:6000] for k, v in values.items()}


def check_restorable(
    client: MlflowClient, experiment_id: str, name: str, restorable: bool, state: str, where: str
) -> None:
    """A sweep whose Tune state is there (it would be resumed) must have its parent run here: that
    is where its flags are compared. Found nowhere (another --experiment or MLflow store), it
    would resume the old trials under new flags, and lose the finished trials' runs."""
    if restorable and not tracking.runs_tagged(client, [experiment_id], SWEEP_TAG, name):
        raise ConfigError(
            f"sweep {name!r} has its trials' state in {state} but no MLflow parent run in {where}: "
            f"resume it with the --experiment and --mlflow-uri it started with, or give a new --name"
        )


def _open_parent(client: MlflowClient, experiment_id: str, name: str, config: SweepConfig, tags: dict) -> str:
    """The sweep's MLflow run: found again by its name (the same flags, else refused) or created."""
    params = param_values(config)
    runs = tracking.runs_tagged(client, [experiment_id], SWEEP_TAG, name)
    if runs:
        logged = runs[0].data.params
        changed = tracking.changed_params(logged, params, RESTART_FREE)
        if changed:
            raise ConfigError(
                f"sweep {name!r} exists (MLflow run {runs[0].info.run_id}) with other flags: "
                + ", ".join(f"--{k.replace('_', '-')} {logged[k]} (now {params[k]})" for k in changed)
                + "; run it again with its own flags, or start a new --name"
            )
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={SWEEP_TAG: name, **tags})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


CONCURRENCY_TAG = "mltr.max_concurrent_trials"


def _trials_at_once(client: MlflowClient, parent_run_id: str, name: str, wanted: int, restoring: bool) -> int:
    """Trials at once for this attempt. Ray Tune restores a sweep with the TuneConfig it started
    with, so a restart keeps the first attempt's figure (recorded on the parent run): a different
    --max-concurrent-trials, or a cluster that now holds more or fewer trials, is reported, not
    silently ignored."""
    if not restoring:
        client.set_tag(parent_run_id, CONCURRENCY_TAG, str(wanted))
        return wanted
    started = client.get_run(parent_run_id).data.tags.get(CONCURRENCY_TAG)
    if started is None:  # recorded by no earlier attempt: nothing to compare
        return wanted
    if int(started) != wanted:
        log.warning(
            "sweep %s resumes with the %s trials at once it started with (Ray Tune restores a sweep's "
            "TuneConfig), not %d: to run another number at once, start a new --name",
            name,
            started,
            wanted,
        )
    return int(started)


def _log_results(
    client: MlflowClient, parent_run_id: str, records: list[TrialRecord], best: TrialRecord | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "results.csv").write_text(sweep_report.table_csv(records))
        (folder / "results.md").write_text(sweep_report.table_markdown(records))
        sweep_report.plot_by_window_and_loss(records, folder / "map_by_window_and_loss.png")
        if best is not None:
            (folder / "best.json").write_text(json.dumps(dataclasses.asdict(best), indent=2))
        for path in sorted(folder.iterdir()):
            client.log_artifact(parent_run_id, str(path), artifact_path="sweep")
    if best is not None:
        tags = {
            "mltr.best_trial": best.trial_id,
            "mltr.best_run_id": best.mlflow_run_id or "",
            "mltr.best_model_uri": best.model_uri or "",
            "mltr.best_checkpoint": best.checkpoint or "",
            "mltr.best_config": json.dumps(
                {"window_size": best.window_size, "loss": best.loss, "lr": best.lr}
            ),
        }
        client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_metric(parent_run_id, "best_calib_mAP", best.calib_mAP)
        if best.val_mAP is not None:
            client.log_metric(parent_run_id, "best_val_mAP", best.val_mAP)


def run(config: SweepConfig, trial: Callable[[dict, TrialContext], None] = run_trial) -> dict:
    """The sweep. ``trial`` is the trainable's body (``run_trial``; a wrapper of it in tests)."""
    try:
        return _run(config, trial)
    finally:
        withdraw_resource_request()  # nodes --wait-for-resources asked for may leave once idle


def _run(config: SweepConfig, trial: Callable[[dict, TrialContext], None]) -> dict:
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    sweep = config.sweep
    train = trial_train(config)
    resolved = train_job.resolve(
        train
    )  # the manifest, labels and calibration split, read once for all trials
    windows = sweep.window_sizes or (resolved.model.window_size,)
    for window in windows:  # refused before anything starts, with the window sizes that fit
        replace_flat(train, window_size=window).model.resolve(resolved.manifest.num_classes)
    epochs = train.optim.epochs
    if sweep.scheduler == "asha" and sweep.grace_epochs >= epochs:
        raise ConfigError(
            f"--grace-epochs {sweep.grace_epochs} leaves ASHA nothing to stop in {epochs} --epochs: "
            f"a trial needs epochs after its first rung (lower --grace-epochs or raise --epochs)"
        )

    manifest = resolved.manifest
    name = train.run.name or f"{manifest.name}-sweep-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    workdir = Path(train.run.workdir).resolve()
    storage = resolve_storage(train.run.storage or str(workdir / "ray_results"))
    fs = storage.fs if storage.scheme == "s3" else None
    experiment_path = storage.join(name).path  # on fs: "bucket/prefix/<name>" for S3

    # The parent run first (a sweep of this name again must have the same flags): if anything
    # below fails, it is marked FAILED (KILLED on Ctrl-C).
    client = MlflowClient(resolved.mlflow_uri)
    artifact_root = (workdir / "mlartifacts").as_uri() if resolved.mlflow_uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, train.run.experiment, artifact_root)
    check_restorable(
        client, experiment_id, name, tune.Tuner.can_restore(experiment_path, storage_filesystem=fs),
        f"{storage.join(name).uri}", f"experiment {train.run.experiment!r} of {resolved.mlflow_uri}",
    )  # fmt: skip
    parent_run_id = _open_parent(
        client, experiment_id, name, config,
        {"mltr.dataset": manifest.name, "mltr.dataset_fingerprint": manifest.fingerprint, "mltr.model": train.model.variant},
    )  # fmt: skip
    ctx = TrialContext(resolved, name, parent_run_id, storage.join(f"{name}-trials").uri)
    trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx), {"cpu": DRIVER_CPU})
    lrs = tune.grid_search(list(sweep.lrs)) if sweep.lrs else tune.loguniform(*sweep.lr_range)
    samples = 1 if sweep.lrs else sweep.num_samples
    total = len(windows) * len(sweep.losses) * (len(sweep.lrs) if sweep.lrs else samples)
    progress = Progress(total, epochs)
    with tracking.run_outcome(client, parent_run_id):
        # A local Ray holds --max-concurrent-trials trials (one by default), with more logical CPUs
        # than cores as for jobs.train; a cluster has its own resources.
        init_ray(train.run.address, num_cpus=local_cpus(config))
        # On an autoscaling cluster: wait for --max-concurrent-trials trials' worth (at least one).
        wanted = config.sweep.max_concurrent_trials or 1
        bundles = (train_job.run_bundles(train) + [{"CPU": DRIVER_CPU}]) * wanted
        max_concurrent = concurrency(
            config, train, wait_for_resources(bundles, train.scaling.wait_for_resources)
        )
        restoring = tune.Tuner.can_restore(experiment_path, storage_filesystem=fs)
        max_concurrent = _trials_at_once(client, parent_run_id, name, max_concurrent, restoring)
        log.info(
            "sweep %s: MLflow parent run %s in %s, up to %d trials at once",
            name,
            parent_run_id,
            resolved.mlflow_uri,
            max_concurrent,
        )
        if restoring:
            log.info(
                "sweep %s: resuming it from %s (finished trials are not run again)", name, experiment_path
            )
            tuner = tune.Tuner.restore(experiment_path, trainable, storage_filesystem=fs)
        else:
            scheduler = (
                # Rungs only before the last epoch, and a trial that reaches it is never stopped:
                # stopping it there would kill its driver before it logs the model it trained.
                LastEpochASHA(
                    time_attr=EPOCHS_DONE_KEY,  # epochs, a restored trial's included
                    metric=SELECTION_METRIC,
                    mode="max",
                    max_t=epochs - 1,
                    grace_period=sweep.grace_epochs,
                    reduction_factor=sweep.reduction_factor,
                    stop_last_trials=False,
                )
                if sweep.scheduler == "asha"
                else FIFOScheduler()
            )
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "window_size": tune.grid_search(list(windows)),
                    "loss": tune.grid_search(list(sweep.losses)),
                    "lr": lrs,
                },
                tune_config=tune.TuneConfig(
                    scheduler=scheduler,
                    num_samples=samples,
                    max_concurrent_trials=max_concurrent,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage.path,
                    storage_filesystem=fs,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=[progress],
                    verbose=0,
                ),
            )
        started = time.perf_counter()
        try:
            results = tuner.fit()
        except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C, or one outside Tune's own handler
            _kill_running_children(client, parent_run_id)
            raise KeyboardInterrupt from None
        # A trial cut short writes its run's status as it is torn down: its figures and status are
        # read, and its run closed, once it has exited.
        _wait_for_trials_to_exit()
        records = _records(results, experiment_path, fs, client, parent_run_id)
        _close_children(client, records)
        if any(r.status == INTERRUPTED for r in records):
            _kill_running_children(client, parent_run_id)
            raise KeyboardInterrupt  # the sweep was stopped (Ctrl-C): the parent run is KILLED
        best = sweep_report.best(records)
        _log_results(client, parent_run_id, records, best)
        client.log_metric(parent_run_id, "sweep_seconds", time.perf_counter() - started)
        client.set_terminated(parent_run_id, status="FINISHED")
    print("\n" + sweep_report.table_markdown(records), flush=True)
    return {
        "best": None
        if best is None
        else {
            "config": {"window_size": best.window_size, "loss": best.loss, "lr": best.lr},
            "calib_mAP": best.calib_mAP,
            "val_mAP": best.val_mAP,
            "mlflow_run_id": best.mlflow_run_id,
            "model_uri": best.model_uri,
            "checkpoint": best.checkpoint,
            "trial_id": best.trial_id,
        },
        "trials": [dataclasses.asdict(r) for r in sweep_report.rank(records)],
        "parent_run_id": parent_run_id,
        "mlflow_uri": resolved.mlflow_uri,
        "name": name,
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(SweepConfig, argv, prog="mltr tune", job="tune")
    return run_job("tune", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
