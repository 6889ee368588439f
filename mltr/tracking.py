"""MLflow helpers: the tracking URI default, runs that survive restarts, metrics logged exactly once.

A training run keeps one MLflow run for its whole life, found again by the tag
``mltr.train_name`` when the same ``--name`` is started again, so a resumed run continues its
curves instead of starting a second run. Epoch metrics are logged only if that epoch is not in
MLflow yet: a worker that dies after logging but before its checkpoint lands, or a checkpoint
replayed after a restart, never shows an epoch twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from mltr.errors import ConfigError

NAME_TAG = "mltr.train_name"
MODEL_CONFIG_TAG = "mltr.model_config"
EPOCHS_TAG = "mltr.epochs"  # the epochs the run is asked for now (params are immutable)
EPOCHS_HISTORY_TAG = "mltr.epochs_history"  # every target it was given, comma-separated
EPOCH_KEY = "epoch"  # logged once per epoch (step = epoch): the marker of an epoch already in MLflow


def default_tracking_uri(workdir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store under ``workdir`` (no server)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None = None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root)


def filter_value(value: str) -> str | None:
    """``value`` quoted for an MLflow search filter, or None if no quoting can hold it.

    MLflow's filter parser strips one pair of quotes and unescapes nothing: a value holding single
    quotes goes in double quotes and vice versa; one holding both cannot be written exactly.
    """
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    return None


def runs_tagged(client: MlflowClient, experiment_ids: list[str], key: str, value: str) -> list[Run]:
    """The runs whose tag ``key`` is exactly ``value`` (any characters), newest first."""
    quoted = filter_value(value)
    if quoted is not None:
        clause = f"tags.`{key}` = {quoted}"
    else:  # both kinds of quote: match them with LIKE's one-character wildcard, then compare exactly
        clause = f"tags.`{key}` LIKE '{value.replace(chr(39), '_').replace(chr(34), '_')}'"
    runs = client.search_runs(experiment_ids, filter_string=clause, order_by=["attributes.start_time DESC"])
    return [run for run in runs if run.data.tags.get(key) == value]


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """What a run must keep to be resumed: the model it builds, the data it reads, the loss it minimises.

    Stored as tags when the run is created; starting the same name with another identity is refused.
    """

    model_config: dict[str, Any]  # the resolved MlTrConfig, as a JSON-able dict
    dataset_fingerprint: str
    loss: str

    def tags(self) -> dict[str, str]:
        return {
            MODEL_CONFIG_TAG: json.dumps(self.model_config, sort_keys=True),
            "mltr.dataset_fingerprint": self.dataset_fingerprint,
            "mltr.loss": self.loss,
        }

    def differences(self, tags: Mapping[str, str]) -> list[str]:
        """What differs from a run's tags, one phrase each (tags a run does not have are not compared)."""
        out = []
        if MODEL_CONFIG_TAG in tags:
            old = json.loads(tags[MODEL_CONFIG_TAG])
            out += [
                f"model {k} {old.get(k)!r} -> {v!r}"
                for k, v in sorted(self.model_config.items())
                if old.get(k) != v
            ]
        for tag, name, new in (
            ("mltr.dataset_fingerprint", "dataset fingerprint", self.dataset_fingerprint),
            ("mltr.loss", "loss", self.loss),
        ):
            if tag in tags and tags[tag] != new:
                out.append(f"{name} {tags[tag]} -> {new}")
        return out


