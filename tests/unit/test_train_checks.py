"""What the training driver refuses before any Ray worker starts, in one line naming the file or flag."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import train as train_job
from jobs._config import from_flat
from mltr import create_model, save_checkpoint
from mltr.errors import ConfigError, MltrError
from pipeline.dataset import (
    SCHEMA,
    ConversionInfo,
    DatasetDamaged,
    ImageInfo,
    Manifest,
    RejectSummary,
    ShardFile,
    SourceInfo,
    SplitInfo,
    SplitNotFound,
    load_manifest,
)
from pipeline.storage import resolve

pytestmark = pytest.mark.unit

CLASSES = ("a", "b", "c")


def write_dataset(
    folder, splits=("train", "val"), rows=40, labels=lambda split, image_id, i: [i % 3]
) -> Manifest:
    """A committed dataset (labels only matter here), written without Ray: ``rows`` per split in 2 shards."""
    infos = {}
    for split in splits:
        (folder / split).mkdir(parents=True)
        shards = []
        for part in range(2):
            table = pa.Table.from_pylist(
                [
                    {"image_id": f"{split}-{part}-{i}", "image": b"\xff\xd8", "width": 8, "height": 8,
                     "labels": labels(split, f"{split}-{part}-{i}", i), "ignore": [], "source_path": "x"}
                    for i in range(rows // 2)
                ],
                SCHEMA,
            )  # fmt: skip
            pq.write_table(table, folder / split / f"part-{part}.parquet")
            shards.append(ShardFile(f"{split}/part-{part}.parquet", rows // 2))
        infos[split] = SplitInfo(rows, tuple(shards))
    return Manifest(
        dataset="toy",
        classes=CLASSES,
        splits=infos,
        empty=dict.fromkeys(splits, 0),
        rejects=RejectSummary(0, {}, dict.fromkeys(splits, 0)),
        image=ImageInfo("jpeg", 512, 90, 1000),
        source=SourceInfo("/src", "test", "sha256:0"),
        conversion=ConversionInfo(20, 1.0, 40.0),
        run_id="r",
        created_at="2026-11-29T00:00:00+00:00",
    ).write(resolve(str(folder)))


def config(folder, tmp_path, **values):
    return from_flat(
        train_job.TrainConfig,
        {"data": str(folder), "workdir": str(tmp_path / "work"), "batch_size": 4, "num_workers": 2, **values},
    )


def test_a_sound_dataset_resolves_with_its_calibration_split(tmp_path):
    write_dataset(tmp_path / "ds")
    resolved = train_job.resolve(config(tmp_path / "ds", tmp_path, calib_fraction=0.25))
    assert resolved.calib.calib_rows + resolved.calib.fit_rows == 40 and resolved.model.num_classes == 3


def test_a_calibration_slice_or_a_val_split_without_a_positive_label_is_refused(tmp_path):
    from pipeline.dataset import calib_score

    # Positives only on the rows training fits on: the calibration rows hold none.
    def fit_rows_only(split, image_id, i):
        return [i % 3] if split == "val" or calib_score(image_id) >= 0.25 else []

    write_dataset(tmp_path / "calib", labels=fit_rows_only)
    with pytest.raises(ConfigError, match=r"calibration rows \(of split 'train'\) hold no positive label"):
        train_job.resolve(config(tmp_path / "calib", tmp_path, calib_fraction=0.25))
    write_dataset(tmp_path / "val", labels=lambda split, image_id, i: [i % 3] if split == "train" else [])
    with pytest.raises(ConfigError, match="split 'val' holds no positive label"):
        train_job.resolve(config(tmp_path / "val", tmp_path))


def test_a_truncated_or_deleted_shard_is_named_before_training(tmp_path):
    write_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "train" / "part-1.parquet"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DatasetDamaged, match=f"{shard}: a shard the manifest lists is unreadable"):
        train_job.resolve(config(tmp_path / "ds", tmp_path))
    shard.unlink()
    with pytest.raises(DatasetDamaged, match=f"{shard}: a shard the manifest lists is missing"):
        train_job.resolve(config(tmp_path / "ds", tmp_path))


def test_a_shard_with_other_rows_than_listed_is_named(tmp_path):
    write_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "val" / "part-0.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 5), shard)
    with pytest.raises(DatasetDamaged, match=f"{shard}: 5 rows, the manifest lists 20"):
        train_job.resolve(config(tmp_path / "ds", tmp_path))


def test_a_dataset_without_val_is_refused_naming_the_split(tmp_path):
    write_dataset(tmp_path / "ds", splits=("train",))
    with pytest.raises(SplitNotFound) as info:
        train_job.resolve(config(tmp_path / "ds", tmp_path))
    assert str(info.value) == f"dataset {tmp_path / 'ds'} has no split 'val'; it has ['train']"


class Payload:
    """Stands for code a pickle could run on load."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.parametrize("kind", ["text", "pickle", "other-model"])
