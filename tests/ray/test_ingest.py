"""The training ingest on a local Ray: a converted dataset in, uint8 batches with the stored labels out."""

import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.convert import convert
from pipeline.dataset import DatasetNotFound, load_manifest, plan_calibration
from pipeline.images import ImageSettings
from pipeline.ingest import (
    INPUT_COLUMNS,
    AugmentConfig,
    IngestConfig,
    ShardUnits,
    build_dataset,
    transform_batch,
)
from pipeline.readers import read_index
from pipeline.synthetic import generate

pytestmark = pytest.mark.ray

SIZE = 32


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    """A converted COCO-layout dataset: 48 train rows in 3 shards, 16 val rows; returns its manifest."""
    root, out = tmp_path_factory.mktemp("coco-src"), tmp_path_factory.mktemp("coco-converted")
    generate("coco", root, 64, seed=3)
    convert(read_index("coco", str(root)), str(out), ImageSettings(max_side=96), rows_per_shard=16)
    return load_manifest(str(out / "coco"))


def stored_rows(manifest, split: str) -> dict[str, dict]:
    rows = {}
    for shard in manifest.files(split):
        for row in pq.read_table(shard, columns=INPUT_COLUMNS).to_pylist():
            rows[row["image_id"]] = row
    return rows


def expected_targets(row: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    targets, mask = np.zeros(num_classes, np.float32), np.zeros(num_classes, bool)
    targets[row["labels"]] = 1
    mask[row["ignore"]] = True
    targets[row["ignore"]] = 0
    return targets, mask


def as_batch(row: dict) -> dict[str, np.ndarray]:
    """One stored row as a numpy batch of one, the way Ray Data hands it to the map."""
    batch = {key: np.empty(1, dtype=object) for key in INPUT_COLUMNS}
    for key in INPUT_COLUMNS:
        batch[key][0] = np.asarray(row[key], dtype=np.int32) if key in ("labels", "ignore") else row[key]
    return batch


def tasks_executed(stats: str) -> dict[str, int]:
    return {name: int(n) for name, n in re.findall(r"Operator \d+ (.+?): (\d+) tasks executed", stats)}


def test_torch_batches_carry_the_stored_labels(dataset):
    manifest = dataset
    stored = stored_rows(dataset, "train")
    cfg = IngestConfig(num_classes=manifest.num_classes, image_size=SIZE, augment=AugmentConfig())
    ds = build_dataset(dataset, "train", cfg, rows_per_task=8)
    got_targets, got_masks = [], []
    for batch in ds.iter_torch_batches(batch_size=10, local_shuffle_buffer_size=16):
        n = len(batch["image"])
        assert set(batch) == {"image", "targets", "ignore_mask"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (n, 3, SIZE, SIZE)
        assert batch["targets"].dtype == torch.float32 and batch["targets"].shape == (n, 80)
        assert batch["ignore_mask"].dtype == torch.bool and batch["ignore_mask"].shape == (n, 80)
        got_targets += [tuple(t) for t in batch["targets"].numpy()]
        got_masks += [tuple(m) for m in batch["ignore_mask"].numpy()]
    assert len(got_targets) == manifest.rows("train") == len(stored) == 48
    # Per image, up to order: the multiset of (targets) rows equals the one the stored labels give.
    expected = [expected_targets(row, 80) for row in stored.values()]
    assert Counter(got_targets) == Counter(tuple(t) for t, _ in expected)
    assert Counter(got_masks) == Counter(tuple(m) for _, m in expected)
    # Decoding and augmenting ran in several tasks, fused with the read into one operator.
    tasks = tasks_executed(ds.stats())
    assert tasks == {"ReadMltrShards->MapBatches(transform_batch)": 6}


def test_validation_rows_match_the_pure_transform_per_image(dataset):
    stored = stored_rows(dataset, "val")
    cfg = IngestConfig(num_classes=80, image_size=SIZE, keep_ids=True)
    seen = set()
    for batch in build_dataset(dataset, "val", cfg, rows_per_task=4).iter_batches(batch_format="numpy"):
        for i, image_id in enumerate(batch["image_id"]):
            row = stored[image_id]
            targets, mask = expected_targets(row, 80)
            np.testing.assert_array_equal(batch["targets"][i], targets)
            np.testing.assert_array_equal(batch["ignore_mask"][i], mask)
            np.testing.assert_array_equal(batch["image"][i], transform_batch(as_batch(row), cfg)["image"][0])
            seen.add(image_id)
    assert seen == set(stored)


def test_training_epochs_differ_and_a_seed_repeats_them(dataset):
    def epoch(ds):
        return {
            image_id: image
            for batch in ds.iter_batches(batch_format="numpy")
            for image_id, image in zip(batch["image_id"], batch["image"], strict=True)
        }

    kwargs = dict(num_classes=80, image_size=SIZE, augment=AugmentConfig(), keep_ids=True)
    fresh = build_dataset(dataset, "train", IngestConfig(**kwargs), rows_per_task=16)
    first, second = epoch(fresh), epoch(fresh)
    assert first.keys() == second.keys()
    assert sum(not np.array_equal(first[k], second[k]) for k in first) > len(first) // 2
    seeded = build_dataset(dataset, "train", IngestConfig(**kwargs, seed=11), rows_per_task=16)
    first, second = epoch(seeded), epoch(seeded)
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_training_visits_units_in_a_new_order_every_epoch(dataset):
    def order(source):
        return [(t.metadata.input_files, t.metadata.num_rows) for t in source.get_read_tasks(1)]

    units = ShardUnits(dataset, "train", INPUT_COLUMNS, rows_per_task=2, shuffle=True)
    assert len(units.units) == 24 and sum(u.stop - u.start for u in units.units) == 48
    assert order(units) != order(units)  # 24! orders: equal by chance with probability 1/24!
    seeded = ShardUnits(dataset, "train", INPUT_COLUMNS, rows_per_task=2, shuffle=True, seed=5)
    assert order(seeded) == order(seeded)
    plain = ShardUnits(dataset, "train", INPUT_COLUMNS, rows_per_task=2)
    assert [t.metadata.input_files for t in plain.get_read_tasks(1)] == [(u.path,) for u in plain.units]


def test_a_stream_of_passes_through_decode_actors_holds_every_image_once_per_pass(dataset):
    stored = stored_rows(dataset, "train")
    cfg = IngestConfig(num_classes=80, image_size=SIZE, augment=AugmentConfig(), keep_ids=True)
    ds = build_dataset(dataset, "train", cfg, passes=3, decode_actors=2, rows_per_task=4)
    ids = [i for batch in ds.iter_batches(batch_format="numpy", batch_size=None) for i in batch["image_id"]]
    assert Counter(ids) == {image_id: 3 for image_id in stored}
    # Passes follow each other: units finish out of order only among the few in flight (2 actors
    # x 2 queued units of 4 rows), so the first and the last 30 rows hold no image twice.
    assert len(set(ids[:30])) == 30 and len(set(ids[-30:])) == 30
    # The read ran inside the actors, one call per unit.
    assert tasks_executed(ds.stats()) == {"ReadMltrShards->MapBatches(_Transform)": 36}


def test_a_seeded_stream_repeats_its_sequence_of_orders(dataset):
    seeded = ShardUnits(dataset, "train", INPUT_COLUMNS, rows_per_task=2, shuffle=True, seed=5, passes=2)
    tasks = [t.metadata.input_files for t in seeded.get_read_tasks(1)]
    assert tasks == [t.metadata.input_files for t in seeded.get_read_tasks(1)]
    assert tasks[:24] != tasks[24:] and sorted(tasks[:24]) == sorted(tasks[24:])
    with pytest.raises(ValueError, match="decode_actors must be at least 1"):
        build_dataset(dataset, "train", IngestConfig(num_classes=80), decode_actors=0)
    with pytest.raises(ValueError, match="passes must be at least 1"):
        build_dataset(dataset, "train", IngestConfig(num_classes=80), passes=0)


def test_unknown_split_and_missing_dataset_are_refused(dataset, tmp_path):
    with pytest.raises(KeyError, match="test"):
        build_dataset(dataset, "test", IngestConfig(num_classes=80))
    with pytest.raises(DatasetNotFound):
        load_manifest(str(tmp_path / "nothing"))


def test_the_calibration_rows_never_reach_the_training_stream(dataset):
    stored = stored_rows(dataset, "train")
    calib = plan_calibration(list(stored), fraction=0.25, max_rows=100)
    assert 0 < calib.calib_rows < len(stored)

    def ids(ds):
        return [
            i for batch in ds.iter_batches(batch_format="numpy", batch_size=None) for i in batch["image_id"]
        ]

    train_cfg = IngestConfig(num_classes=80, image_size=SIZE, augment=AugmentConfig(), keep_ids=True)
    stream = ids(
        build_dataset(dataset, "train", train_cfg, rows=calib.fit, passes=2, decode_actors=2, rows_per_task=4)
    )
    held_out = ids(build_dataset(dataset, "train", IngestConfig(80, SIZE, keep_ids=True), rows=calib.calib))
    assert len(held_out) == len(set(held_out)) == calib.calib_rows
    assert Counter(stream) == {i: 2 for i in stored if i not in set(held_out)}  # every other row, each pass
    assert len(stream) == 2 * calib.fit_rows
