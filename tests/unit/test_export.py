"""ONNX export of the network (dynamo exporter, dynamic batch) computes what PyTorch computes."""

import numpy as np
import onnxruntime  # the export extra, which `make test` installs
import pytest
import torch

from jobs.export import export_onnx
from mltr import create_model

pytestmark = pytest.mark.unit


def test_the_exported_graph_matches_pytorch_at_another_batch_size(tmp_path):
    torch.manual_seed(0)
    # Shifted windows (the masked attention path) and the cross-window part, as every variant has.
    network = create_model("mltr_tiny", num_classes=5).eval()
    assert network.config.cross_window
    for p in network.parameters():  # the cross-window gate starts at zero: give it weight
        p.data.add_(0.05 * torch.randn_like(p))
    export_onnx(network, torch.randn(2, 3, 64, 64), tmp_path / "m.onnx")

    images = torch.randn(5, 3, 64, 64)  # not the traced batch size
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    with torch.no_grad():
        expected = network(images).numpy()
    assert got.shape == (5, 5)
    assert np.abs(got - expected).max() <= 1e-4


def test_an_export_that_fails_its_check_leaves_the_earlier_one_as_it_was(tmp_path, monkeypatch):
    import io
    import json
    from pathlib import Path

    from PIL import Image

    from jobs import export
    from jobs._config import parse_config
    from mltr.checkpoint import save_selected_model

    network = create_model("mltr_tiny", num_classes=2).eval()
    folder = save_selected_model(network, (0.5, 0.5), tmp_path / "checkpoint")
    monkeypatch.setattr(export, "checkpoint_classes", lambda model, data, flag: ("x", "y"))
    images = []
    for seed in range(2):
        buffer = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG")
        images.append(tmp_path / f"{seed}.jpg")
        images[-1].write_bytes(buffer.getvalue())
    out = tmp_path / "export" / "m.onnx"
    out.parent.mkdir()
    out.write_bytes(b"an earlier, checked export")
    Path(f"{out}.json").write_text('{"classes": ["earlier"]}')
    flags = ["--model", str(folder), "--out", str(out), *map(str, images)]

    with pytest.raises(export.ExportMismatch, match="m.onnx is as it was"):
        export.run(parse_config(export.ExportConfig, [*flags, "--atol", "-1"]))  # no difference passes
    assert out.read_bytes() == b"an earlier, checked export"
    assert json.loads(Path(f"{out}.json").read_text()) == {"classes": ["earlier"]}

    result = export.run(parse_config(export.ExportConfig, flags))
    assert result["max_abs_diff"] <= 1e-4 and sorted(p.name for p in out.parent.iterdir()) == [
        "m.onnx",
        "m.onnx.json",
    ]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["mltr.source"] == str(folder)
    assert json.loads(Path(f"{out}.json").read_text())["classes"] == ["x", "y"]


def test_a_model_is_checked_on_a_dataset_only_if_it_predicts_that_datasets_classes(tmp_path, monkeypatch):
    import types

    import pipeline.dataset
    from jobs import export
    from jobs._config import parse_config
    from mltr.errors import ConfigError
    from mltr.serving import ModelInfo, Predictor

    network = create_model("mltr_tiny", num_classes=2).eval()
    animals = Predictor(network, ModelInfo(("cat", "dog"), (0.5, 0.5), network.config.input_contract()))
    monkeypatch.setattr(export, "load_predictor", lambda model, client, classes: animals)
    streets = types.SimpleNamespace(uri="/data/streets", classes=("car", "bus"), num_classes=2)
    monkeypatch.setattr(pipeline.dataset, "load_manifest", lambda uri: streets)
    flags = ["--model", "models:/animals/1", "--data", "/data/streets", "--out", str(tmp_path / "m.onnx")]
    config = parse_config(
        export.ExportConfig, [*flags, "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    )
    with pytest.raises(ConfigError, match="predicts 2 classes that are not the dataset's /data/streets"):
        export.run(config)  # before anything is exported
    assert not list(tmp_path.glob("*.onnx"))
