"""Training-time ingest: Parquet shards -> decoded, augmented uint8 images + multi-hot targets.

    ShardUnits(manifest, split, passes) read tasks of ~128 rows (whole row groups), listed from the
                                        manifest; training: every pass over the split in a new
                                        random order, all passes in one stream; a RowFilter keeps
                                        the calibration rows or the others
      -> map_batches(transform_batch)   decode + augment, fused into the same task (or actor)
    -> {"image": uint8 (B, 3, S, S), "targets": float32 (B, C), "ignore_mask": bool (B, C)}
    on the Train worker: mltr.model.normalize(batch["image"].to(device), mean, std)

Training reads one stream of ``passes`` epochs through a fixed pool of decode actors
(``build_dataset(..., passes=E, decode_actors=N)``) and cuts it into epochs by batch count
(``mltr.train.epoch_batches``). Two Ray Data 2.60 costs are paid per execution, so per epoch when every
epoch is an execution: the executor starts knowing no cluster resources and runs one task for its
first second, and the first batch arrives ~0.5 s after the epoch is asked for. And a task pool
sized to the CPUs keeps fewer tasks running than CPUs: on 2 cores a task waited ~0.25 s between
submission and start (Ray Data's ``average_task_scheduling_time_s``), so one core idled ~40% of
the time. Actors with two units queued each go straight from one unit to the next. Validation
(short, every epoch, must see every image once) stays one task-based execution per epoch.

Why not ``read_split(uri).map_batches(...)``: a map task never splits its input block, and on
Ray 2.60 the default Parquet reader (datasource V2) bin-packs the shards into 128 MiB read
units whatever ``override_num_blocks`` says (one task decoded everything), and lists and sizes
them (a ListFiles step reading Parquet footers, 2-3 s) at the start of every execution, i.e.
every epoch: ~4 s before the first batch, 297 vs 450 img/s on 2 cores even with a repartition
added. The V1 reader makes at most one task per shard. Units planned from the manifest avoid all of it: the read and the decode
are one operator, one task per row-group range on every CPU, and only the uint8 output crosses
the object store (JPEG bytes stay inside the task; columns not needed are never read).

Images cross the object store as uint8 (a quarter of float32); the float conversion and the
normalisation (the model's mean and std, part of its input contract) happen on the training
worker (or its GPU).

Augmentation (an :class:`AugmentConfig`), per image, with ``torchvision.transforms.v2`` on uint8
tensors: RandomResizedCrop -> RandomHorizontalFlip -> RandAugment -> RandomErasing (cutout,
value 0). Without one (evaluation) every image is resized by the model's resize rule:
``squash`` to ``image_size x image_size`` without cropping, as the multi-label COCO papers
evaluate (ASL, Query2Label, ML-Decoder): a centre crop would cut off labelled objects near the
border.

Randomness: Ray re-executes the read and the map every epoch, in worker processes whose torch
generator starts from the same fixed default seed. With ``seed=None`` each batch draws a fresh
seed from ``os.urandom``, so epochs and workers differ; with a fixed ``seed`` each image's
augmentation depends only on ``(seed, image_id)``, whatever the batching, and is the same every
epoch (tests, debugging). The worker's global torch RNG is left as it was.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from pyarrow.fs import FileSystem
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from mltr.errors import ConfigError
from pipeline.convert import ROW_GROUP_SIZE
from pipeline.dataset import Manifest, RowFilter

# torch and torchvision are imported where images are decoded. torch costs ~1.5 s of CPU to
# import, torchvision another second (it brings torch._dynamo in, via torchvision.models). A
# Train run's DatasetManager and its split coordinators (one per dataset: train, calib, val)
# unpickle this module's functions without running them, as does a driver that only builds
# datasets: four processes per run that would otherwise each pay it.
if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2

# Columns the map needs; image_id only names a bad image in the error (and is kept if asked).
INPUT_COLUMNS = ["image_id", "image", "labels", "ignore"]
# Rows per read+decode task: whole row groups of the converter (128 rows), ~0.2-0.4 s of decoding
# on one core: long enough to hide a task's start-up, short enough to keep every CPU busy.
ROWS_PER_TASK = ROW_GROUP_SIZE
RESIZE_RULES = ("squash",)  # how evaluation resizes an image to the model's input (its input contract)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class ImageDecodeError(RuntimeError):
    """A stored image that cannot be decoded (conversion validated every image, so: a damaged shard)."""


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, per image in Ray Data; the field names are the command line's flags."""

    # Smallest fraction of the image area a random crop keeps. Not torchvision's 0.08: in multi-label
    # data a small crop drops labelled (often small) objects while their labels stay positive, and
    # enlarges what remains beyond the scale seen at evaluation. 1.0 disables cropping (ASL and
    # Query2Label train on plain resizes).
    crop_min_scale: float = _opt(0.5, "smallest image area a random crop keeps (1.0: no cropping)")
    crop_ratio: tuple[float, ...] = _opt((3 / 4, 4 / 3), "aspect-ratio range of the random crop")
    # No COCO/VOC/NUS-WIDE class is side-specific.
    flip_p: float = _opt(0.5, "probability of a horizontal flip")
    randaugment: bool = _opt(True, "RandAugment in the training transforms")
    randaugment_ops: int = _opt(2, "RandAugment operations per image")
    randaugment_magnitude: int = _opt(9, "RandAugment magnitude, 0..30")
    cutout_p: float = _opt(0.5, "probability of a cutout rectangle (random erasing, value 0) per image")
    # Up to a quarter of the image: the size of ASL's cutout square.
    cutout_scale: tuple[float, ...] = _opt((0.02, 0.25), "area range of the cutout, as image fractions")

    def __post_init__(self):
        object.__setattr__(self, "crop_ratio", tuple(float(r) for r in self.crop_ratio))
        object.__setattr__(self, "cutout_scale", tuple(float(r) for r in self.cutout_scale))
        if not 0 < self.crop_min_scale <= 1:
            raise ConfigError(f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ConfigError(f"--crop-ratio must be low,high with 0 < low <= high, got {self.crop_ratio}")
        for name in ("flip_p", "cutout_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a probability, got {getattr(self, name)}"
                )
        if len(self.cutout_scale) != 2 or not 0 < self.cutout_scale[0] <= self.cutout_scale[1] < 1:
            raise ConfigError(
                f"--cutout-scale must be low,high with 0 < low <= high < 1, got {self.cutout_scale}"
            )
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise ConfigError("--randaugment-ops must be >= 0 and --randaugment-magnitude in 0..30")


@dataclass(frozen=True)
class IngestConfig:
    """What the ingest produces: output size and resize rule (the model's), classes, augmentation."""

    num_classes: int  # length of the multi-hot target (the manifest's)
    image_size: int = 224  # side of the square output images (the model's input size)
    # None: the deterministic resize of evaluation. Augmentation must be asked for, so a forgotten
    # argument never augments an evaluation.
    augment: AugmentConfig | None = None
    resize: Literal["squash"] = "squash"  # the model's resize rule
    seed: int | None = None  # None: fresh randomness every epoch; an int: reproducible per image_id
    keep_ids: bool = False  # also output image_id (evaluation, tests); strings: use iter_batches

    def __post_init__(self):
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}")
        if self.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {self.image_size}")
        if self.resize not in RESIZE_RULES:
            raise ConfigError(
                f"unknown resize rule {self.resize!r}; this ingest knows {', '.join(RESIZE_RULES)}"
            )

    @property
    def train(self) -> bool:
        return self.augment is not None