def start_or_resume_run(
    client: MlflowClient,
    experiment_id: str,
    train_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    identity: RunIdentity,
    epochs: int,
    resume_free: Collection[str] = (),
    checkpoints: tuple[str, int] | None = None,
) -> tuple[str, bool]:
    """The run tagged with ``train_name`` in the experiment, reopened, or a new one; returns (run_id, resumed).

    A run is reopened only with the same identity, the same ``params`` as it logged (but those in
    ``resume_free``: where it runs, not what it trains; a param the run did not log is not
    compared) and at least as many epochs as it was asked for; a FINISHED run only to be extended
    (more epochs). ``checkpoints``, (where the run's checkpoints are, how many epochs they hold):
    a run that logged epochs is not reopened where its checkpoints hold none (another
    ``--storage``, or lost), as it would train again from epoch 0 under the curves of the first
    training. Each change of ``epochs`` is recorded in the
    tags ``mltr.epochs`` (the current target) and ``mltr.epochs_history``. Refusals raise
    :class:`~mltr.errors.ConfigError` saying what to do.
    """
    runs = runs_tagged(client, [experiment_id], NAME_TAG, train_name)
    if not runs:
        run = client.create_run(experiment_id, run_name=train_name, tags={NAME_TAG: train_name})
        client.log_batch(
            run.info.run_id,
            params=[Param(k, param_value(v)) for k, v in params.items()],
            tags=[RunTag(k, str(v)) for k, v in {**tags, **identity.tags(), EPOCHS_TAG: str(epochs)}.items()],
        )
        client.set_tag(run.info.run_id, EPOCHS_HISTORY_TAG, str(epochs))
        return run.info.run_id, False
    run = runs[0]
    run_id, run_tags = run.info.run_id, run.data.tags
    where = f"run {train_name!r} (MLflow run {run_id})"
    differences = identity.differences(run_tags)
    if differences:
        raise ConfigError(
            f"{where} was started with another model, dataset or loss ({'; '.join(differences)}): "
            f"start it under a new --name"
        )
    logged, values = run.data.params, {k: param_value(v) for k, v in params.items()}
    changed = [
        f"{k} {logged[k]} (now {values[k]})" for k in changed_params(logged, values, {*resume_free, "epochs"})
    ]
    if changed:  # a resumed run would train (or select) otherwise than its logged params say
        raise ConfigError(
            f"{where} was started with other settings: {', '.join(changed)}; resume it with the flags "
            f"it started with, or start a new --name"
        )
    if checkpoints is not None and checkpoints[1] == 0 and (trained := logged_epochs(client, run_id)):
        storage = run.data.params.get("storage") or "the default, <workdir>/ray_results"
        raise ConfigError(
            f"{where} logged epochs {min(trained)}-{max(trained)}, but {checkpoints[0]} holds no checkpoint "
            f"of it: resumed, it would train again from epoch 0 under the first training's curves. "
            f"Resume it with the --storage it started with ({storage}), or start a new --name"
        )
    previous = int(run_tags.get(EPOCHS_TAG) or run.data.params.get("epochs") or 0)
    if run.info.status == "FINISHED" and epochs <= previous:
        raise ConfigError(
            f"{where} already finished its {previous} epochs: start a new --name, "
            f"or pass --epochs above {previous} to extend it"
        )
    if epochs < previous:
        raise ConfigError(f"{where} was started for {previous} epochs; --epochs {epochs} would cut it short")
    if epochs != previous:
        history = run_tags.get(EPOCHS_HISTORY_TAG, str(previous))
        client.set_tag(run_id, EPOCHS_TAG, str(epochs))
        client.set_tag(run_id, EPOCHS_HISTORY_TAG, f"{history},{epochs}")
    client.update_run(run_id, status="RUNNING")
    return run_id, True


@contextlib.contextmanager
def run_outcome(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Mark the run FAILED if the block raises, KILLED on Ctrl-C (the block marks success itself).

    Ray Train's ``fit()`` installs its own SIGINT handler: Ctrl-C aborts the run gracefully and then
    leaves through ``SystemExit``. Nothing else in a training run exits, so inside the block a
    ``SystemExit`` is that Ctrl-C too; it comes out as ``KeyboardInterrupt`` (exit status 130).
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        client.set_terminated(run_id, status="KILLED")
        raise KeyboardInterrupt from None
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise


STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def check_reachable(uri: str, timeout: float = 15.0, existing: bool = False) -> None:
    """Fail fast, naming ``uri``, when it is no MLflow store: a scheme MLflow has no store for, a
    SQLite file that is not a database, or a server that does not answer. With ``existing`` (a
    stage that reads runs or models), a SQLite file that is not there is refused too: MLflow would
    create an empty store, and the model asked for would be reported missing, not the store."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in STORE_SCHEMES:
        raise ConfigError(
            f"{uri}: not an MLflow tracking URI (http(s)://, sqlite:///, postgresql://, mysql://, "
            f"file:// or databricks); check --mlflow-uri"
        )
    if scheme == "sqlite":
        path = uri.split(":///", 1)[-1].split("?", 1)[0]
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except FileNotFoundError:
            if existing and path not in ("", ":memory:"):
                raise ConfigError(
                    f"{uri}: no MLflow store at {path} (no such file): check --mlflow-uri, "
                    "or --workdir for the embedded default"
                ) from None
            head = b""  # none yet: MLflow creates it
        except OSError:  # not a plain file: MLflow says
            head = b""
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"{uri}: {path} is not a SQLite database; check --mlflow-uri")
    if scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(
                f"{uri.rstrip('/')}/health", timeout=max(1.0, deadline - time.monotonic())
            ):
                return
        except urllib.error.HTTPError as exc:  # the server answered: it is there
            if exc.code < 500:
                return
            last = exc
        except OSError as exc:
            last = exc
        time.sleep(0.5)
    raise ConfigError(
        f"the MLflow server {uri} did not answer within {timeout:g} s ({last}): check --mlflow-uri"
    )


def changed_params(
    logged: Mapping[str, str], params: Mapping[str, str], free: Collection[str] = ()
) -> list[str]:
    """The keys of ``params`` (as MLflow keeps them: strings) whose value differs from the run's
    ``logged`` one, sorted; keys in ``free``, and those the run did not log, are not compared."""
    return [k for k, v in sorted(params.items()) if k not in free and k in logged and logged[k] != v]


def param_value(value: Any) -> str:
    """A param's value as MLflow keeps it (a string; lists as JSON), cut to MLflow's length limit."""
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def logged_epochs(client: MlflowClient, run_id: str) -> set[int]:
    return {int(m.step) for m in client.get_metric_history(run_id, EPOCH_KEY)}


def log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: Mapping[str, float]) -> bool:
    """Log one epoch's metrics (step = epoch) unless that epoch is already in MLflow; returns whether it logged."""
    if epoch in logged_epochs(client, run_id):
        return False
    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != EPOCH_KEY]
    # The epoch marker goes last: an interrupted batch is logged again, not skipped.
    client.log_batch(run_id, metrics=values)
    client.log_batch(run_id, metrics=[Metric(EPOCH_KEY, float(epoch), now, epoch)])
    return True


