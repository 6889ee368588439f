"""`mltr predict` on files: folders walked, globs expanded, a bad image reported and skipped."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.predict import expand_inputs, predict_files
from mltr import create_model
from mltr.serving import ModelInfo, Predictor

pytestmark = pytest.mark.unit


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_inputs_expand_and_every_image_gets_a_line_or_a_reason(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "nested").mkdir()
    (tmp_path / "a" / "one.jpg").write_bytes(jpeg(1))
    (tmp_path / "a" / "nested" / "two.JPG").write_bytes(jpeg(2))
    (tmp_path / "a" / "notes.txt").write_text("not an image, not an input")
    (tmp_path / "b-1.jpg").write_bytes(jpeg(3))
    (tmp_path / "b-2.jpg").write_bytes(b"\xff\xd8 truncated")
    paths = list(expand_inputs((str(tmp_path / "a"), str(tmp_path / "b-*.jpg"), str(tmp_path / "gone.jpg"))))
    assert [p.removeprefix(str(tmp_path)) for p in paths] == [
        "/a/nested/two.JPG", "/a/one.jpg", "/b-1.jpg", "/b-2.jpg", "/gone.jpg",
    ]  # fmt: skip

    torch.manual_seed(0)
    network = create_model("mltr_tiny", num_classes=2).eval()
    predictor = Predictor(
        network, ModelInfo(("x", "y"), (0.0, 1.01), network.config.input_contract()), batch_size=2
    )
    out = io.StringIO()
    summary = predict_files(predictor, paths, out, batch_size=2)

    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["path"] for line in lines] == paths[:3] and summary["images"] == 3
    assert all(line["labels"] == ["x"] and set(line["scores"]) == {"x", "y"} for line in lines)
    assert [s["path"] for s in summary["skipped"]] == paths[3:]
    assert "gone.jpg: no such file" in summary["skipped"][1]["error"]
    assert "skipped" in capsys.readouterr().err