@lru_cache(maxsize=8)
def make_transform(cfg: IngestConfig) -> v2.Transform:
    """The per-image transform of ``cfg``: uint8 (3, H, W) -> uint8 (3, S, S)."""
    from torchvision.transforms import v2

    size = (cfg.image_size, cfg.image_size)
    aug = cfg.augment
    if aug is None:
        return v2.Resize(size, antialias=True)  # "squash"
    # A full-area "crop" is no crop: RandomResizedCrop at scale 1 would still cut an image whose
    # aspect ratio lies outside crop_ratio down to that range; evaluation's resize keeps it whole.
    first = (
        v2.Resize(size, antialias=True)
        if aug.crop_min_scale >= 1.0
        else v2.RandomResizedCrop(size, scale=(aug.crop_min_scale, 1.0), ratio=aug.crop_ratio, antialias=True)
    )
    steps: list[v2.Transform] = [first, v2.RandomHorizontalFlip(aug.flip_p)]
    if aug.randaugment and aug.randaugment_ops:
        steps.append(v2.RandAugment(num_ops=aug.randaugment_ops, magnitude=aug.randaugment_magnitude))
    if aug.cutout_p:
        steps.append(v2.RandomErasing(p=aug.cutout_p, scale=aug.cutout_scale, value=0))
    return v2.Compose(steps)


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed for one image's augmentation, from the config seed and the image id."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def decode_images(data: list[bytes] | np.ndarray, image_ids: list[str] | np.ndarray) -> list[torch.Tensor]:
    """Decode JPEG bytes to RGB uint8 (3, H, W) tensors; a bad image raises with its id."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from mltr.serving import TORCHVISION_PREFIX

    # A copy per image (a few tens of kB): decode_jpeg wants a writable tensor, bytes are read-only.
    tensors = [torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()) for b in data]
    if not tensors:
        return []
    try:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    for image_id, tensor in zip(image_ids, tensors, strict=True):  # find which one failed
        try:
            decode_jpeg(tensor, mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            # torchvision prefixes "<function>, <source file>:<line>, " to libjpeg's message.
            reason = TORCHVISION_PREFIX.sub("", str(exc).strip())
            raise ImageDecodeError(
                f"image {image_id!r}: cannot decode its stored JPEG ({len(tensor)} bytes): {reason}"
            ) from None
    raise ImageDecodeError(f"a batch of {len(tensors)} images failed to decode, yet each decodes alone")


def multi_hot(
    labels: Any, ignore: Any, num_classes: int, image_ids: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot float32 targets and bool ignore masks (B, C); ignored classes are 0 in targets."""
    n = len(labels)
    targets = np.zeros((n, num_classes), dtype=np.float32)
    mask = np.zeros((n, num_classes), dtype=bool)
    for i in range(n):
        pos = np.asarray(labels[i], dtype=np.int64)
        ign = np.asarray(ignore[i], dtype=np.int64)
        for cls in (pos, ign):
            if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
                name = image_ids[i] if image_ids is not None else f"row {i}"
                raise ValueError(
                    f"image {name!r}: class index out of range 0..{num_classes - 1}: {cls.tolist()}"
                )
        targets[i, pos] = 1.0
        mask[i, ign] = True
        targets[i, ign] = 0.0
    return targets, mask


