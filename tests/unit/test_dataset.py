"""The dataset's contracts: the typed manifest and its file, and the calibration split of train."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import (
    MANIFEST,
    SCHEMA,
    CalibSplit,
    ConversionInfo,
    DatasetNotFound,
    ImageInfo,
    Manifest,
    RejectSummary,
    ShardFile,
    SourceInfo,
    SplitInfo,
    calib_score,
    load_manifest,
    plan_calibration,
)
from pipeline.storage import resolve

pytestmark = pytest.mark.unit

# A manifest as the converter wrote it before the typed class existed (schema version 1): the
# file's layout is the contract, and such datasets must keep loading.
WRITTEN_BEFORE = {
    "schema_version": 1,
    "dataset": "voc",
    "created_at": "2026-11-27T20:58:00+00:00",
    "run_id": "20261127T205800-abc123",
    "classes": ["aeroplane", "bicycle"],
    "num_classes": 2,
    "columns": ["image_id", "image", "width", "height", "labels", "ignore", "source_path"],
    "splits": {
        "train": {"rows": 5, "files": [{"path": "train/part-a.parquet", "rows": 5}]},
        "val": {"rows": 0, "files": []},
    },
    "empty": {"train": 1, "val": 0},
    "rejects": {
        "total": 2,
        "by_reason": {"missing": 2},
        "by_split": {"train": 2, "val": 0},
        "file": "_rejects.jsonl",
    },
    "image": {"format": "jpeg", "max_side": 512, "quality": 90, "max_pixels": 89478485},
    "source": {"root": "/data/voc", "layout": "voc2007", "fingerprint": "sha256:00ff"},
    "conversion": {"rows_per_shard": 1000, "seconds": 1.5, "images_per_second": 3.33},
}


def manifest() -> Manifest:
    return Manifest(
        dataset="coco",
        classes=("person", "bicycle", "car"),
        splits={
            "train": SplitInfo(
                7, (ShardFile("train/part-1.parquet", 4), ShardFile("train/part-2.parquet", 3))
            ),
            "val": SplitInfo(2, (ShardFile("val/part-1.parquet", 2),)),
        },
        empty={"train": 0, "val": 1},
        rejects=RejectSummary(total=1, by_reason={"corrupt": 1}, by_split={"train": 1, "val": 0}),
        image=ImageInfo(format="jpeg", max_side=512, quality=90, max_pixels=1000),
        source=SourceInfo(root="/data/coco", layout="coco2014", fingerprint="sha256:abc"),
        conversion=ConversionInfo(rows_per_shard=4, seconds=2.0, images_per_second=4.5),
        run_id="run-1",
        created_at="2026-11-29T00:00:00+00:00",
    )


def test_manifest_round_trips_through_its_file(tmp_path):
    written = manifest().write(resolve(str(tmp_path / "coco")))
    assert (tmp_path / "coco" / MANIFEST).is_file()
    loaded = load_manifest(str(tmp_path / "coco"))
    assert loaded == written == manifest()
    assert loaded.location.path == str(tmp_path / "coco")
    assert loaded.rows("train") == 7 and loaded.num_classes == 3 and loaded.fingerprint == "sha256:abc"
    assert loaded.name == "coco" and loaded.stored_images() == {"max_side": 512, "quality": 90}
    assert loaded.files("val") == [str(tmp_path / "coco" / "val" / "part-1.parquet")]
    assert json.loads(loaded.to_json())["num_classes"] == 3


def test_a_manifest_written_before_the_typed_class_still_loads(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(WRITTEN_BEFORE))
    loaded = load_manifest(str(tmp_path))
    assert loaded.classes == ("aeroplane", "bicycle") and loaded.rows("train") == 5
    assert loaded.shards("train") == (ShardFile("train/part-a.parquet", 5),)
    assert loaded.rejects.by_reason == {"missing": 2} and loaded.image.max_side == 512
    assert json.loads(loaded.to_json()) == WRITTEN_BEFORE  # and writes back the same file


def test_a_malformed_or_foreign_manifest_is_refused_naming_the_file(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({**WRITTEN_BEFORE, "splits": None}))
    with pytest.raises(DatasetNotFound, match=f"{tmp_path / MANIFEST}.*malformed"):
        load_manifest(str(tmp_path))
    (tmp_path / MANIFEST).write_text(json.dumps({**WRITTEN_BEFORE, "schema_version": 2}))
    with pytest.raises(DatasetNotFound, match="schema version 2"):
        load_manifest(str(tmp_path))
    for foreign, problem in ((b"[1, 2]", "malformed manifest .a JSON list"), (b"null", "malformed"),
                             (b"PAR1\xff\xfe\x00", "unreadable manifest"), (b"{", "unreadable manifest")):  # fmt: skip
        (tmp_path / MANIFEST).write_bytes(foreign)
        with pytest.raises(DatasetNotFound, match=f"{tmp_path / MANIFEST}: {problem}"):
            load_manifest(str(tmp_path))
    with pytest.raises(KeyError, match="no split 'test'"):
        manifest().rows("test")


def test_read_columns_reads_the_listed_shards_only(tmp_path):
    location = resolve(str(tmp_path / "ds"))
    rows = [
        {"image_id": f"im{i}", "image": b"x", "width": 1, "height": 1, "labels": [i % 3], "ignore": [],
         "source_path": "p"}
        for i in range(7)
    ]  # fmt: skip
    (tmp_path / "ds" / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4], SCHEMA), str(tmp_path / "ds" / "train" / "part-1.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[4:], SCHEMA), str(tmp_path / "ds" / "train" / "part-2.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[:1], SCHEMA), str(tmp_path / "ds" / "train" / "stray.parquet"))
    loaded = manifest().write(location)
    table = loaded.read_columns("train", ["image_id", "labels"])
    assert table.column_names == ["image_id", "labels"]
    assert table["image_id"].to_pylist() == [f"im{i}" for i in range(7)]


# --- the calibration split -------------------------------------------------------------------------


IDS = [f"COCO_train2014_{i:012d}" for i in range(20_000)]


def members(split: CalibSplit, ids: list[str]) -> set[str]:
    return {i for i, keep in zip(ids, split.calib.mask(ids), strict=True) if keep}


def test_calibration_split_is_deterministic_and_disjoint_from_what_is_trained_on():
    split = plan_calibration(IDS, fraction=0.1, max_rows=5000)
    assert split == plan_calibration(list(reversed(IDS)), fraction=0.1, max_rows=5000)  # order-free
    calib, fit = split.calib.mask(IDS), split.fit.mask(IDS)
    assert not (calib & fit).any() and (calib | fit).all()  # a partition of train
    assert calib.sum() == split.calib_rows and fit.sum() == split.fit_rows == len(IDS) - split.calib_rows
    assert 0.09 * len(IDS) < split.calib_rows < 0.11 * len(IDS)  # a hash: about the fraction
    assert all(0.0 <= calib_score(i) < 1.0 for i in IDS[:100])


def test_calibration_split_is_stable_when_rows_are_added():
    before = plan_calibration(IDS[:10_000], fraction=0.1, max_rows=5000)
    after = plan_calibration(IDS, fraction=0.1, max_rows=5000)
    # Under the cap a row's membership depends on its id alone: old rows keep their side.
    assert members(after, IDS[:10_000]) == members(before, IDS[:10_000])


def test_calibration_split_respects_its_cap_and_never_pulls_a_trained_row_in():
    small = plan_calibration(IDS[:10_000], fraction=0.1, max_rows=600)
    large = plan_calibration(IDS, fraction=0.1, max_rows=600)
    assert small.calib_rows == large.calib_rows == 600
    old_calib, new_calib = members(small, IDS[:10_000]), members(large, IDS[:10_000])
    assert new_calib <= old_calib  # new rows may push calibration rows out, never pull trained rows in


def test_an_empty_or_impossible_calibration_split_is_refused():
    below_its_score = calib_score("only-one") / 2
    with pytest.raises(ValueError, match="is empty: raise --calib-fraction"):
        plan_calibration(["only-one"], fraction=below_its_score, max_rows=10)
    with pytest.raises(ValueError, match="fraction must be in"):
        plan_calibration(IDS, fraction=1.0, max_rows=10)
