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
