"""The registered model as its users call it: encoded images (or paths) in, scores and labels out,
preprocessed exactly as validation preprocesses, with a bad row reported and the others scored."""

import base64
import io
import os
from pathlib import Path

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


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pngs_are_prepared_as_the_converter_stores_them():
    from pipeline.images import ImageSettings, process_image

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    # 16-bit: the same picture scaled to 16 bits decodes to the same 8-bit pixels (not x / 255 of
    # 16-bit values, scores of another picture).
    eight, sixteen = decode_image(png(picture)), decode_image(png(picture.astype(np.uint16) * 257))
    assert sixteen.dtype == torch.uint8 and torch.equal(sixteen, eight)
    stored = [process_image(png(p), ImageSettings())[0] for p in (picture, picture.astype(np.uint16) * 257)]
    assert stored[0] == stored[1]  # and the converter stores both alike (it clipped 16-bit to white)
    # Transparency: over white, as the converter stores it (not the colour hidden under it).
    rgba = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba[:, :25] = (200, 30, 30, 255)  # the left half opaque red, the right half transparent black
    served = decode_image(png(rgba, "RGBA"))
    stored, _, _ = process_image(png(rgba, "RGBA"), ImageSettings())
    validated = decode_image(stored)  # the stored JPEG, as validation decodes it
    assert served[:, 0, -1].tolist() == [255, 255, 255]
    assert (served.int() - validated.int()).abs().float().mean() < 2  # JPEG's loss only
    # An animation: its first frame, as the converter keeps it.
    frames = [Image.fromarray(np.full((20, 20, 3), value, dtype=np.uint8)) for value in (10, 240)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif.getvalue()).shape == (3, 20, 20) and decode_image(gif.getvalue()).max() < 50


