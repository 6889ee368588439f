"""Ray Data batch inference on a local Ray: decoding in tasks or in the model actors, same answers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs._models import CheckpointData
from jobs.predict import batch_inference, in_input_order
from mltr import create_model
from mltr.checkpoint import save_selected_model
from mltr.serving import ModelInfo, Predictor

pytestmark = pytest.mark.ray


def test_decoding_in_the_actors_answers_as_in_tasks_and_keeps_the_bad_rows(
    ray_local, synthetic_root, tmp_path
):
    root, _ = synthetic_root("voc")
    good = sorted(str(p) for p in Path(root).rglob("*.jpg"))[:40]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    paths = [*good[:20], str(tmp_path / "broken.jpg"), *good[20:], str(tmp_path / "gone.jpg")]

    torch.manual_seed(0)
    network = create_model("mltr_tiny", num_classes=3).eval()
    # The dataset's images stored at 32 px: each image is made so (downscaled, re-encoded) before
    # it is resized, in the decode tasks and in the actors alike.
    checkpoint = CheckpointData(("a", "b", "c"), {"max_side": 32, "quality": 80})
    contract = network.config.input_contract() | {"stored": checkpoint.stored}
    info = ModelInfo(checkpoint.classes, (0.45, 0.5, 0.55), contract)
    folder = str(save_selected_model(network, info.thresholds, tmp_path / "checkpoint"))
    expected = Predictor(network, info).predict_encoded((p, None, p) for p in paths)

    source = ray_local.data.from_items([{"path": p} for p in paths])
    for decode, calls in (("tasks", None), ("actor", 3)):  # three calls at once in one actor
        rows = batch_inference(
            source, folder, info, None, checkpoint, 8, 1, decode=decode, calls_per_actor=calls
        )
        got = {r["id"]: r for r in rows.take_all()}
        assert sorted(got) == sorted(paths), decode
        for path, want in zip(paths, expected, strict=True):
            row = got[path]
            assert (row["error"] or None) == want["error"], (decode, path)
            assert list(row["labels"]) == want["labels"], (decode, path)
            np.testing.assert_allclose(row["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    assert "not a decodable JPEG or PNG image" in got[str(tmp_path / "broken.jpg")]["error"]
    assert "gone.jpg: no such file" in got[str(tmp_path / "gone.jpg")]["error"]


def test_json_lines_from_ray_data_follow_the_inputs(ray_local, synthetic_root, tmp_path):
    root, _ = synthetic_root("voc")
    paths = sorted(str(p) for p in Path(root).rglob("*.jpg"))[:48]
    network = create_model("mltr_tiny", num_classes=2).eval()
    info = ModelInfo(("a", "b"), (0.5, 0.5), network.config.input_contract())
    folder = str(save_selected_model(network, info.thresholds, tmp_path / "checkpoint"))
    source = ray_local.data.from_items([{"path": p} for p in paths], override_num_blocks=24)
    # Two actors, three calls at once in each: batches finish out of turn.
    rows = batch_inference(
        source, folder, info, None, CheckpointData(("a", "b")), 2, 2, decode="actor", calls_per_actor=4
    )
    assert [r["id"] for r in in_input_order(rows).iter_rows()] == paths
