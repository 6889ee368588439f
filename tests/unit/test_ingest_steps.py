"""The training-time ingest as pure functions: numpy batches of real JPEG bytes in, uint8 images out."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pyarrow.fs import LocalFileSystem

from pipeline.ingest import (
    AugmentConfig,
    ImageDecodeError,
    IngestConfig,
    ReadUnit,
    multi_hot,
    plan_units,
    read_unit,
    transform_batch,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

C = 12
SIZES = [(96, 72), (61, 117), (160, 120), (80, 80)]  # (width, height): landscape, portrait, square


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: gradients plus noise, values spread over the whole uint8 range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 255 // width, yy * 255 // height, (xx * 7 + yy * 3) % 256], axis=-1)
    arr = np.clip(arr + rng.integers(-25, 26, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_batch(labels, ignore, sizes=SIZES, ids=None) -> dict[str, np.ndarray]:
    """A batch as Ray Data's numpy format gives it: object arrays of bytes and of int32 arrays."""
    n = len(labels)
    sizes = [sizes[i % len(sizes)] for i in range(n)]
    ids = ids or [f"img-{i}" for i in range(n)]

    def ragged(rows):
        out = np.empty(n, dtype=object)
        out[:] = [np.asarray(r, dtype=np.int32) for r in rows]
        return out

    return {
        "image_id": np.array(ids, dtype=object),
        "image": np.array([jpeg(w, h, seed=i) for i, (w, h) in enumerate(sizes)], dtype=object),
        "labels": ragged(labels),
        "ignore": ragged(ignore),
    }


def subset(batch: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


LABELS = [[0, 3], [], [11], [2, 5, 7]]
IGNORE = [[], [4], [3, 5], []]


@pytest.fixture(scope="module")
def batch():
    return make_batch(LABELS, IGNORE)


def train_cfg(seed: int | None = None, **augment) -> IngestConfig:
    return IngestConfig(num_classes=C, image_size=48, augment=AugmentConfig(**augment), seed=seed)


@pytest.mark.parametrize("augment", [None, AugmentConfig()])
def test_output_shapes_and_dtypes(batch, augment):
    out = transform_batch(batch, IngestConfig(num_classes=C, image_size=40, augment=augment, seed=0))
    assert set(out) == {"image", "targets", "ignore_mask"}
    assert out["image"].dtype == np.uint8 and out["image"].shape == (4, 3, 40, 40)
    assert out["targets"].dtype == np.float32 and out["targets"].shape == (4, C)
    assert out["ignore_mask"].dtype == np.bool_ and out["ignore_mask"].shape == (4, C)


def test_multi_hot_and_ignore_mask(batch):
    out = transform_batch(batch, IngestConfig(num_classes=C, image_size=32))
    expected_targets = np.zeros((4, C), dtype=np.float32)
    expected_mask = np.zeros((4, C), dtype=bool)
    for row, (pos, ign) in enumerate([([0, 3], []), ([], [4]), ([11], [3, 5]), ([2, 5, 7], [])]):
        expected_targets[row, pos] = 1
        expected_mask[row, ign] = True
    np.testing.assert_array_equal(out["targets"], expected_targets)
    np.testing.assert_array_equal(out["ignore_mask"], expected_mask)


def test_an_ignored_class_is_never_a_positive_target():
    targets, mask = multi_hot([[1, 2]], [[2]], num_classes=4)
    np.testing.assert_array_equal(targets, [[0, 1, 0, 0]])
    np.testing.assert_array_equal(mask, [[False, False, True, False]])


def test_plain_lists_and_empty_batches_are_accepted():
    targets, mask = multi_hot([[0], [1, 2]], [[], []], num_classes=3)
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 1]])
    assert not mask.any()
    out = transform_batch(make_batch([], []), IngestConfig(num_classes=C, image_size=32))
    assert out["image"].shape == (0, 3, 32, 32) and out["targets"].shape == (0, C)


def test_a_class_index_out_of_range_names_the_image():
    with pytest.raises(ValueError, match=r"img-1.*0\.\.11"):
        transform_batch(make_batch([[0], [12]], [[], []]), IngestConfig(num_classes=C, image_size=32))