def test_a_damaged_png_is_one_rows_error_not_the_process(logged):
    data = bytearray(png(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    start = data.index(b"IDAT") + 4
    data[start + 20] ^= 0xFF  # one byte of the compressed pixels (libpng's checksum then fails)
    good = encoded(30, 30, "JPEG", 4)
    out = logged.predict(pd.DataFrame({"image": [bytes(data), good]}))
    assert out.loc[0, "error"].startswith("row 0: not a decodable JPEG or PNG image")
    assert out.loc[1, "error"] is None or pd.isna(out.loc[1, "error"])


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # lowered, as a 90-megapixel file would need
    with pytest.raises(ImageError, match=r"^big: (too large to decode|50x40 pixels, outside 1\.\.1000)"):
        decode_image(png(np.zeros((40, 50), dtype=np.uint8)), "big")
    with pytest.raises(ImageError, match="^big.jpg: "):
        decode_image(encoded(50, 40, "JPEG", 5), "big.jpg")


def test_rows_without_a_usable_path_or_image_are_errors_and_a_fifo_is_not_opened(logged, tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(encoded(30, 30, "JPEG", 6))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    # pandas stores a missing path as NaN (or None): that row is an error, not the whole batch's.
    out = logged.predict(pd.DataFrame({"path": [str(good), None, np.nan, str(fifo), str(tmp_path)]}))
    errors = out["error"].tolist()
    assert pd.isna(errors[0])
    assert errors[1:3] == ["row 1: neither image bytes nor a path", "row 2: neither image bytes nor a path"]
    assert (
        errors[3] == f"{fifo}: a FIFO, not a regular file"
        and errors[4] == f"{tmp_path}: is a folder, not an image"
    )


def test_file_uris_are_read_as_the_paths_they_encode(logged, tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encoded(30, 30, "JPEG", 7))
    uri = (folder / "a.jpg").as_uri()
    assert "%20" in uri
    out = logged.predict(pd.DataFrame({"path": [uri, str(folder / "a.jpg"), "file://elsewhere/a.jpg"]}))
    errors = out["error"].tolist()
    assert pd.isna(errors[0]) and pd.isna(errors[1]) and out["scores"][0] == pytest.approx(out["scores"][1])
    assert "not one on host 'elsewhere'" in errors[2]  # that row's error, not the whole batch's


def test_over_http_one_bad_row_is_that_rows_error_and_the_output_lines_up_with_the_input(logged, tmp_path):
    """What `mlflow models serve` runs for each request (its scoring server's `invocations`), on
    the JSON a plain HTTP client posts: base64 text, a MIME-wrapped one (MLflow's own encoder
    breaks lines), a bad one, and a row with a path instead of an image."""
    import json

    from mlflow.pyfunc.scoring_server import invocations

    good = encoded(40, 30, "JPEG", 8)
    (tmp_path / "good.jpg").write_bytes(good)
    text = base64.b64encode(good).decode()
    rows = [
        [text, None],
        [base64.encodebytes(good).decode(), None],
        ["abc", None],
        [None, str(tmp_path / "good.jpg")],
    ]
    body = json.dumps({"dataframe_split": {"columns": ["image", "path"], "data": rows}})
    response = invocations(body, "application/json", logged, logged.metadata.get_input_schema())
    assert response.status == 200, response.response
    answers = json.loads(response.response)["predictions"]  # strict JSON: a good row's error is null
    assert [a["error"] for a in answers] == [
        None, None, "row 2: a string that is not base64-encoded image bytes", None,
    ]  # fmt: skip
    assert (
        answers[0]["scores"] == answers[1]["scores"] == answers[3]["scores"]
        and len(answers[0]["scores"]) == 3
    )
    assert answers[2]["labels"] == [] and answers[2]["scores"] == []

    # In process: the caller's index is kept (a filtered frame lines up), errors are None or text.
    out = logged.predict(pd.DataFrame({"image": [good, b"junk"]}, index=[7, 9]))
    assert list(out.index) == [7, 9] and out.loc[7, "error"] is None
    assert out.loc[9, "error"].startswith("row 1: not a decodable JPEG or PNG image")


def test_a_path_is_read_from_a_file_or_s3_only_and_a_failing_read_is_that_rows_error(logged, tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(encoded(30, 30, "JPEG", 9))
    paths = [str(good), "http://127.0.0.1:1/a.jpg", "gs://bucket/a.jpg", "s3://just-a-bucket"]
    errors = logged.predict(pd.DataFrame({"path": paths}))["error"].tolist()
    assert errors[0] is None
    assert errors[1] == "http://127.0.0.1:1/a.jpg: not a local path, file:// or s3:// URI"  # never fetched
    assert errors[2] == "gs://bucket/a.jpg: not a local path, file:// or s3:// URI"
    assert errors[3].startswith("s3://just-a-bucket: cannot be read: ValueError")  # s3fs's own error


def test_labels_are_chosen_in_logits_as_calibration_counted_them(network):
    from mltr.metrics import apply_thresholds

    # Near saturation sigmoid(x) >= t and x >= logit(t) part: a probability of 1 - 1.4e-13 is
    # rounded up past a threshold its logit is below.
    threshold = 0.9999999999998581
    predictor = Predictor(network, ModelInfo(CLASSES, (threshold, 0.5, 0.5), network.config.input_contract()))
    logits = np.array([[29.583, 0.0, -0.1]])
    assert 1 / (1 + np.exp(-logits[0, 0])) >= threshold  # what comparing probabilities said
    assert not apply_thresholds(logits, predictor.thresholds)[0, 0]  # what the metrics count
    assert predictor.labels(logits) == [["dog"]]


def test_a_served_image_is_what_validation_saw_of_it_once_converted(network, tmp_path):
    """Validation scores the converter's stored JPEG (downscaled to max_side, re-encoded unless it
    was an RGB JPEG within it): a served original gets exactly those pixels, whatever its format."""
    from pipeline.images import ImageSettings, process_image

    settings = ImageSettings(max_side=48, quality=85)
    contract = network.config.input_contract() | {"stored": {"max_side": 48, "quality": 85}}
    predictor = Predictor(network, ModelInfo(CLASSES, (0.5,) * 3, contract))
    cmyk = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 60, 4), dtype=np.uint8), "CMYK").save(
        cmyk, format="JPEG"
    )
    originals = {
        "large.jpg": encoded(160, 120, "JPEG", 10),  # downscaled, re-encoded
        "small.jpg": encoded(40, 30, "JPEG", 11),  # kept as it is
        "photo.png": encoded(90, 70, "PNG", 12),  # re-encoded as JPEG
        "cmyk.jpg": cmyk.getvalue(),  # made RGB by Pillow, as the converter does
    }
    stored = {name: process_image(raw, settings)[0] for name, raw in originals.items()}
    batch = transform_batch(
        {"image": np.array(list(stored.values()), dtype=object), "labels": [[]] * 4, "ignore": [[]] * 4},
        IngestConfig(num_classes=3, image_size=64),
    )  # validation's preprocessing of the stored bytes
    with torch.no_grad():
        expected = torch.sigmoid(
            network(normalize(torch.from_numpy(batch["image"]), (0.5,) * 3, (0.25,) * 3))
        )
    rows = predictor.predict_encoded((name, raw, None) for name, raw in originals.items())
    for row, want in zip(rows, expected, strict=True):
        assert row["error"] is None and np.allclose(row["scores"], want.numpy(), atol=1e-6)
    # Stored bytes are kept as they are: a converted dataset scores as validation scored it.
    again = predictor.predict_encoded((name, raw, None) for name, raw in stored.items())
    assert [r["scores"] for r in again] == [r["scores"] for r in rows]


def test_the_served_network_runs_in_the_precision_training_evaluated_it_in(network, monkeypatch):
    """Thresholds are calibrated on the logits of training's evaluation (bf16 autocast on a GPU):
    a served model runs the network under the same context, device by device."""
    import contextlib

    import mltr.serving
    import mltr.train
    from mltr.model import autocast

    assert mltr.train.autocast is autocast  # one definition for training's evaluation and serving
    seen = []

    @contextlib.contextmanager
    def recording(device):
        seen.append(device.type)
        with autocast(device):
            yield

    monkeypatch.setattr(mltr.serving, "autocast", recording)
    predictor = Predictor(
        network, ModelInfo(CLASSES, (0.5,) * 3, network.config.input_contract()), batch_size=2
    )
    predictor.logits(np.zeros((3, 3, 64, 64), dtype=np.uint8))
    assert seen == ["cpu", "cpu"]  # every batch


def test_only_raster_formats_are_decoded_and_a_large_request_is_decoded_a_batch_at_a_time(network):
    from pipeline.images import ImageRejected, ImageSettings, process_image

    eps = io.BytesIO()
    Image.new("RGB", (8, 8)).save(eps, format="EPS")  # Pillow would hand it to Ghostscript
    with pytest.raises(ImageError, match="^x.eps: not a decodable JPEG or PNG image: not a recognised"):
        decode_image(eps.getvalue(), "x.eps")
    with pytest.raises(ImageRejected, match="^unreadable: not a recognised image format"):
        process_image(eps.getvalue(), ImageSettings())  # the converter alike
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        assert decode_image(encoded(9, 7, fmt, 13)).shape == (3, 7, 9), fmt

    predictor = Predictor(
        network, ModelInfo(CLASSES, (0.5,) * 3, network.config.input_contract()), batch_size=2
    )
    sizes = []
    decode = predictor.decode
    predictor.decode = lambda chunk: sizes.append(len(chunk)) or decode(chunk)
    rows = predictor.predict_encoded((f"r{i}", encoded(20, 20, "JPEG", i), None) for i in range(5))
    assert sizes == [2, 2, 1] and len(rows) == 5 and all(r["error"] is None for r in rows)


def test_the_logged_requirements_name_what_the_served_model_imports_and_reads_paths_with():
    import ast
    import importlib.metadata as md
    import subprocess
    import sys

    from packaging.requirements import Requirement

    from mltr.pyfunc import pip_requirements
    from mltr.serving import URI_SCHEMES

    def requirement_names(lines) -> set[str]:  # those this platform installs, extras' apart
        parsed = [Requirement(line) for line in lines or []]
        return {r.name.lower() for r in parsed if not r.marker or r.marker.evaluate({"extra": ""})}

    required = requirement_names(pip_requirements())
    brought, todo = set(required), list(required)  # and what those bring with them
    while todo:
        for name in requirement_names(md.requires(todo.pop())) - brought:
            brought.add(name)
            todo.append(name)
    # Every import (at the top or inside a function) of the project's modules a served model loads,
    # as a fresh interpreter loads them (this one has imported others: the trainer, Ray).
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mltr._pyfunc_entry; print(*(m.__file__ for n, m in "
         "sys.modules.items() if n.split('.')[0] == 'mltr'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    sources = loaded.stdout.split()
    modules = set()
    for source in sources:
        for node in ast.walk(ast.parse(Path(source).read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = md.packages_distributions()
    needed = {d.lower() for m in modules for d in providers.get(m, ())} & requirement_names(
        md.requires("mltr")
    )
    assert {"torch", "pillow"} <= needed  # the check sees what it is about
    assert needed <= brought, needed - brought
    # A path is read through fsspec: the package behind each scheme but "file" is required itself.
    from fsspec.registry import known_implementations

    readers = {known_implementations[s]["class"].split(".")[0] for s in URI_SCHEMES if s != "file"}
    assert readers <= required, readers - required
