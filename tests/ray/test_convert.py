"""The Ray Data conversion graph on a local Ray: exact rows, rejects, manifest, re-runs and crashes."""

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mltr.errors import ConfigError
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

    rejects_file = tmp_path / fmt / manifest.rejects.file
    assert sorted(p.name for p in (tmp_path / fmt).glob("_rejects*")) == [rejects_file.name]
    assert summary.rejects_file == str(rejects_file)  # the file the job's log points to
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
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


def test_rerun_with_fewer_splits_keeps_the_splits_it_does_not_rewrite(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("voc")
    convert(read_index("voc", str(root)), str(tmp_path))
    before = load_manifest(str(tmp_path / "voc"))
    convert(read_index("voc", str(root), ("train",)), str(tmp_path))
    manifest = load_manifest(str(tmp_path / "voc"))
    assert set(manifest.splits) == {"train", "val"}
    assert manifest.splits["val"] == before.splits["val"] and manifest.shards("train") != before.shards(
        "train"
    )
    assert read_split(str(tmp_path / "voc"), "val").count() == len(truth.rows("val"))
    assert read_split(str(tmp_path / "voc"), "train").count() == len(truth.rows("train"))
    # The kept split's rejects are still listed; the dataset is a new one (its identity changed).
    rejects = [
        json.loads(line) for line in (tmp_path / "voc" / manifest.rejects.file).read_text().splitlines()
    ]
    assert {r["image_id"]: r["reason"] for r in rejects} == truth.rejects()
    assert manifest.fingerprint not in (
        before.fingerprint,
        read_index("voc", str(root), ("train",)).fingerprint,
    )
    # An image of the kept train split listed in val too stays in train alone (a full conversion
    # keeps its first listing): in val it would be scored on after being trained on.
    listed = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    train_id, val_list = min(rows_by_id(str(tmp_path / "voc"), "train")), (listed / "test.txt").read_text()
    (listed / "test.txt").write_text(f"{val_list}{train_id}\n")  # the generated root is the session's
    try:
        convert(read_index("voc", str(root), ("val",)), str(tmp_path))
    finally:
        (listed / "test.txt").write_text(val_list)
    manifest = load_manifest(str(tmp_path / "voc"))
    assert train_id in rows_by_id(str(tmp_path / "voc"), "train")
    assert train_id not in rows_by_id(str(tmp_path / "voc"), "val")
    rejects = [
        json.loads(line) for line in (tmp_path / "voc" / manifest.rejects.file).read_text().splitlines()
    ]
    (duplicate,) = [r for r in rejects if r["image_id"] == train_id]
    assert duplicate["reason"] == "duplicate" and duplicate["split"] == "val"
    assert "the kept train split holds it" in duplicate["detail"]
    # Other image settings for one split would leave the manifest wrong about the kept one: refused.
    with pytest.raises(
        ConfigError, match=r"stores val with --max-side 512 --quality 90; this conversion asks --max-side 64"
    ):
        convert(read_index("voc", str(root), ("train",)), str(tmp_path), ImageSettings(max_side=64))
    assert load_manifest(str(tmp_path / "voc")) == manifest


def test_csv_lines_whose_split_cannot_be_read_are_in_the_report(ray_local, tmp_path):
    from pipeline.synthetic import generate

    generate("nuswide", tmp_path / "src", 12, seed=0, layout="csv")
    csv_path = tmp_path / "src" / "nus_wide.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].split(",", 1)[0] + ',"[' + "-" * 200_000 + '1]",train'  # over csv's field limit
    csv_path.write_text("\n".join(lines) + "\n")
    summary = convert(read_index("nuswide", str(tmp_path / "src")), str(tmp_path / "out"))
    unread = [r for r in summary.reject_examples if r["split"] == "unknown"]
    assert len(unread) == 1 and "line 4" in unread[0]["detail"]
    assert summary.rejects.get("bad_annotation") == 1
    manifest = load_manifest(str(tmp_path / "out" / "nuswide"))
    assert (
        manifest.rejects.by_split["unknown"] == 1
        and sum(manifest.rejects.by_split.values()) == manifest.rejects.total
    )


def test_an_interrupted_rerun_leaves_the_committed_dataset_readable(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("coco")
    index = read_index("coco", str(root))
    convert(index, str(tmp_path))
    committed = load_manifest(str(tmp_path / "coco"))
    # A label that does not fit the int32 schema makes the shard writer fail inside a Ray task.
    bad = index.entries[0]
    index.entries[0] = ImageEntry(bad.image_id, bad.split, bad.source_path, (2**40,))
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray wraps the worker's error in
        convert(index, str(tmp_path))
    assert load_manifest(str(tmp_path / "coco")) == committed
    assert read_split(str(tmp_path / "coco"), "train").count() == len(truth.rows("train"))
    assert not (tmp_path / "coco" / "_lease.json").exists()  # released on the way out


def test_a_manifest_that_cannot_be_read_is_replaced_only_by_every_split(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("voc")
    convert(read_index("voc", str(root)), str(tmp_path))
    (tmp_path / "voc" / MANIFEST).write_text("{ torn")
    train_shards = sorted((tmp_path / "voc" / "train").glob("*.parquet"))
    with pytest.raises(ConfigError, match="cannot be read .* would remove the shards of the other splits"):
        convert(read_index("voc", str(root), ("val",)), str(tmp_path))
    assert sorted((tmp_path / "voc" / "train").glob("*.parquet")) == train_shards and train_shards
    convert(read_index("voc", str(root)), str(tmp_path))  # every split: it replaces the dataset
    assert read_split(str(tmp_path / "voc"), "train").count() == len(truth.rows("train"))


def test_a_first_conversion_that_crashes_leaves_no_readable_dataset(ray_local, synthetic_root, tmp_path):
    root, _ = synthetic_root("coco")
    index = read_index("coco", str(root))
    bad = index.entries[0]
    index.entries[0] = ImageEntry(bad.image_id, bad.split, bad.source_path, (2**40,))
    with pytest.raises(Exception):  # noqa: B017
        convert(index, str(tmp_path))
    assert not (tmp_path / "coco" / MANIFEST).exists()
    with pytest.raises(DatasetNotFound, match="did not finish"):
        read_split(str(tmp_path / "coco"), "train")


def test_a_rerun_that_loses_most_rows_is_refused_and_changes_nothing(ray_local, synthetic_root, tmp_path):
    root, truth = synthetic_root("coco")
    convert(read_index("coco", str(root)), str(tmp_path))
    committed = load_manifest(str(tmp_path / "coco"))
    files_before = sorted(p.name for p in (tmp_path / "coco").rglob("*") if p.is_file())
    # The image folders are not mounted: empty mount points, every image missing.
    for folder in ("train2014", "val2014"):
        (root / folder).rename(tmp_path / folder)
        (root / folder).mkdir()
    try:
        with pytest.raises(
            ConfigError,
            match=r"refused to replace .* has 0 train rows where the committed dataset has \d+, 0 val rows "
            r"where the committed dataset has \d+ \(\d+ missing.*--allow-shrink",
        ):
            convert(read_index("coco", str(root)), str(tmp_path))
        assert load_manifest(str(tmp_path / "coco")) == committed
        assert sorted(p.name for p in (tmp_path / "coco").rglob("*") if p.is_file()) == files_before
        # Asked for, the shrunken dataset replaces it.
        summary = convert(read_index("coco", str(root)), str(tmp_path), allow_shrink=True)
        assert (
            summary.rows == {"train": 0, "val": 0}
            and load_manifest(str(tmp_path / "coco")).rows("train") == 0
        )
    finally:
        for folder in ("train2014", "val2014"):
            (root / folder).rmdir()
            (tmp_path / folder).rename(root / folder)


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

    # The pipeline does not take that dataset for done because its annotations have not changed:
    # with the images fixed, it converts again; then it skips.
    from jobs import pipeline

    generate("coco", root, 4, seed=0)
    config = pipeline.parse(["--dataset", "coco", "--root", str(root), "--out", str(tmp_path / "out")])
    again = pipeline.stage_preprocess(config, address=None)
    assert not again["skipped"] and again["rows"] == {s: len(truth.rows(s)) for s in ("train", "val")}
    assert pipeline.stage_preprocess(config, address=None)["skipped"]


def test_two_conversions_into_one_folder_at_once_the_second_is_refused(ray_local, tmp_path):
    from pipeline.storage import LeaseHeld
    from pipeline.synthetic import generate

    root = tmp_path / "src"
    truth = generate("coco", root, 240, seed=2, size=(320, 240))
    out = tmp_path / "out"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.preprocess",
            "--dataset",
            "coco",
            "--root",
            str(root),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lease = out / "coco" / "_lease.json"
    deadline = time.monotonic() + 120
    while not lease.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.exists(), "the first conversion never took its lease"
    holder = json.loads(lease.read_text())
    with pytest.raises(LeaseHeld) as info:
        convert(read_index("coco", str(root)), str(out))
    assert f":{first.pid}" in str(info.value) and holder["started_at"] in str(info.value)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    # The first committed a whole dataset: every listed shard is there, every row is read back.
    manifest = load_manifest(str(out / "coco"))
    assert all(Path(path).is_file() for split in ("train", "val") for path in manifest.files(split))
    assert read_split(manifest, "train").count() == len(truth.rows("train"))
    assert not lease.exists()
