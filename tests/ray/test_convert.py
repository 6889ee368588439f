"""The Ray Data conversion graph on a local Ray: exact rows, rejects, manifest, re-runs and crashes."""

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.convert import convert
from pipeline.dataset import MANIFEST, DatasetNotFound, load_manifest, read_split
from pipeline.images import ImageSettings
from pipeline.readers import ImageEntry, read_index

pytestmark = pytest.mark.ray

CASES = [("coco", "official"), ("voc", "official"), ("nuswide", "official"), ("nuswide", "csv")]


def rows_by_id(uri, split):
    return {r["image_id"]: r for r in read_split(uri, split).take_all()}


@pytest.mark.parametrize(("fmt", "layout"), CASES)
def test_conversion_matches_what_was_drawn(ray_local, synthetic_root, tmp_path, fmt, layout):
    root, truth = synthetic_root(fmt, layout)
    summary = convert(
        read_index(fmt, str(root)), str(tmp_path), ImageSettings(max_side=200), rows_per_shard=8
    )
    uri = str(tmp_path / fmt)
    manifest = load_manifest(uri)
    assert summary.uri == uri and list(manifest.classes) == truth.classes

    for split in ("train", "val"):
        rows = rows_by_id(uri, split)
        expected = {im.image_id: im for im in truth.rows(split)}
        assert set(rows) == set(expected)
        assert manifest.rows(split) == len(rows) == summary.rows[split]
        assert all(n <= 8 for n in (pq.read_metadata(p).num_rows for p in manifest.files(split)))
        for image_id, row in rows.items():
            drawn = expected[image_id]
            assert row["labels"] == drawn.labels and row["ignore"] == drawn.ignore
            assert row["source_path"] == str(root / drawn.file)
            img = Image.open(io.BytesIO(row["image"]))
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (row["width"], row["height"])
            assert max(img.size) == min(200, max(drawn.width, drawn.height))

    rejects = [json.loads(line) for line in (tmp_path / fmt / "_rejects.jsonl").read_text().splitlines()]
    assert {r["image_id"]: r["reason"] for r in rejects} == truth.rejects()
    assert all(r["source_path"] and r["detail"] for r in rejects)
    assert manifest.rejects.total == len(truth.rejects())
    assert manifest.empty == {"train": truth.empty("train"), "val": truth.empty("val")}
    assert manifest.image.max_side == 200
    assert manifest.fingerprint == read_index(fmt, str(root)).fingerprint


def test_rerun_leaves_one_copy(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("coco")
    index = read_index("coco", str(root))
    convert(index, str(tmp_path), rows_per_shard=10)
    first = sorted(p.name for p in (tmp_path / "coco" / "train").iterdir())
    convert(index, str(tmp_path), rows_per_shard=10)
    second = sorted(p.name for p in (tmp_path / "coco" / "train").iterdir())
    assert set(first).isdisjoint(second), "the second run writes new shards and removes the old ones"
    assert read_split(str(tmp_path / "coco"), "train").count() == len(truth.rows("train"))
    assert sum(1 for _ in (tmp_path / "coco").rglob("*.parquet")) == len(
        load_manifest(str(tmp_path / "coco")).files("train")
    ) + len(load_manifest(str(tmp_path / "coco")).files("val"))


def test_rerun_with_fewer_splits_removes_the_dropped_split(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("voc")
    convert(read_index("voc", str(root)), str(tmp_path))
    convert(read_index("voc", str(root), ("train",)), str(tmp_path))
    manifest = load_manifest(str(tmp_path / "voc"))
    assert list(manifest.splits) == ["train"]
    assert not list((tmp_path / "voc" / "val").glob("*.parquet"))
    with pytest.raises(KeyError, match="no split 'val'"):
        manifest.files("val")


def test_crash_mid_conversion_leaves_no_readable_dataset(ray_local, synthetic_root, tmp_path):
    root, _ = synthetic_root("coco")
    index = read_index("coco", str(root))
    convert(index, str(tmp_path))
    assert load_manifest(str(tmp_path / "coco"))
    # A label that does not fit the int32 schema makes the shard writer fail inside a Ray task.
    bad = index.entries[0]
    index.entries[0] = ImageEntry(bad.image_id, bad.split, bad.source_path, (2**40,))
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray wraps the worker's error in
        convert(index, str(tmp_path))
    assert not (tmp_path / "coco" / MANIFEST).exists()
    with pytest.raises(DatasetNotFound, match="did not finish"):
        read_split(str(tmp_path / "coco"), "train")


def test_dataset_where_every_image_is_rejected(ray_local, tmp_path):
    from pipeline.synthetic import generate

    root = tmp_path / "src"
    truth = generate("coco", root, 4, seed=0)
    for image in truth.images:
        (root / image.file).write_bytes(b"not a jpeg")
    summary = convert(read_index("coco", str(root)), str(tmp_path / "out"))
    assert summary.rows == {"train": 0, "val": 0}
    assert summary.rejects == {"unreadable": len(truth.rows())}
    assert read_split(str(tmp_path / "out" / "coco"), "train").count() == 0
