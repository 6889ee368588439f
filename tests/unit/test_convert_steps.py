"""The conversion's per-batch steps as pure functions on Arrow tables (no Ray)."""

import io

import pyarrow as pa
import pytest
from PIL import Image

from mltr.errors import ConfigError
from pipeline.convert import plan_blocks, process_batch, split_processed
from pipeline.dataset import SCHEMA
from pipeline.images import ImageSettings

pytestmark = pytest.mark.unit


def write_jpeg(path, size):
    Image.new("RGB", size, (200, 10, 10)).save(path, "JPEG")


def test_process_batch_keeps_good_rows_and_reports_bad_ones(tmp_path):
    write_jpeg(tmp_path / "a.jpg", (300, 100))
    (tmp_path / "b.jpg").write_bytes(b"garbage")
    batch = pa.Table.from_pylist(
        [
            {
                "image_id": "a",
                "split": "train",
                "source_path": str(tmp_path / "a.jpg"),
                "labels": [1, 4],
                "ignore": [],
            },
            {
                "image_id": "b",
                "split": "val",
                "source_path": str(tmp_path / "b.jpg"),
                "labels": [2],
                "ignore": [3],
            },
            {
                "image_id": "c",
                "split": "val",
                "source_path": str(tmp_path / "c.jpg"),
                "labels": [0],
                "ignore": [],
            },
        ]
    )
    out = process_batch(batch, ImageSettings(max_side=150))
    parts, rejects = split_processed(out)
    assert list(parts) == ["train"]
    train = parts["train"]
    assert train.schema == SCHEMA
    assert train.to_pylist()[0]["labels"] == [1, 4]
    assert (train["width"][0].as_py(), train["height"][0].as_py()) == (150, 50)
    assert Image.open(io.BytesIO(train["image"][0].as_py())).size == (150, 50)
    assert [(r["image_id"], r["split"], r["reason"]) for r in rejects] == [
        ("b", "val", "unreadable"),
        ("c", "val", "missing"),
    ]
    assert all(r["source_path"].endswith(f"{r['image_id']}.jpg") and r["detail"] for r in rejects)


@pytest.mark.parametrize(
    ("entries", "rows_per_shard", "cpus", "expected"),
    [
        (0, 100, 2, 1),
        (10, 100, 2, 2),
        (3, 100, 4, 3),
        (2000, 1000, 2, 2),
        (5000, 1000, 4, 8),
        (82_081, 1000, 2, 84),
    ],
)
def test_plan_blocks(entries, rows_per_shard, cpus, expected):
    assert plan_blocks(entries, rows_per_shard, cpus) == expected


def test_a_commit_removes_what_earlier_runs_of_this_dataset_left_and_nothing_else(tmp_path):
    from pipeline.convert import _remove_stale_files
    from pipeline.storage import resolve

    files = {
        "train/part-new-0.parquet": True, "train/part-old-0.parquet": False, "_rejects-new.jsonl": True,
        "_rejects-old.jsonl": False, "_manifest.json": True, "_manifest.json.tmp-1a2b3c4d": False,
        "_lease.json.tmp-5e6f7a8b": True, "notes.txt": True, "_rejects-old.jsonl.tmp-9c0d1e2f": False,
        # Not this dataset's: predictions written beneath it, another dataset converted into it.
        "predictions/part-1.parquet": True, "voc/train/part-old-0.parquet": True, "voc/_manifest.json": True,
    }  # fmt: skip
    for rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    _remove_stale_files(resolve(str(tmp_path)), {"train/part-new-0.parquet", "_rejects-new.jsonl"})
    left = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {rel for rel, kept in files.items() if kept}


def test_a_conversion_told_to_wait_for_the_lease_waits_then_is_refused_naming_the_holder(tmp_path):
    import time
    import types

    from jobs import preprocess
    from jobs._config import parse_config
    from mltr.errors import ConfigError
    from pipeline.convert import convert
    from pipeline.storage import Lease, LeaseHeld, resolve

    config = parse_config(
        preprocess.PreprocessConfig, ["--root", "/src", "--out", str(tmp_path), "--lease-wait", "0.5"]
    )
    assert config.conversion.lease_wait == 0.5
    with pytest.raises(ConfigError, match="--lease-wait must be 0 or more"):
        preprocess.ConversionArgs(root="/src", out=str(tmp_path), lease_wait=-1)
    index = types.SimpleNamespace(name="coco", root="/src")
    with Lease(resolve(str(tmp_path / "coco")), "converting coco from /elsewhere"):
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match="converting coco from /elsewhere"):
            convert(index, str(tmp_path), lease_wait=config.conversion.lease_wait)
        assert time.monotonic() - started >= 0.5  # it waited for the holder before it was refused


def test_a_rerun_is_refused_when_any_split_it_rewrites_shrinks(tmp_path):
    from pipeline.convert import _refuse_shrink
    from pipeline.storage import resolve

    location = resolve(str(tmp_path))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "part-new-0.parquet").write_bytes(b"this run's shard")
    written = {"val/part-new-0.parquet"}
    rejects = [{"reason": "missing"}] * 15
    # val's images not mounted: val empties though train grows and the total barely moves.
    with pytest.raises(
        ConfigError, match=r"has 0 val rows where the committed dataset has 15 \(15 missing\)"
    ):
        _refuse_shrink(location, {"train": 45, "val": 15}, {"train": 55, "val": 0}, rejects, written)
    assert not (tmp_path / "val" / "part-new-0.parquet").exists()  # this run's shards are removed
    # A split the committed dataset never held has nothing to lose, and does not hide another's loss.
    with pytest.raises(ConfigError, match="has 15 train rows where the committed dataset has 45"):
        _refuse_shrink(location, {"train": 45}, {"train": 15, "val": 600}, [], set())
    _refuse_shrink(location, {"train": 45}, {"train": 23, "val": 0}, [], set())  # half is kept: not refused
    _refuse_shrink(location, {"train": 0, "val": 15}, {"train": 0, "val": 8}, [], set())