def log_json(client: MlflowClient, run_id: str, data: Any, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2))
        _log_file(client, run_id, path, artifact_file)


def _log_file(client: MlflowClient, run_id: str, path: Path, artifact_file: str) -> None:
    parent = str(Path(artifact_file).parent)
    client.log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``) at ``uri`` for a block, then restore.

    ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment, so leaving it
    set would send every later run of the same process to this store.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # None: back to MLflow's default
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def log_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """A list of flat dicts as a CSV artifact (per-class AP tables)."""
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["class"])
            writer.writeheader()
            writer.writerows(rows)
        _log_file(client, run_id, path, artifact_file)


def log_pr_plot(
    client: MlflowClient,
    run_id: str,
    curves: Mapping[str, tuple[list[float], list[float]]],
    artifact_file: str,
) -> None:
    """Precision-recall curves (name -> (recall, precision)) as a PNG artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for name, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=name)
    ax.set(
        xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="validation precision-recall"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
        _log_file(client, run_id, path, artifact_file)


def log_final_model(
    client: MlflowClient,
    run_id: str,
    checkpoint_dir: Path,
    classes: list[str],
    variant: str | None = None,
    dataset_fingerprint: str | None = None,
    stored_images: dict[str, int] | None = None,
) -> dict:
    """Log a checkpoint's selected weights as the run's MLflow model, with the selection's figures.

    The checkpoint's :class:`~mltr.checkpoint.TrainState` says which weights its epoch chose on the
    calibration split, their thresholds and their scores. Logged: the final metrics (``calib_mAP``,
    and ``val_mAP`` and CP..OF1 at the calibrated thresholds), a per-class table, the
    validation precision-recall plot, and the model: an MLflow pyfunc
    (:class:`~mltr.pyfunc.MlTrPyfunc`) taking encoded images and returning scores and labels,
    with its classes, thresholds, input contract, variant and dataset fingerprint in its metadata.
    Returns the figures and the model's URI.
    """
    from mltr.checkpoint import STATE_FILE, WEIGHT_FILES, TrainState, load_model
    from mltr.pyfunc import log_pyfunc_model
    from mltr.serving import ModelInfo

    state = TrainState.load(checkpoint_dir / STATE_FILE)
    chosen = state.selection
    weights = checkpoint_dir / WEIGHT_FILES[chosen.weights]
    model = load_model(weights)
    figures = {"calib_mAP": chosen.calib_mAP, **{f"val_{k}": v for k, v in chosen.val.items()}}
    now = int(time.time() * 1000)
    # Metrics and tags, not params: a resumed run with more epochs may select another epoch.
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in {**figures, "best_epoch": state.epoch}.items()],
        tags=[
            RunTag("mltr.selected_epoch", str(state.epoch)),
            RunTag("mltr.selected_weights", chosen.weights),
        ],
    )
    log_table(
        client,
        run_id,
        [
            {
                "class_index": i,
                "class": name,
                "calib_ap": chosen.calib_per_class_ap[i],
                "val_ap": chosen.val_per_class_ap[i],
                "threshold": chosen.thresholds[i],
            }
            for i, name in enumerate(classes)
        ],
        "evaluation/per_class_ap.csv",
    )
    log_pr_plot(
        client,
        run_id,
        {f"epoch {state.epoch} ({chosen.weights})": chosen.val_pr_curve},
        "evaluation/precision_recall.png",
    )
    info = ModelInfo(
        classes=tuple(classes),
        thresholds=tuple(float(t) for t in chosen.thresholds),
        # How the training data's images were stored: a served image is made the same first.
        input=model.config.input_contract() | ({"stored": dict(stored_images)} if stored_images else {}),
        variant=variant,
        dataset_fingerprint=dataset_fingerprint,
        extra={
            "model_config": jsonable(dataclasses.asdict(model.config)),
            "weights": chosen.weights,
            "epoch": state.epoch,
            "calib_mAP": float(chosen.calib_mAP),
            "val_mAP": float(chosen.val_mAP),
        },
    )
    log_json(client, run_id, info.to_json(), "model_info/classes.json")
    with tracking_uri(client.tracking_uri), mlflow.start_run(run_id=run_id):
        logged = log_pyfunc_model(weights, info)
    return {
        **figures,
        "best_epoch": state.epoch,
        "weights": chosen.weights,
        "thresholds": chosen.thresholds,
        "model_uri": logged.model_uri,
    }


def jsonable(value: Any) -> Any:
    """Tuples as lists, recursively: what JSON and YAML round-trip unchanged."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