def test_validation_is_a_squash_resize_equal_to_pil(batch):
    cfg = IngestConfig(num_classes=C, image_size=56)
    out = transform_batch(batch, cfg)
    np.testing.assert_array_equal(out["image"], transform_batch(batch, cfg)["image"])
    for row, data in enumerate(batch["image"]):
        # The whole image, squashed to a square (no crop), as PIL's antialiased bilinear resize does it.
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((56, 56), Image.BILINEAR))
        got = out["image"][row].transpose(1, 2, 0)
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # uint8 values keep their 0..255 scale (no premature /255).
    assert out["image"].max() > 200 and out["image"].min() < 50


def test_validation_ignores_the_seed(batch):
    a = transform_batch(batch, IngestConfig(num_classes=C, image_size=40, seed=1))["image"]
    b = transform_batch(batch, IngestConfig(num_classes=C, image_size=40))["image"]
    np.testing.assert_array_equal(a, b)


def test_train_with_a_seed_is_reproducible_per_image_whatever_the_batching(batch):
    cfg = train_cfg(seed=123)
    whole = transform_batch(batch, cfg)["image"]
    np.testing.assert_array_equal(whole, transform_batch(batch, cfg)["image"])
    # The same image in another batch, at another position, gets the same augmentation.
    np.testing.assert_array_equal(transform_batch(subset(batch, [2, 0]), cfg)["image"], whole[[2, 0]])
    other = transform_batch(batch, train_cfg(seed=124))["image"]
    assert not np.array_equal(whole, other)


def test_train_without_a_seed_differs_between_calls(batch):
    cfg = train_cfg()
    first, second = (transform_batch(batch, cfg)["image"] for _ in range(2))
    assert first.shape == second.shape == (4, 3, 48, 48)
    assert not np.array_equal(first, second)


def test_train_without_a_seed_does_not_follow_the_global_torch_seed(batch):
    # Ray workers all start from torch's fixed default seed: the ingest must not inherit it.
    cfg = train_cfg()
    torch.manual_seed(0)
    first = transform_batch(batch, cfg)["image"]
    torch.manual_seed(0)
    assert not np.array_equal(first, transform_batch(batch, cfg)["image"])


@pytest.mark.parametrize("seed", [None, 5])
def test_the_global_torch_rng_is_left_alone(batch, seed):
    state = torch.get_rng_state()
    transform_batch(batch, train_cfg(seed=seed))
    assert torch.equal(state, torch.get_rng_state())


def test_train_is_random_but_labels_are_not(batch):
    out = transform_batch(batch, train_cfg(seed=3))
    ref = transform_batch(batch, IngestConfig(num_classes=C, image_size=48))
    assert not np.array_equal(out["image"], ref["image"])
    np.testing.assert_array_equal(out["targets"], ref["targets"])
    np.testing.assert_array_equal(out["ignore_mask"], ref["ignore_mask"])


def test_train_without_augmentation_and_a_full_crop_is_the_validation_resize():
    # The whole image, whatever its aspect ratio: 2:1 and 1:3 lie outside the crop's ratio range.
    batch = make_batch(
        [[0], [1], [2], [3]], [[], [], [], []], sizes=[(96, 72), (80, 80), (160, 80), (40, 120)]
    )
    cfg = train_cfg(crop_min_scale=1.0, flip_p=0.0, randaugment=False, cutout_p=0.0, seed=0)
    ref = transform_batch(batch, IngestConfig(num_classes=C, image_size=48))
    np.testing.assert_array_equal(transform_batch(batch, cfg)["image"], ref["image"])


def test_flip_alone_mirrors_the_image():
    batch = make_batch([[0]], [[]], sizes=[(96, 72)])
    cfg = train_cfg(crop_min_scale=1.0, flip_p=1.0, randaugment=False, cutout_p=0.0, seed=0)
    ref = transform_batch(batch, IngestConfig(num_classes=C, image_size=48))["image"]
    np.testing.assert_array_equal(transform_batch(batch, cfg)["image"], ref[..., ::-1])


