"""The converted dataset on storage: Parquet schema, manifest, and the readers the next stages use.

    <out>/<dataset>/train/part-*.parquet
    <out>/<dataset>/val/part-*.parquet
    <out>/<dataset>/_rejects.jsonl      inputs that did not become rows, with their reasons
    <out>/<dataset>/_manifest.json      written last: the commit marker

The manifest lists every shard of the dataset; a reader reads exactly those files and refuses a
folder without a manifest, so an interrupted or concurrent conversion is never half-read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data
from ray.data import DataContext

from pipeline.storage import Location, resolve

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
REJECTS = "_rejects.jsonl"

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


class DatasetNotFound(Exception):
    """No committed dataset at a URI (no manifest: missing, or a conversion that did not finish)."""


@dataclass(frozen=True)
class Manifest:
    """A parsed ``_manifest.json``; ``location`` is the dataset folder it came from."""

    data: dict[str, Any]
    location: Location

    @property
    def name(self) -> str:
        return self.data["dataset"]

    @property
    def classes(self) -> list[str]:
        return self.data["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.data["classes"])

    @property
    def splits(self) -> list[str]:
        return list(self.data["splits"])

    @property
    def fingerprint(self) -> str:
        return self.data["source"]["fingerprint"]

    def rows(self, split: str) -> int:
        return self.data["splits"][self._check(split)]["rows"]

    def files(self, split: str) -> list[str]:
        """Full paths (on ``location.fs``) of the shards of ``split``."""
        return [self.location.join(f["path"]).path for f in self.data["splits"][self._check(split)]["files"]]

    def _check(self, split: str) -> str:
        if split not in self.data["splits"]:
            raise KeyError(f"dataset {self.location.uri} has no split {split!r}; it has {self.splits}")
        return split


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
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetNotFound(f"{path.uri}: unreadable manifest ({exc})") from None
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetNotFound(
            f"{path.uri}: schema version {version}, this code reads version {SCHEMA_VERSION}; convert again"
        )
    return Manifest(data, location)


def read_split(uri: str, split: str, **read_parquet_args: Any) -> ray.data.Dataset:
    """The rows of one split as a Ray Dataset, read from exactly the shards the manifest lists.

    One read task per shard by default, so decoding downstream is spread over the cluster
    instead of being packed into one block. Ray 2.60's default Parquet path (datasource V2)
    starts 32 footer-reader actors on every execution -- every epoch of a training run -- and
    bin-packs small files into one 128 MiB read unit, ignoring ``override_num_blocks``; the
    manifest already lists the files and their rows, so the V1 reader is used, which honours it.
    """
    manifest = load_manifest(uri)
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
            files, filesystem=manifest.location.fs, schema=SCHEMA, **read_parquet_args
        )
    finally:
        context.use_datasource_v2 = previous
