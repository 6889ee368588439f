"""The registered model as its users call it: encoded images (or paths) in, scores and labels out,
preprocessed exactly as validation preprocesses, with a bad row reported and the others scored."""

import base64
import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mltr import create_model, save_checkpoint, tracking
from mltr.checkpoint import save_selected_model
from mltr.model import normalize
from mltr.pyfunc import MlTrPyfunc, log_pyfunc_model
from mltr.serving import ImageError, ModelInfo, Predictor, decode_image
from pipeline.ingest import IngestConfig, transform_batch

pytestmark = pytest.mark.unit

CLASSES = ("cat", "dog", "bird")


def encoded(width: int, height: int, fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return create_model("mltr_tiny", num_classes=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()


@pytest.fixture(scope="module")
def logged(network, tmp_path_factory):
    """The pyfunc logged in an embedded MLflow, and its URI."""
    tmp = tmp_path_factory.mktemp("serving")
    save_checkpoint(network, tmp / "model.pt")
    # class 0 always (threshold 0), class 1 never (above any sigmoid), class 2 at 0.5
    info = ModelInfo(CLASSES, (0.0, 1.01, 0.5), network.config.input_contract(), variant="mltr_tiny")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "serving", (tmp / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    with tracking.tracking_uri(uri), mlflow.start_run(run_id=run_id):
        model_uri = log_pyfunc_model(tmp / "model.pt", info).model_uri
    with tracking.tracking_uri(uri):
        yield mlflow.pyfunc.load_model(model_uri)


def test_the_model_is_logged_from_code_and_holds_no_pickled_object(logged):
    flavor = logged.metadata.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # cloudpickle's python_model.pkl
    assert type(logged.unwrap_python_model()) is MlTrPyfunc


def test_scores_are_the_network_on_the_validation_preprocessing(logged, network):
    jpeg, png = encoded(97, 41, "JPEG", 1), encoded(30, 70, "PNG", 2)
    out = logged.predict(pd.DataFrame({"image": [jpeg, png]}))

    assert list(out.columns) == ["labels", "scores", "error"] and out["error"].isna().all()
    # Validation's own preprocessing of the same JPEG bytes (pipeline.ingest, no augmentation).
    batch = transform_batch(
        {"image": np.array([jpeg], dtype=object), "labels": [[]], "ignore": [[]]},
        IngestConfig(num_classes=3, image_size=64),
    )
    with torch.no_grad():
        expected = torch.sigmoid(
            network(normalize(torch.from_numpy(batch["image"]), (0.5,) * 3, (0.25,) * 3))
        )
    assert np.allclose(out.loc[0, "scores"], expected[0].numpy(), atol=1e-6)
    for row in out.itertuples():
        assert len(row.scores) == 3
        assert row.labels == ["cat"] + (["bird"] if row.scores[2] >= 0.5 else [])


def test_paths_base64_text_and_bad_rows(logged, tmp_path):
    good = encoded(80, 60, "JPEG", 3)
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / "text.jpg").write_text("not an image")
    frame = pd.DataFrame(
        {
            "path": [
                str(tmp_path / "good.jpg"),
                (tmp_path / "good.jpg").as_uri(),
                str(tmp_path / "missing.jpg"),
                str(tmp_path / "text.jpg"),
                str(tmp_path / "truncated.jpg"),
            ]
        }
    )
    out = logged.predict(frame)

    assert out.loc[0, "scores"] == out.loc[1, "scores"] and out.loc[0, "labels"][0] == "cat"
    errors = out["error"].tolist()
    assert out["error"][:2].isna().all()
    assert errors[2] == f"{tmp_path / 'missing.jpg'}: no such file"
    assert errors[3].startswith(f"{tmp_path / 'text.jpg'}: not a decodable JPEG or PNG image")
    assert errors[4].startswith(f"{tmp_path / 'truncated.jpg'}: not a decodable JPEG or PNG image")
    assert out.loc[2, "labels"] == [] and out.loc[2, "scores"] == []

    # What arrives as JSON: base64 text, decoded where the bytes would be.
    predictor = logged.unwrap_python_model().predictor
    (row,) = predictor.predict_encoded([("b64", base64.b64encode(good).decode(), None)])
    assert np.allclose(row["scores"], out.loc[0, "scores"], atol=1e-6)


def test_the_input_needs_an_image_or_a_path_column(logged):
    with pytest.raises(Exception, match="image"):
        logged.predict(pd.DataFrame({"picture": [b"x"]}))


def test_decode_names_the_image_and_the_problem():
    with pytest.raises(ImageError, match="^upload.jpg: empty$"):
        decode_image(b"", "upload.jpg")
    with pytest.raises(ImageError, match="^x: a string that is not base64"):
        decode_image("%%%", "x")
    image = decode_image(encoded(5, 7, "PNG", 4))
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 7, 5)


def test_a_predictor_refuses_classes_that_do_not_match_the_network(network):
    info = ModelInfo(("a", "b"), (0.5, 0.5), network.config.input_contract())
    with pytest.raises(ValueError, match="2 classes for a network of 3 outputs"):
        Predictor(network, info)


def test_a_network_saved_as_a_selected_model_folder_predicts_as_the_logged_model(logged, network, tmp_path):
    # class 0 always, class 1 never, class 2 at 0.5: the logged model's thresholds
    folder = save_selected_model(network, (0.0, 1.01, 0.5), tmp_path / "checkpoint")
    predictor = Predictor.from_checkpoint(str(folder), CLASSES)
    assert predictor.info.thresholds == pytest.approx((0.0, 1.01, 0.5))
    jpeg = encoded(64, 48, "JPEG", 5)
    (row,) = predictor.predict_encoded([("a.jpg", jpeg, None)])
    (want,) = logged.predict(pd.DataFrame({"image": [jpeg]})).itertuples()
    assert row["scores"] == pytest.approx(list(want.scores), abs=1e-6)
    assert row["labels"] == list(want.labels) and row["error"] is None
