"""ONNX export of the network (dynamo exporter, dynamic batch) computes what PyTorch computes."""

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime  # the export extra, which `make test` installs
import pytest
import torch
from PIL import Image

from jobs import export
from jobs._config import parse_config
from jobs._models import CheckpointData
from mltr import create_model
from mltr.checkpoint import save_selected_model

pytestmark = pytest.mark.unit


def jpegs(folder: Path, count: int) -> list[Path]:
    paths = []
    for seed in range(count):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG")
        paths.append(folder / f"{seed}.jpg")
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def test_an_export_matches_pytorch_at_any_batch_size_and_replaces_out_only_once_checked(
    tmp_path, monkeypatch
):
    torch.manual_seed(0)
    # Shifted windows (the masked attention path) and the cross-window part, as every variant has.
    network = create_model("mltr_tiny", num_classes=2).eval()
    assert network.config.cross_window
    for p in network.parameters():  # the cross-window gate starts at zero: give it weight
        p.data.add_(0.05 * torch.randn_like(p))
    folder = save_selected_model(network, (0.5, 0.5), tmp_path / "checkpoint")
    monkeypatch.setattr(export, "checkpoint_data", lambda model, data, flag: CheckpointData(("x", "y")))
    out = tmp_path / "export" / "m.onnx"
    flags = ["--model", str(folder), "--out", str(out), *map(str, jpegs(tmp_path, 5))]

    # Traced on 2 images, checked by the job on all 5 in one batch.
    result = export.run(parse_config(export.ExportConfig, flags))
    assert result["check_images"] == 5 and result["max_abs_diff"] <= 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.json"]  # one file, no .data
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["mltr.source"] == str(folder)
    assert json.loads(Path(f"{out}.json").read_text())["classes"] == ["x", "y"]
    images = torch.randn(3, 3, 64, 64)  # yet another batch size, on the graph alone
    with torch.no_grad():
        assert (
            np.abs(session.run(["logits"], {"images": images.numpy()})[0] - network(images).numpy()).max()
            <= 1e-4
        )

    # An export that fails its check leaves the earlier one as it was. (A tolerance below zero fails
    # every export; the flag refuses one, so it is set on the parsed config.)
    graph = out.read_bytes()
    monkeypatch.setattr(
        export, "export_onnx", lambda network, example, to, opset: to.write_bytes(graph) or 0.0
    )
    out.write_bytes(b"an earlier, checked export")
    with pytest.raises(export.ExportMismatch, match="m.onnx is as it was"):
        failing = parse_config(export.ExportConfig, flags)
        object.__setattr__(failing, "atol", -1.0)
        export.run(failing)
    assert out.read_bytes() == b"an earlier, checked export"
    assert json.loads(Path(f"{out}.json").read_text())["classes"] == ["x", "y"]


def test_a_model_is_checked_on_a_dataset_only_if_it_predicts_that_datasets_classes(
    tmp_path, sqlite_store, monkeypatch
):
    import types

    import pipeline.dataset
    from mltr.errors import ConfigError
    from mltr.serving import ModelInfo, Predictor

    network = create_model("mltr_tiny", num_classes=2).eval()
    animals = Predictor(network, ModelInfo(("cat", "dog"), (0.5, 0.5), network.config.input_contract()))
    monkeypatch.setattr(export, "load_predictor", lambda model, client, classes: animals)
    streets = types.SimpleNamespace(uri="/data/streets", classes=("car", "bus"), num_classes=2)
    monkeypatch.setattr(pipeline.dataset, "load_manifest", lambda uri: streets)
    flags = ["--model", "models:/animals/1", "--data", "/data/streets", "--out", str(tmp_path / "m.onnx")]
    store = sqlite_store  # the registry the model would be loaded from
    config = parse_config(export.ExportConfig, [*flags, "--mlflow-uri", store])
    with pytest.raises(ConfigError, match="predicts 2 classes that are not the dataset's /data/streets"):
        export.run(config)  # before anything is exported
    assert not list(tmp_path.glob("*.onnx"))