def test_an_init_from_that_is_not_a_fitting_checkpoint_is_named_before_training(tmp_path, kind):
    write_dataset(tmp_path / "ds")
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("not a checkpoint")
        message = "not a readable checkpoint"
    elif kind == "pickle":
        torch.save({"model": Payload()}, path)
        message = "not a plain checkpoint, refused unread"
    else:
        save_checkpoint(create_model("mltr_tiny", num_classes=3, embed_dim=16, num_heads=(1, 2, 4, 8)), path)
        message = "disagree on shapes"
    with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
        train_job.resolve(config(tmp_path / "ds", tmp_path, init_from=str(path)))


def test_workers_beyond_the_cores_of_a_local_ray_need_oversubscribe(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with pytest.raises(
        ConfigError, match="8 workers x 1 CPUs need 8 cores; this machine has 2.*--oversubscribe"
    ):
        train_job.check_local_cores(config(tmp_path / "ds", tmp_path, num_workers=8))
    train_job.check_local_cores(config(tmp_path / "ds", tmp_path, num_workers=8, oversubscribe=True))
    train_job.check_local_cores(config(tmp_path / "ds", tmp_path, num_workers=8, address="auto"))
    train_job.check_local_cores(config(tmp_path / "ds", tmp_path, num_workers=2))


def test_the_job_reports_a_damaged_dataset_in_one_line_and_exits_2(tmp_path):
    write_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "val" / "part-1.parquet").unlink()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--data",
            str(tmp_path / "ds"),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert lines == [
        f"train: error: {tmp_path / 'ds' / 'val' / 'part-1.parquet'}: a shard the manifest lists is missing; convert again"
    ]
    assert "Traceback" not in proc.stderr and issubclass(DatasetDamaged, MltrError)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_scoring_or_predicting_a_damaged_split_names_the_shard_before_any_work(tmp_path, damage):
    from jobs import predict as predict_job
    from jobs._models import score_split
    from mltr.checkpoint import save_selected_model

    write_dataset(tmp_path / "ds")
    shard = tmp_path / "ds" / "val" / "part-0.parquet"  # the first read: no model is needed before it
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    says = f"{shard}: a shard the manifest lists is"
    with pytest.raises(DatasetDamaged, match=says):  # evaluate's and promote's scoring
        score_split(None, load_manifest(str(tmp_path / "ds")), "val")
    folder = save_selected_model(
        create_model("mltr_tiny", num_classes=3), (0.5,) * 3, tmp_path / "checkpoint"
    )
    config = predict_job.PredictConfig(
        model=str(folder), data=str(tmp_path / "ds"), parquet_out=str(tmp_path / "out")
    )
    with pytest.raises(DatasetDamaged, match=says):  # before Ray starts
        predict_job.run(config)


def test_pickles_are_never_loaded_from_checkpoints(tmp_path, capsys):
    torch.save({"format": "mltr", "version": 1, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="refused unread"):
        from mltr import load_checkpoint

        load_checkpoint(tmp_path / "evil.pt")
    assert "this ran while loading" not in capsys.readouterr().out
    pickle.loads(pickle.dumps(Payload()))  # the payload really runs on a plain pickle load
    assert "this ran while loading" in capsys.readouterr().out
