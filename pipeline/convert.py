"""The Ray Data conversion graph: index -> decode/validate/resize -> Parquet shards + manifest.

    from_items(index entries)                        driver: only paths and labels
      .map_batches(process_batch)                    workers: read, decode, validate, resize, encode
      .write_datasink(ShardSink)                     workers: Parquet shards per split; rejects returned
    driver: _rejects-<run>.jsonl, then _manifest.json (the commit marker), then old files removed

The committed dataset stays readable until the new manifest lands (shard file names carry the
run id, so a re-run never touches the committed shards); a lease (``_lease.json``) keeps two
conversions out of one folder.

Image bytes never pass through the driver. Rejected images travel as rows with a reason and
empty image bytes, so one pass over the data yields both the shards and the reject report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data import Datasink
from ray.data.block import BlockAccessor

from mltr.errors import ConfigError
from mltr.paths import file_under_a_file, fsync
from pipeline.dataset import (
    MANIFEST,
    SCHEMA,
    ConversionInfo,
    DatasetNotFound,
    ImageInfo,
    Manifest,
    RejectSummary,
    ShardFile,
    SourceInfo,
    SplitInfo,
    load_manifest,
)
from pipeline.images import ImageRejected, ImageSettings, process_image, read_file
from pipeline.readers.base import SPLITS, DatasetIndex, Reject
from pipeline.storage import Lease, Location, resolve

log = logging.getLogger(__name__)

# What the processing step emits: the dataset schema plus the split and, for rejects, the reason.
PROCESSED_SCHEMA = (
    SCHEMA.append(pa.field("split", pa.string(), nullable=False))
    .append(pa.field("reject_reason", pa.string()))
    .append(pa.field("reject_detail", pa.string()))
)
ROW_GROUP_SIZE = 128  # rows per Parquet row group: lets readers split a shard
REJECT_EXAMPLES = 20
# A re-run that keeps under this share of the committed rows of the splits it rewrites is refused.
SHRINK_LIMIT = 0.5
LEASE_TTL = 600.0  # seconds a conversion's lease lives without being refreshed


def process_batch(batch: pa.Table, settings: ImageSettings) -> pa.Table:
    """Read and normalise every image of a batch of index entries (pure: no Ray, testable on a table).

    Good images come back with JPEG bytes and their size; a bad one comes back with empty bytes
    and ``reject_reason``/``reject_detail`` set, so nothing is dropped silently.
    """
    columns: dict[str, list] = {name: [] for name in PROCESSED_SCHEMA.names}
    for row in batch.to_pylist():
        try:
            image, width, height = process_image(read_file(row["source_path"]), settings)
            reason = detail = None
        except ImageRejected as exc:
            image, width, height, reason, detail = b"", 0, 0, exc.reason, exc.detail
        columns["image_id"].append(row["image_id"])
        columns["image"].append(image)
        columns["width"].append(width)
        columns["height"].append(height)
        columns["labels"].append(row["labels"])
        columns["ignore"].append(row["ignore"])
        columns["source_path"].append(row["source_path"])
        columns["split"].append(row["split"])
        columns["reject_reason"].append(reason)
        columns["reject_detail"].append(detail)
    return pa.Table.from_pydict(columns, schema=PROCESSED_SCHEMA)


def split_processed(table: pa.Table) -> tuple[dict[str, pa.Table], list[dict]]:
    """Separate processed rows into per-split tables in :data:`SCHEMA` and reject records."""
    rejected = pc.is_valid(table["reject_reason"])
    rejects = (
        table.filter(rejected)
        .select(["image_id", "split", "source_path", "reject_reason", "reject_detail"])
        .rename_columns(["image_id", "split", "source_path", "reason", "detail"])
        .to_pylist()
    )
    good = table.filter(pc.invert(rejected))
    parts = {}
    for split in pc.unique(good["split"]).to_pylist():
        parts[split] = good.filter(pc.equal(good["split"], split)).select(SCHEMA.names).cast(SCHEMA)
    return parts, rejects


class ShardSink(Datasink):
    """Writes Parquet shards of at most ``rows_per_shard`` rows per split; returns what it wrote.

    File names carry the run id and the write task's index, so a retried task overwrites its
    own shards and files of an earlier run are told apart (and removed once the manifest lands).
    """

    def __init__(self, location: Location, run_id: str, rows_per_shard: int):
        self.location = location
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.result: dict[str, list] | None = None

    def get_name(self) -> str:
        return "MltrShards"

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, list]:
        files: list[dict] = []
        rejects: list[dict] = []
        pending: dict[str, list[pa.Table]] = {}

        def flush(split: str, final: bool) -> None:
            table = pa.concat_tables(pending.pop(split, [])) if split in pending else SCHEMA.empty_table()
            while table.num_rows >= self.rows_per_shard or (final and table.num_rows):
                shard, table = table.slice(0, self.rows_per_shard), table.slice(self.rows_per_shard)
                rel = f"{split}/part-{self.run_id}-{ctx.task_idx:05d}-{len(files):03d}.parquet"
                target = self.location.join(rel)
                if self.location.scheme == "file":
                    self.location.join(split).makedirs()
                pq.write_table(shard, target.path, filesystem=self.location.fs, row_group_size=ROW_GROUP_SIZE)
                if self.location.scheme == "file":  # on disk before the manifest that lists it
                    fsync(target.path)
                    fsync(self.location.join(split).path)
                files.append({"path": rel, "split": split, "rows": shard.num_rows})
            if table.num_rows:
                pending[split] = [table]

        for block in blocks:
            parts, block_rejects = split_processed(BlockAccessor.for_block(block).to_arrow())
            rejects.extend(block_rejects)
            for split, table in parts.items():
                pending.setdefault(split, []).append(table)
                if sum(t.num_rows for t in pending[split]) >= self.rows_per_shard:
                    flush(split, final=False)
        for split in list(pending):
            flush(split, final=True)
        return {"files": files, "rejects": rejects}

    def on_write_complete(self, write_result: Any) -> None:
        files, rejects = [], []
        for ret in write_result.write_returns:
            files.extend(ret["files"])
            rejects.extend(ret["rejects"])
        self.result = {"files": files, "rejects": rejects}


@dataclass(frozen=True)
class ConvertSummary:
    dataset: str
    uri: str
    rows: dict[str, int]
    rejects: dict[str, int]
    empty: dict[str, int]
    seconds: float
    images_per_second: float
    reject_examples: list[dict]  # the first rejects, for the log; all of them are in rejects_file
    rejects_file: str  # the URI of _rejects-<run>.jsonl: every reject, one JSON object per line

    def as_dict(self) -> dict:
        return asdict(self)


def plan_blocks(num_entries: int, rows_per_shard: int, parallelism: int) -> int:
    """Input blocks (= processing tasks): none over a shard, in whole waves of ``parallelism`` tasks.

    Whole waves keep every CPU busy to the end instead of leaving one straggler task alone.
    """
    if num_entries == 0:
        return 1
    waves = math.ceil(math.ceil(num_entries / rows_per_shard) / parallelism)
    return max(1, min(num_entries, waves * parallelism))


def _cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def output_root(out: str) -> Location:
    """``--out``, checked: a folder (or s3:// prefix), and for object storage a store that answers.

    No Ray is needed: a job checks its output here before it starts or joins a cluster.
    """
    root = resolve(out)
    blocked = file_under_a_file(root.path) if root.scheme == "file" else None
    if blocked is not None:
        raise ConfigError(f"--out {root.uri}: {blocked} is a file, not a folder")
    if root.is_file():  # on s3://, the first request: an unreachable store is named here
        raise ConfigError(f"--out {root.uri} is a file: give the folder (or s3:// prefix) datasets go into")
    return root


def convert(
    index: DatasetIndex,
    out: str,
    settings: ImageSettings | None = None,
    rows_per_shard: int = 1000,
    num_blocks: int | None = None,
    allow_shrink: bool = False,
    lease_ttl: float = LEASE_TTL,
    lease_wait: float = 0.0,
) -> ConvertSummary:
    """Convert an indexed dataset to ``<out>/<index.name>/``; Ray must be initialised by the caller.

    A committed dataset already there stays readable until this conversion commits its own
    manifest; its splits that ``index`` does not hold are kept. A conversion that would lose most
    of the committed rows of the splits it rewrites (images not mounted, say) is refused, the
    committed dataset untouched, unless ``allow_shrink``. Two conversions into the same folder
    at once: the second is refused (:class:`~pipeline.storage.LeaseHeld`), naming the first,
    unless it may wait ``lease_wait`` seconds for the first to finish or its lease to go stale
    (a retry of a conversion whose node died: its lease lives ``lease_ttl`` seconds).
    """
    settings = settings or ImageSettings()
    if rows_per_shard < 1:
        raise ConfigError(f"rows_per_shard must be positive, got {rows_per_shard}")
    location = output_root(out).join(index.name)
    purpose = f"converting {index.name} from {index.root}"
    with Lease(location, purpose, ttl=lease_ttl, wait=lease_wait) as lease:
        return _convert(index, location, settings, rows_per_shard, num_blocks, allow_shrink, lease)


def _committed(location: Location, splits: tuple[str, ...]) -> Manifest | None:
    """The committed dataset's manifest; ``None`` when there is none, or one that cannot be read
    and this conversion rewrites every split (it replaces the dataset). Rewriting only some of
    them is refused: which shards the others hold is what the manifest would say, and they would
    be removed as stale."""
    if not location.join(MANIFEST).exists():
        return None
    try:
        return load_manifest(location.uri)
    except DatasetNotFound as exc:  # unreadable or another schema version: nothing to keep
        if set(splits) != set(SPLITS):
            raise ConfigError(
                f"the dataset at {location.uri} has a manifest that cannot be read ({exc}); converting "
                f"only {', '.join(splits)} would remove the shards of the other splits: convert every split "
                f"({', '.join(SPLITS)}) to replace it, or use another --out"
            ) from None
        log.warning("replacing the uncommitted or unreadable dataset at %s (%s)", location.uri, exc)
        return None


def _convert(
    index: DatasetIndex,
    location: Location,
    settings: ImageSettings,
    rows_per_shard: int,
    num_blocks: int | None,
    allow_shrink: bool,
    lease: Lease,
) -> ConvertSummary:
    start = time.perf_counter()
    committed = _committed(location, index.splits)
    kept = [s for s in (committed.splits if committed else {}) if s not in index.splits]
    if kept and tuple(committed.classes) != tuple(index.classes):
        raise ConfigError(
            f"the dataset at {location.uri} has other classes than {index.root}: convert all of its splits "
            f"({', '.join(list(committed.splits))}) to replace it, or use another --out"
        )
    if kept:  # the manifest records one image setting for every split
        stored = {"max_side": committed.image.max_side, "quality": committed.image.quality}
        asked = {"max_side": settings.max_side, "quality": settings.quality}
        if stored != asked:
            raise ConfigError(
                f"the dataset at {location.uri} stores {', '.join(kept)} with {_flags(stored)}; this "
                f"conversion asks {_flags(asked)}: pass the same, or convert all of its splits "
                f"({', '.join(list(committed.splits))}) to change them"
            )
    if kept:
        index = reject_kept_images(index, committed, kept)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    order = {s: i for i, s in enumerate(index.splits)}
    rows = [e.as_row() for e in sorted(index.entries, key=lambda e: order[e.split])]
    files: list[dict] = []
    rejects = [r.as_record() for r in index.rejects]
    if rows:
        blocks = num_blocks or plan_blocks(len(rows), rows_per_shard, _cluster_cpus())
        log.info(
            "converting %d images of %s in %d tasks into %s", len(rows), index.name, blocks, location.uri
        )
        sink = ShardSink(location, run_id, rows_per_shard)
        (
            ray.data.from_items(rows, override_num_blocks=blocks)
            .map_batches(
                process_batch, fn_kwargs={"settings": settings}, batch_format="pyarrow", batch_size=None
            )
            .write_datasink(sink)
        )
        assert sink.result is not None
        files, rejects = sink.result["files"], rejects + sink.result["rejects"]
    seconds = time.perf_counter() - start
    row_counts = {s: sum(f["rows"] for f in files if f["split"] == s) for s in index.splits}
    if committed is not None and not allow_shrink:
        before = {s: committed.rows(s) for s in committed.splits}
        _refuse_shrink(location, before, row_counts, rejects, {f["path"] for f in files})

    if kept:  # the splits this conversion does not rewrite keep their shards, counts and rejects
        previous = location.join(committed.rejects.file)
        old_rejects = (
            [json.loads(line) for line in previous.read_text().splitlines()] if previous.exists() else []
        )
        rejects += [r for r in old_rejects if r["split"] in kept]
    lease.check()  # taken over meanwhile (this run looked stale): the other run commits, not this one
    splits = tuple(index.splits) + tuple(kept)
    rejects.sort(key=lambda r: (splits.index(r["split"]) if r["split"] in splits else 0, r["image_id"]))
    rejects_file = f"_rejects-{run_id}.jsonl"
    location.join(rejects_file).write_text("".join(json.dumps(r) + "\n" for r in rejects))
    files.sort(key=lambda f: f["path"])
    # This conversion's rejects: its splits' and those of lines whose split could not be read.
    ours = [r for r in rejects if r["split"] not in kept]
    reject_counts = dict(sorted(Counter(r["reason"] for r in ours).items()))
    images_per_second = round(len(rows) / seconds, 2) if seconds > 0 else 0.0
    split_infos = {
        s: SplitInfo(
            rows=row_counts[s],
            files=tuple(ShardFile(f["path"], f["rows"]) for f in files if f["split"] == s),
        )
        for s in index.splits
    }
    split_infos.update({s: committed.splits[s] for s in kept})
    fingerprint = index.fingerprint
    if kept:  # a new identity: this conversion's annotations plus the kept splits' dataset
        kept_from = f"{committed.fingerprint}:{','.join(kept)}"
        fingerprint = "sha256:" + hashlib.sha256(f"{index.fingerprint}+{kept_from}".encode()).hexdigest()
    manifest = Manifest(
        dataset=index.name,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id,
        classes=tuple(index.classes),
        splits=split_infos,
        empty={**({s: committed.empty.get(s, 0) for s in kept} if kept else {}), **index.empty},
        rejects=RejectSummary(
            total=len(rejects),
            by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
            by_split={
                s: sum(1 for r in rejects if r["split"] == s)
                for s in (*splits, *sorted({r["split"] for r in rejects} - set(splits)))
            },
            file=rejects_file,
        ),
        image=ImageInfo(format="jpeg", **asdict(settings)),
        source=SourceInfo(root=index.root, layout=index.layout, fingerprint=fingerprint),
        conversion=ConversionInfo(
            rows_per_shard=rows_per_shard, seconds=round(seconds, 3), images_per_second=images_per_second
        ),
    ).write(location)  # the commit: readers switch to this dataset atomically
    keep = {f.path for s in manifest.splits.values() for f in s.files} | {rejects_file}
    _remove_stale_files(location, keep)
    return ConvertSummary(
        dataset=index.name,
        uri=location.uri,
        rows=row_counts,
        rejects=reject_counts,
        empty=index.empty,
        seconds=round(seconds, 3),
        images_per_second=images_per_second,
        reject_examples=ours[:REJECT_EXAMPLES],
        rejects_file=location.join(rejects_file).uri,
    )


def reject_kept_images(index: DatasetIndex, committed: Manifest, kept: list[str]) -> DatasetIndex:
    """An image a split this conversion keeps already holds is a ``duplicate`` reject of the splits it
    rewrites: the kept row stays, as a full conversion keeps an image's first listing, and no image
    is in two splits (an image of train listed in val would be scored on after being trained on)."""
    held: dict[str, str] = {}
    for split in kept:
        for image_id in committed.read_columns(split, ["image_id"])["image_id"].to_pylist():
            held.setdefault(image_id, split)
    entries, rejects = [], list(index.rejects)
    for entry in index.entries:
        split = held.get(entry.image_id)
        if split is None:
            entries.append(entry)
            continue
        detail = (
            f"image id {entry.image_id!r} ({entry.source_path}) is listed in {entry.split}, but the kept "
            f"{split} split holds it; convert every split to list it anew"
        )
        rejects.append(Reject(entry.image_id, entry.split, entry.source_path, "duplicate", detail))
    return replace(index, entries=entries, rejects=rejects)


def _flags(settings: dict) -> str:
    return " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())


def _refuse_shrink(
    location: Location, before: dict[str, int], rows: dict[str, int], rejects: list[dict], written: set[str]
) -> None:
    """Refuse (and remove this run's shards) when a rewritten split keeps under SHRINK_LIMIT of its
    committed rows: one split's images not mounted empties that split, whatever the others hold.
    ``before``: the committed rows of each split; a split it does not hold has nothing to lose."""
    shrunk = {s: n for s, n in rows.items() if before.get(s, 0) > 0 and n < SHRINK_LIMIT * before[s]}
    if not shrunk:
        return
    for rel in written:
        location.join(rel).delete()
    reasons = Counter(r["reason"] for r in rejects)
    counts = ", ".join(f"{n} {s} rows where the committed dataset has {before[s]}" for s, n in shrunk.items())
    raise ConfigError(
        f"refused to replace {location.uri}: this conversion has {counts} "
        f"({', '.join(f'{n} {reason}' for reason, n in reasons.most_common(3)) or 'no rejects'}); "
        f"are the images where the annotations say? The committed dataset is unchanged; pass --allow-shrink "
        f"to replace it anyway"
    )


def _remove_stale_files(location: Location, keep: set[str]) -> None:
    """Delete shards and reject lists the manifest does not list (earlier runs'), so one copy
    remains, and the temporary files of manifest writes a crash interrupted."""
    prefix = location.path.rstrip("/") + "/"
    for path in location.list_files():
        rel = path[len(prefix) :]
        folder, _, name = rel.rpartition("/")
        # Only this dataset's own files: <split>/part-*.parquet, not a folder of predictions or
        # another dataset written beneath it.
        shard = folder in SPLITS and name.startswith("part-") and name.endswith(".parquet")
        rejects = rel.startswith("_rejects") and rel.endswith(".jsonl")
        # Location.write_bytes's temporary files, never renamed (a crash while writing them)
        torn = "/" not in rel and rel.startswith((f"{MANIFEST}.tmp-", "_rejects-")) and ".tmp-" in rel
        if (shard or rejects or torn) and rel not in keep:
            location.fs.delete_file(path)