def test_cutout_blacks_out_one_rectangle_on_uint8():
    batch = make_batch([[0]] * 4, [[]] * 4)
    base = dict(crop_min_scale=1.0, flip_p=0.0, randaugment=False, seed=9)
    ref = transform_batch(batch, train_cfg(cutout_p=0.0, **base))["image"]
    out = transform_batch(batch, train_cfg(cutout_p=1.0, cutout_scale=(0.1, 0.2), **base))["image"]
    assert out.dtype == np.uint8
    for img, orig in zip(out, ref, strict=True):
        rows, cols = np.nonzero((img != orig).any(axis=0))
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        # What changed is one rectangle, zero in every channel, of about 10-20% of the image.
        assert (img[:, top:bottom, left:right] == 0).all()
        assert 0.05 * 48 * 48 <= (bottom - top) * (right - left) <= 0.25 * 48 * 48


def test_keep_ids_passes_image_ids_through(batch):
    out = transform_batch(batch, IngestConfig(num_classes=C, image_size=32, keep_ids=True))
    assert list(out["image_id"]) == ["img-0", "img-1", "img-2", "img-3"]


@pytest.mark.parametrize(
    "bad",
    [b"definitely not a jpeg", jpeg(64, 48, seed=1)[:300], b""],
    ids=["garbage", "truncated", "empty"],
)
def test_an_undecodable_image_raises_with_its_id(batch, bad):
    broken = {k: v.copy() for k, v in batch.items()}
    broken["image"][2] = bad
    broken["image_id"][2] = "COCO_train2014_000000000042"
    with pytest.raises(ImageDecodeError, match="COCO_train2014_000000000042"):
        transform_batch(broken, train_cfg(seed=0))


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"image_size": 4}, {"resize": "center_crop"}], ids=str
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        IngestConfig(**{"num_classes": C, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"crop_min_scale": 0.0}, "--crop-min-scale"),
        ({"crop_min_scale": 1.5}, "--crop-min-scale"),
        ({"crop_ratio": (1.5, 0.5)}, "--crop-ratio"),
        ({"flip_p": 1.5}, "--flip-p"),
        ({"cutout_p": -0.1}, "--cutout-p"),
        ({"cutout_scale": (0.3, 0.2)}, "--cutout-scale"),
        ({"randaugment_magnitude": 31}, "--randaugment-magnitude"),
    ],
    ids=str,
)
def test_augmentation_rejects_bad_values_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        AugmentConfig(**kwargs)


def test_units_cut_every_shard_into_tasks_of_at_most_rows_per_task():
    units = plan_units(["a", "b", "c"], [300, 0, 5], rows_per_task=128)
    assert units == [
        ReadUnit("a", 0, 128),
        ReadUnit("a", 128, 256),
        ReadUnit("a", 256, 300),
        ReadUnit("c", 0, 5),
    ]
    with pytest.raises(ValueError, match="rows_per_task"):
        plan_units(["a"], [1], rows_per_task=0)


def test_read_unit_reads_exactly_its_rows_across_row_groups(tmp_path):
    table = pa.table({"image_id": [f"id-{i}" for i in range(23)], "x": list(range(23)), "y": [0.5] * 23})
    path = str(tmp_path / "shard.parquet")
    pq.write_table(table, path, row_group_size=5)
    fs = LocalFileSystem()
    parts = [read_unit(fs, unit, ["image_id", "x"]) for unit in plan_units([path], [23], rows_per_task=7)]
    assert [p.num_rows for p in parts] == [7, 7, 7, 2]
    assert pa.concat_tables(parts).equals(table.select(["image_id", "x"]))
    with pytest.raises(ValueError, match="promised"):
        read_unit(fs, ReadUnit(path, 20, 30), ["x"])


def test_the_data_pipeline_imports_without_torch():
    # A Train run's DatasetManager and its three split coordinators unpickle pipeline.ingest's
    # functions without running them: with torch imported there, each held ~570 MB more (810 MB
    # against 240 MB).
    code = (
        "import sys, mltr, mltr.errors, pipeline.storage, pipeline.dataset, pipeline.convert, pipeline.ingest\n"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
        "assert all(getattr(mltr, name) is not None for name in mltr.__all__)  # each resolves on first use\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "True"]
