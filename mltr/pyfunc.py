"""The registered model: an MLflow pyfunc around :class:`mltr.serving.Predictor`.

A DataFrame with ``image`` (encoded JPEG or PNG bytes; base64 strings over JSON, decoded row by
row, so one bad string is one row's error) or ``path`` in; ``labels``, ``scores`` (class order: the
metadata's ``classes``) and ``error`` out, one row per input row. Logged with its classes,
thresholds, input contract, variant and dataset fingerprint in its metadata, a signature and an
input example; loading it needs the mltr package installed. It is logged "from code": the model
holds the short file ``mltr/_pyfunc_entry.py`` and no pickled object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from mltr.serving import (
    IMAGE_COLUMN,
    MODEL_INFO_FILE,
    OUTPUT_COLUMNS,
    PATH_COLUMN,
    ModelInfo,
    Predictor,
    missing_cell,
)


def _column(frame, name: str) -> list:
    return list(frame[name]) if name in frame.columns else [None] * len(frame)


class MlTrPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model: a DataFrame with ``image`` (encoded bytes) or ``path`` in; ``labels``,
    ``scores`` (class order: the metadata's ``classes``) and ``error`` out, one row per input row."""

    def load_context(self, context):
        from mltr.checkpoint import load_model

        info = ModelInfo.from_json(json.loads(Path(context.artifacts["model_info"]).read_text()))
        batch_size = int((info.extra or {}).get("batch_size", 32))
        self.predictor = Predictor(load_model(context.artifacts["weights"]), info, batch_size=batch_size)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input.columns and PATH_COLUMN not in model_input.columns:
            raise ValueError(
                f"the input needs a column {IMAGE_COLUMN!r} (encoded JPEG or PNG bytes) or {PATH_COLUMN!r}; "
                f"got {list(model_input.columns)}"
            )
        paths, data = _column(model_input, PATH_COLUMN), _column(model_input, IMAGE_COLUMN)
        names = [f"row {i}" if missing_cell(path) or not path else str(path) for i, path in enumerate(paths)]
        rows = self.predictor.predict_encoded(zip(names, data, paths, strict=True))
        # The input's index (rows line up with the caller's frame); object columns, so a good
        # row's error is None (JSON null), not pandas' NaN of a string column.
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS), index=model_input.index, dtype=object)


def signature():
    """The pyfunc's signature: ``image`` or ``path`` in; labels, scores, error out. ``image`` is a
    ``string`` column: encoded bytes in process, base64 text over JSON, decoded by the model row by
    row (MLflow decodes a ``binary`` column whole, and refuses the request for one bad row)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.string, IMAGE_COLUMN, required=False),
                ColSpec(DataType.string, PATH_COLUMN, required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(Array(DataType.string), "labels"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def example_image(size: int) -> bytes:
    """A mid-grey JPEG of ``size`` x ``size``: the logged input example."""
    from torchvision.io import encode_jpeg

    return encode_jpeg(torch.full((3, size, size), 128, dtype=torch.uint8), quality=90).numpy().tobytes()


def pip_requirements() -> list[str]:
    """What the model's environment needs beside the mltr package (given, not inferred: inference
    reloads the model in a subprocess, 5-6 s a run on 2 cores, and cannot name mltr anyway):
    what the served model imports, and s3fs, through which fsspec reads ``s3://`` paths."""
    import importlib.metadata as md

    names = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "fsspec", "s3fs")
    return [f"{name}=={md.version(name).split('+')[0]}" for name in names]


def log_pyfunc_model(weights: str | os.PathLike, info: ModelInfo, name: str = "model", **kwargs):
    """Log the network at ``weights`` (MlTr's checkpoint format) as an MLflow pyfunc in the active run.

    ``info`` goes both into an artifact the model loads and into the model's metadata, so a
    registry client reads the classes, thresholds, input contract, variant and dataset fingerprint
    without loading anything. Returns MLflow's ``ModelInfo``.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        info_file = Path(tmp) / MODEL_INFO_FILE
        info_file.write_text(json.dumps(info.to_json(), indent=1))
        example = pd.DataFrame({IMAGE_COLUMN: [example_image(int(info.input["image_size"]))]})
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=Path(__file__).with_name("_pyfunc_entry.py"),
            artifacts={"weights": os.fspath(weights), "model_info": str(info_file)},
            signature=signature(),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata=info.to_json(),
            **kwargs,
        )
