"""What the registry jobs share: the MLflow client, a model by URI or checkpoint, a split scored by it.

MLflow is imported where a model URI needs it: a checkpoint folder is predicted and scored
without it (a batch-inference worker, or a machine that has only torch and Ray).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jobs._config import opt
from mltr.errors import ConfigError
from mltr.serving import Predictor
from pipeline.dataset import Manifest
from pipeline.ingest import multi_hot
from pipeline.storage import resolve as resolve_storage

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

MODEL_URI_SCHEMES = ("models:/", "runs:/")


@dataclass(frozen=True)
class TrackingArgs:
    """Where the registry is."""

    mlflow_uri: str | None = opt(
        None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite in workdir)"
    )
    workdir: str = opt("work", "local folder of the embedded default (the SQLite MLflow store)")

    def client(self, existing: bool = True) -> MlflowClient:
        """The registry's client. ``existing``: a SQLite store must be there already (a stage that
        reads runs and models); a stage that trains first passes False, and MLflow creates it."""
        from mlflow.tracking import MlflowClient

        from mltr import tracking

        uri = self.mlflow_uri or tracking.default_tracking_uri(Path(self.workdir).resolve())
        tracking.check_reachable(uri, existing=existing)
        return MlflowClient(uri)


def load_predictor(
    model: str, client: MlflowClient | None, data: CheckpointData | None = None, batch_size: int = 32
) -> Predictor:
    """A registered or logged model (``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/ID/model``) or
    a training checkpoint folder (local or ``s3://``; its classes and stored-image settings are
    the dataset's, ``data``). ``client`` says where a model URI is registered; a checkpoint
    folder needs none."""
    if model.startswith(MODEL_URI_SCHEMES):
        import mlflow.pyfunc
        from mlflow.exceptions import MlflowException

        from mltr import tracking

        if client is None:
            raise ConfigError(f"{model}: a model URI needs an MLflow tracking URI")

        try:
            with tracking.tracking_uri(client.tracking_uri):
                pyfunc = mlflow.pyfunc.load_model(model)
        except MlflowException as exc:
            raise ConfigError(f"{model}: {exc.message}") from None
        predictor = pyfunc.unwrap_python_model().predictor
        predictor.batch_size = batch_size
        return predictor
    location = checkpoint_location(model)
    if data is None:
        raise ConfigError(f"{model}: a checkpoint folder needs --data for its classes")
    if location.scheme != "s3":
        return Predictor.from_checkpoint(location.path, data.classes, data.stored, batch_size=batch_size)
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(location.path, tmp, source_filesystem=location.fs)
        return Predictor.from_checkpoint(tmp, data.classes, data.stored, batch_size=batch_size)


def checkpoint_location(model: str):
    """Where the checkpoint folder ``model`` is; a clear error when it is not one (nor a model URI)."""
    location = resolve_storage(model)
    if not location.is_dir():
        what = "no such folder" if not location.exists() else "not a folder"
        raise ConfigError(
            f"{model}: {what}: --model takes a model URI ({', '.join(MODEL_URI_SCHEMES)}) or a "
            "training checkpoint folder"
        )
    return location


@dataclass(frozen=True)
class CheckpointData:
    """What a training checkpoint folder takes from its dataset (a logged model carries both):
    the classes it predicts, and how the dataset's images were stored (the input contract's
    ``stored``)."""

    classes: tuple[str, ...]
    stored: dict[str, int] | None = None

    @classmethod
    def of(cls, manifest: Manifest) -> CheckpointData:
        return cls(tuple(manifest.classes), manifest.stored_images())


def checkpoint_data(model: str, dataset: str | None, flag: str) -> CheckpointData | None:
    """What a checkpoint folder needs from the dataset (``flag`` names where the job takes it);
    ``None`` for a model URI, which carries its own."""
    if model.startswith(MODEL_URI_SCHEMES):
        return None
    checkpoint_location(model)  # a missing folder is named as such, not as a missing flag
    if not dataset:
        raise ConfigError(f"{model}: a checkpoint folder needs {flag} DATASET for its classes")
    from pipeline.dataset import load_manifest

    return CheckpointData.of(load_manifest(dataset))


def check_classes(predictor: Predictor, manifest: Manifest, model: str) -> None:
    check_class_names(predictor.info.classes, manifest, model)


def check_class_names(classes: Sequence[str], manifest: Manifest, model: str) -> None:
    """A model scored or run on a converted dataset predicts that dataset's classes, in its order."""
    if tuple(classes) != tuple(manifest.classes):
        raise ConfigError(
            f"{model} predicts {len(classes)} classes that are not the dataset's "
            f"{manifest.uri} ({manifest.num_classes} classes): it was trained on other data"
        )


def score_split(
    predictor: Predictor, manifest: Manifest, split: str, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(logits, targets, ignore)`` of every row of a converted split, in shard order."""
    manifest.verify((split,))  # a missing or cut shard is named before any is scored
    logits, labels, ignores, ids = [], [], [], []
    for batch in manifest.iter_batches(split, ["image_id", "image", "labels", "ignore"], batch_size):
        rows = batch.to_pydict()
        pixels, errors = predictor.decode(
            (f"{split}/{image_id}", data, None)
            for image_id, data in zip(rows["image_id"], rows["image"], strict=True)
        )
        bad = next((error for error in errors if error), None)
        if bad:  # a converted dataset holds only decodable images: it is damaged
            raise ConfigError(f"{manifest.uri}: {bad}")
        logits.append(predictor.logits(pixels))
        labels += rows["labels"]
        ignores += rows["ignore"]
        ids += rows["image_id"]
    if not ids:
        raise ConfigError(f"{manifest.uri}: split {split!r} has no rows")
    targets, ignore = multi_hot(labels, ignores, manifest.num_classes, ids)
    return np.concatenate(logits), targets, ignore
