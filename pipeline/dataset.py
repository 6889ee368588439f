"""The converted dataset on storage: Parquet schema, manifest, and the readers the next stages use.

    <out>/<dataset>/train/part-*.parquet
    <out>/<dataset>/val/part-*.parquet
    <out>/<dataset>/_rejects-<run>.jsonl  inputs that did not become rows, with their reasons
    <out>/<dataset>/_manifest.json        written last: the commit marker

The manifest lists every shard of the dataset; a reader reads exactly those files and refuses a
folder without a manifest, so an interrupted or concurrent conversion is never half-read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data import DataContext

from mltr.errors import ConfigError, MltrError
from pipeline.storage import Location, resolve

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
REJECTS = "_rejects.jsonl"  # the name manifests written before rejects files carried their run id use

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # JPEG bytes
        pa.field("width", pa.int32(), nullable=False),  # of the stored image
        pa.field("height", pa.int32(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),  # sorted positive class indices
        pa.field("ignore", pa.list_(pa.int32()), nullable=False),  # neither positive nor negative
        pa.field("source_path", pa.string(), nullable=False),
    ]
)


class DatasetNotFound(MltrError):
    """No committed dataset at a URI (no manifest: missing, or a conversion that did not finish)."""


class DatasetDamaged(MltrError):
    """A committed dataset whose shards no longer match its manifest (deleted, truncated, rewritten)."""


class SplitNotFound(DatasetNotFound, KeyError):
    """A split the dataset does not have (``val`` of a dataset converted with ``--splits train``)."""


# --- the manifest: one typed owner of _manifest.json ------------------------------------------------


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the dataset folder: "<split>/part-*.parquet"
    rows: int


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    files: tuple[ShardFile, ...]


@dataclass(frozen=True)
class RejectSummary:
    total: int
    by_reason: dict[str, int]
    by_split: dict[str, int]
    file: str = REJECTS  # every reject, one JSON object per line


@dataclass(frozen=True)
class ImageInfo:
    """How stored images were made (``pipeline.images.ImageSettings`` and the format)."""

    format: str
    max_side: int
    quality: int
    max_pixels: int


@dataclass(frozen=True)
class SourceInfo:
    root: str
    layout: str
    fingerprint: str  # sha256 over the annotation files the conversion read


@dataclass(frozen=True)
class ConversionInfo:
    rows_per_shard: int
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class Manifest:
    """A converted dataset's ``_manifest.json``: written last by the converter, read by every later stage.

    :meth:`to_json` / :meth:`from_json` own the file's layout; nothing else reads its keys.
    ``location`` is the dataset folder it was read from (not part of the file).
    """

    dataset: str
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    empty: dict[str, int]  # images with no label at all, per split: not rows
    rejects: RejectSummary
    image: ImageInfo
    source: SourceInfo
    conversion: ConversionInfo
    run_id: str  # the conversion that wrote the shards (their file names carry it)
    created_at: str
    columns: tuple[str, ...] = tuple(SCHEMA.names)
    schema_version: int = SCHEMA_VERSION
    location: Location | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.dataset

    def stored_images(self) -> dict[str, int]:
        """How the images were stored (longer side, JPEG quality): the input contract of a model
        trained on them makes a served image the same before it is resized."""
        return {"max_side": self.image.max_side, "quality": self.image.quality}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    @property
    def uri(self) -> str:
        return self._location().uri

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._location().fs

    def rows(self, split: str) -> int:
        return self.splits[self._check(split)].rows

    def shards(self, split: str) -> tuple[ShardFile, ...]:
        return self.splits[self._check(split)].files

    def files(self, split: str) -> list[str]:
        """Full paths (on ``location.fs``) of the shards of ``split``."""
        return [self._location().join(f.path).path for f in self.shards(split)]

    def verify(self, splits: Iterable[str]) -> None:
        """Check that every shard of ``splits`` exists, has a readable footer and the rows the manifest lists.

        A shard deleted or cut short after the commit would otherwise surface inside a training
        worker, after start-up, without its name. Reads only the footers.
        """
        for split in splits:
            for shard, path in zip(self.shards(split), self.files(split), strict=True):
                try:
                    rows = pq.ParquetFile(path, filesystem=self.filesystem).metadata.num_rows
                except FileNotFoundError:
                    raise DatasetDamaged(
                        f"{path}: a shard the manifest lists is missing; convert again"
                    ) from None
                except (OSError, pa.ArrowInvalid) as exc:
                    raise DatasetDamaged(
                        f"{path}: a shard the manifest lists is unreadable ({exc}); convert again"
                    ) from None
                if rows != shard.rows:
                    raise DatasetDamaged(
                        f"{path}: {rows} rows, the manifest lists {shard.rows}; convert again"
                    )

    def read_columns(self, split: str, columns: list[str]) -> pa.Table:
        """Some columns of every row of ``split``, read on this process (labels and ids: no images)."""
        tables = [
            pq.read_table(path, columns=columns, filesystem=self.filesystem) for path in self.files(split)
        ]
        schema = pa.schema([SCHEMA.field(c) for c in columns])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def iter_batches(self, split: str, columns: list[str], batch_size: int = 64) -> Iterator[pa.RecordBatch]:
        """Some columns of ``split`` in record batches, shard by shard, read on this process (images too)."""
        for path in self.files(split):
            with self.filesystem.open_input_file(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    def _location(self) -> Location:
        if self.location is None:
            raise ValueError(f"manifest of {self.dataset!r} has no location: it was not read from storage")
        return self.location

    def _check(self, split: str) -> str:
        if split not in self.splits:
            where = self.location.uri if self.location else self.dataset
            raise SplitNotFound(f"dataset {where} has no split {split!r}; it has {list(self.splits)}")
        return split

    def to_json(self) -> str:
        data = {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "created_at": self.created_at,
            "run_id": self.run_id,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "columns": list(self.columns),
            "splits": {
                name: {"rows": s.rows, "files": [asdict(f) for f in s.files]}
                for name, s in self.splits.items()
            },
            "empty": self.empty,
            "rejects": asdict(self.rejects),
            "image": asdict(self.image),
            "source": asdict(self.source),
            "conversion": asdict(self.conversion),
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, location: Location | None = None) -> Manifest:
        data = json.loads(text)
        return cls(
            schema_version=data["schema_version"],
            dataset=data["dataset"],
            created_at=data["created_at"],
            run_id=data["run_id"],
            classes=tuple(data["classes"]),
            columns=tuple(data["columns"]),
            splits={
                name: SplitInfo(s["rows"], tuple(ShardFile(f["path"], f["rows"]) for f in s["files"]))
                for name, s in data["splits"].items()
            },
            empty=dict(data["empty"]),
            rejects=RejectSummary(**data["rejects"]),
            image=ImageInfo(**data["image"]),
            source=SourceInfo(**data["source"]),
            conversion=ConversionInfo(**data["conversion"]),
            location=location,
        )

    def write(self, location: Location) -> Manifest:
        """Commit the dataset at ``location`` (its folder): the manifest is the last file written."""
        location.join(MANIFEST).write_text(self.to_json())
        return replace(self, location=location)


def load_manifest(uri: str) -> Manifest:
    """Load the manifest of the dataset at ``uri`` (``<out>/<dataset>``), refusing uncommitted datasets."""
    location = resolve(uri)
    path = location.join(MANIFEST)
    if not path.exists():
        raise DatasetNotFound(
            f"no {MANIFEST} in {location.uri}: the dataset is missing or its conversion did not finish "
            f"(run `mltr preprocess --out <out> ...` and pass <out>/<dataset>)"
        )
    try:
        text = path.read_text()
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetNotFound(f"{path.uri}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetNotFound(f"{path.uri}: malformed manifest (a JSON {type(data).__name__}, not an object)")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetNotFound(
            f"{path.uri}: schema version {version}, this code reads version {SCHEMA_VERSION}; convert again"
        )
    try:
        return Manifest.from_json(text, location)
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetNotFound(f"{path.uri}: malformed manifest ({type(exc).__name__}: {exc})") from None


# --- the calibration split: a deterministic slice of train, never trained on ----------------------------


def calib_score(image_id: str) -> float:
    """A uniform number in [0, 1) from the image id alone: the calibration split's draw for this image."""
    digest = hashlib.blake2b(b"mltr-calib:" + image_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


@dataclass(frozen=True)
class RowFilter:
    """Keeps the rows of a split whose :func:`calib_score` is below ``cutoff`` (``calib=True``) or the rest."""

    cutoff: float
    calib: bool

    def mask(self, image_ids: Iterable[str]) -> np.ndarray:
        below = np.fromiter((calib_score(i) < self.cutoff for i in image_ids), dtype=bool)
        return below if self.calib else ~below


@dataclass(frozen=True)
class CalibSplit:
    """``train`` cut in two by :func:`calib_score`: the calibration rows (below ``cutoff``) and the rest.

    The calibration rows choose the epoch, model vs EMA, and the per-class thresholds; they are
    never trained on. Membership depends on the image id and the cutoff alone, so it is the same
    on every run and every worker, and adding rows never moves a row that was trained on into it.
    """

    cutoff: float
    calib_rows: int
    fit_rows: int  # the train rows that are trained on

    @property
    def fit(self) -> RowFilter:
        return RowFilter(self.cutoff, calib=False)

    @property
    def calib(self) -> RowFilter:
        return RowFilter(self.cutoff, calib=True)


def plan_calibration(image_ids: Sequence[str], fraction: float, max_rows: int) -> CalibSplit:
    """The calibration split of ``image_ids``: ids scoring below ``fraction``, at most ``max_rows`` of them.

    Below ``max_rows`` the cutoff is ``fraction`` itself, so a row's membership never depends on
    the other rows. Above it, the ``max_rows`` lowest scores are kept (the cutoff falls): rows
    added later can push earlier calibration rows out, never pull a trained-on row in.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"the calibration fraction must be in (0, 1), got {fraction}")
    if max_rows < 1:
        raise ConfigError(f"the calibration split needs at least 1 row, got a maximum of {max_rows}")
    scores = np.sort(np.fromiter((calib_score(i) for i in image_ids), dtype=np.float64, count=len(image_ids)))
    cutoff = fraction
    if np.count_nonzero(scores < cutoff) > max_rows:
        cutoff = float(scores[max_rows])
    calib_rows = int(np.count_nonzero(scores < cutoff))
    if calib_rows == 0:
        raise ValueError(
            f"the calibration split of {len(scores)} train rows at fraction {fraction:g} is empty: "
            f"raise --calib-fraction or convert more images"
        )
    return CalibSplit(cutoff=cutoff, calib_rows=calib_rows, fit_rows=len(scores) - calib_rows)


def read_split(source: str | Manifest, split: str, **read_parquet_args: Any) -> ray.data.Dataset:
    """The rows of one split as a Ray Dataset, read from exactly the shards the manifest lists.

    One read task per shard by default, so decoding downstream is spread over the cluster
    instead of being packed into one block. Ray 2.60's default Parquet path (datasource V2)
    starts 32 footer-reader actors on every execution -- every epoch of a training run -- and
    bin-packs small files into one 128 MiB read unit, ignoring ``override_num_blocks``; the
    manifest already lists the files and their rows, so the V1 reader is used, which honours it.
    ``source`` is the dataset's URI or its manifest, already read.
    """
    manifest = source if isinstance(source, Manifest) else load_manifest(source)
    files = manifest.files(split)
    columns = read_parquet_args.get("columns")
    schema = pa.schema([SCHEMA.field(c) for c in columns]) if columns else SCHEMA
    if not files:
        return ray.data.from_arrow(schema.empty_table())
    read_parquet_args.setdefault("override_num_blocks", len(files))
    context = DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(
            files, filesystem=manifest.filesystem, schema=SCHEMA, **read_parquet_args
        )
    finally:
        context.use_datasource_v2 = previous