def transform_batch(batch: dict[str, np.ndarray], cfg: IngestConfig) -> dict[str, np.ndarray]:
    """Decode and transform one numpy batch (Ray Data's ``batch_format="numpy"``); pure.

    In: ``image`` (object array of JPEG bytes), ``labels`` and ``ignore`` (int lists per row),
    ``image_id`` (optional, for error messages and ``keep_ids``).
    Out: ``image`` uint8 (B, 3, S, S), ``targets`` float32 (B, C), ``ignore_mask`` bool (B, C),
    and ``image_id`` if ``cfg.keep_ids``.
    """
    import torch

    data = batch["image"]
    n = len(data)
    ids = batch["image_id"] if "image_id" in batch else np.array([f"row {i}" for i in range(n)], dtype=object)
    transform = make_transform(cfg)
    images = decode_images(data, ids)
    out_images = np.empty((n, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    if cfg.train:
        with torch.random.fork_rng(devices=[]):
            if cfg.seed is None:
                torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            for i, image in enumerate(images):
                if cfg.seed is not None:
                    torch.manual_seed(image_seed(cfg.seed, str(ids[i])))
                out_images[i] = transform(image).numpy()
    else:
        for i, image in enumerate(images):
            out_images[i] = transform(image).numpy()
    targets, mask = multi_hot(batch["labels"], batch["ignore"], cfg.num_classes, ids)
    out = {"image": out_images, "targets": targets, "ignore_mask": mask}
    if cfg.keep_ids:
        out["image_id"] = np.asarray(ids, dtype=object)
    return out


@dataclass(frozen=True)
class ReadUnit:
    """Rows ``[start, stop)`` of one shard: what one read+decode task reads."""

    path: str
    start: int
    stop: int


def plan_units(files: list[str], rows: list[int], rows_per_task: int) -> list[ReadUnit]:
    """Cut every shard into units of ``rows_per_task`` rows (the last one of a shard may be shorter)."""
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task must be positive, got {rows_per_task}")
    return [
        ReadUnit(path, start, min(start + rows_per_task, n))
        for path, n in zip(files, rows, strict=True)
        for start in range(0, n, rows_per_task)
    ]


def read_unit(fs: FileSystem, unit: ReadUnit, columns: list[str]) -> pa.Table:
    """Read only the row groups of ``unit`` (and only ``columns``) from its shard."""
    shard = pq.ParquetFile(unit.path, filesystem=fs)
    bounds = np.cumsum([0] + [shard.metadata.row_group(i).num_rows for i in range(shard.num_row_groups)])
    if unit.stop > bounds[-1]:
        raise ValueError(f"{unit.path}: has {bounds[-1]} rows, the manifest promised at least {unit.stop}")
    groups = [i for i in range(shard.num_row_groups) if bounds[i] < unit.stop and bounds[i + 1] > unit.start]
    table = shard.read_row_groups(groups, columns=columns)
    return table.slice(unit.start - int(bounds[groups[0]]), unit.stop - unit.start)


class ShardUnits(Datasource):
    """The shards of one split of a converted dataset as read tasks of ``rows_per_task`` rows.

    The manifest lists the shards and their rows, so units are planned without opening a file.
    Read tasks are made again for every execution: ``passes`` times over the split, each pass in a
    new random order when ``shuffle`` (a fixed sequence of orders per ``seed`` if one is given).
    ``rows`` keeps some rows of each unit (the calibration slice of ``train``, or the rest); it
    needs ``image_id`` among the columns.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        columns: list[str],
        rows_per_task: int = ROWS_PER_TASK,
        shuffle: bool = False,
        seed: int | None = None,
        passes: int = 1,
        rows: RowFilter | None = None,
    ):
        if passes < 1:
            raise ConfigError(f"passes must be at least 1, got {passes}")
        if rows is not None and "image_id" not in columns:
            raise ValueError("a row filter needs the image_id column")
        shards = manifest.shards(split)  # raises KeyError for a split the dataset does not have
        self.fs = manifest.filesystem
        self.units = plan_units(manifest.files(split), [f.rows for f in shards], rows_per_task)
        self.columns = list(columns)
        self.shuffle = shuffle
        self.seed = seed
        self.passes = passes
        self.rows = rows

    def get_name(self) -> str:
        return "MltrShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        rng = random.Random(self.seed if self.seed is not None else os.urandom(8))
        tasks = []
        for _ in range(self.passes):
            units = list(self.units)
            if self.shuffle:
                rng.shuffle(units)
            tasks += [
                ReadTask(
                    partial(_read_unit_blocks, self.fs, unit, self.columns, self.rows),
                    BlockMetadata(
                        num_rows=unit.stop - unit.start if self.rows is None else None,
                        size_bytes=None,
                        exec_stats=None,
                        input_files=[unit.path],
                    ),
                    per_task_row_limit=per_task_row_limit,
                )
                for unit in units
            ]
        return tasks


def _read_unit_blocks(
    fs: FileSystem, unit: ReadUnit, columns: list[str], rows: RowFilter | None
) -> list[pa.Table]:
    table = read_unit(fs, unit, columns)
    if rows is not None:
        table = table.filter(pa.array(rows.mask(table["image_id"].to_pylist())))
    return [table]


class _Transform:
    """:func:`transform_batch` as an actor class, for a pool of decode actors."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return transform_batch(batch, self.cfg)


def build_dataset(
    manifest: Manifest,
    split: str,
    cfg: IngestConfig,
    *,
    rows: RowFilter | None = None,
    passes: int = 1,
    decode_actors: int | None = None,
    rows_per_task: int = ROWS_PER_TASK,
    **map_kwargs: Any,
) -> ray.data.Dataset:
    """A split of the dataset ``manifest`` describes as decoded, transformed batches (a lazy ``ray.data.Dataset``).

    One read task per ``rows_per_task`` rows reads its row groups, and one :func:`transform_batch`
    call decodes them: the read and the map fuse into one operator (a ``batch_size`` in
    ``map_kwargs`` would split them again: Ray 2.60 does not fuse a read with a batched map).

    - ``rows``: keep only some rows of the split (``CalibSplit.fit`` or ``CalibSplit.calib``).
    - ``passes``: epochs in one execution, each a new order of the units when ``cfg.train``.
      Consume it with one iterator cut into epochs by ``mltr.train.epoch_batches``; rows of neighbouring
      epochs mix at the boundary (units finish out of order, and in the local shuffle buffer).
    - ``decode_actors``: run the map in a fixed pool of that many actors (one CPU each, two units
      queued per actor), started once per execution: for a long stream. ``None``: Ray tasks,
      nothing to start, for a short execution such as one validation pass.

    Mix rows across units with ``local_shuffle_buffer_size`` in ``iter_torch_batches``.
    ``map_kwargs`` go to ``map_batches`` (``num_cpus``, ``memory``, ...).
    """
    source = ShardUnits(
        manifest,
        split,
        INPUT_COLUMNS,
        rows_per_task,
        shuffle=cfg.train,
        seed=cfg.seed,
        passes=passes,
        rows=rows,
    )
    if not source.units:
        raise ConfigError(f"dataset {manifest.uri} has no rows in split {split!r}")
    map_kwargs.setdefault("batch_size", None)
    ds = ray.data.read_datasource(source, override_num_blocks=passes * len(source.units))
    if decode_actors is None:
        return ds.map_batches(transform_batch, fn_kwargs={"cfg": cfg}, batch_format="numpy", **map_kwargs)
    if decode_actors < 1:
        raise ConfigError(f"decode_actors must be at least 1, got {decode_actors}")
    return ds.map_batches(
        _Transform,
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=decode_actors, max_tasks_in_flight_per_actor=2),
        batch_format="numpy",
        **map_kwargs,
    )
