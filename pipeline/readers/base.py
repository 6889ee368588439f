"""What every dataset reader returns: an index of images with their labels, built on the driver.

Readers parse annotations only (small files); decoding the images is Ray Data's work.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mltr.errors import MltrError

SPLITS = ("train", "val")


class LayoutError(MltrError):
    """The root is missing or does not hold the dataset's official layout (exit status 2)."""


class AnnotationError(MltrError):
    """An annotation file that the whole dataset depends on cannot be parsed (exit status 2)."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class ImageEntry:
    """One image to convert: where it is and its labels (sorted class indices)."""

    image_id: str
    split: str
    source_path: str
    labels: tuple[int, ...]
    ignore: tuple[int, ...] = ()

    def as_row(self) -> dict:
        return {
            "image_id": self.image_id,
            "split": self.split,
            "source_path": self.source_path,
            "labels": list(self.labels),
            "ignore": list(self.ignore),
        }


@dataclass(frozen=True)
class Reject:
    """An input that did not become a row, with a reason code from ``pipeline.images.REJECT_REASONS``."""

    image_id: str
    split: str
    source_path: str
    reason: str
    detail: str = ""

    def as_record(self) -> dict:
        return {
            "image_id": self.image_id,
            "split": self.split,
            "source_path": self.source_path,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class DatasetIndex:
    """A dataset's classes and the images to convert, per split, as read from its annotations."""

    name: str
    root: str
    layout: str
    classes: list[str]
    entries: list[ImageEntry]
    splits: tuple[str, ...]
    empty: dict[str, int] = field(default_factory=dict)  # images with no label at all: not rows
    rejects: list[Reject] = field(default_factory=list)  # annotation-level rejects
    fingerprint: str = ""  # sha256 over the annotation files that produced this index

    def count(self) -> dict[str, int]:
        counts = Counter(e.split for e in self.entries)
        return {s: counts.get(s, 0) for s in self.splits}


class Fingerprint:
    """sha256 over (relative path, content) of annotation files, in the order they are added."""

    def __init__(self, root: str | Path):
        self._root = Path(root)
        self._hash = hashlib.sha256()

    def add(self, path: str | Path, data: bytes) -> bytes:
        # Relative to the root however the root was written (``data/voc``, ``./data/voc``, absolute):
        # the same files are the same dataset.
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self._root))
        self._hash.update(Path(rel).as_posix().encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        return data

    def read(self, path: str | Path) -> bytes:
        return self.add(path, Path(path).read_bytes())

    def read_text(self, path: str | Path) -> str:
        """A text annotation file, decoded from UTF-8 without the byte-order mark an editor on Windows
        may put first (it would become part of the first image id); one that is not UTF-8 names itself."""
        data = self.read(path)
        try:
            return data.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            raise AnnotationError(path, f"not UTF-8 text: {exc}") from None

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def reject_duplicates(index: DatasetIndex) -> DatasetIndex:
    """Keep the first listing of each image id; every later one (the same split or another, where it
    would leak an image between train and val) becomes a ``duplicate`` reject naming the first."""
    first: dict[str, ImageEntry] = {}
    entries = []
    for entry in index.entries:
        kept = first.setdefault(entry.image_id, entry)
        if kept is entry:
            entries.append(entry)
            continue
        detail = (
            f"image id {entry.image_id!r} ({entry.source_path}) is listed again in {entry.split}; "
            f"its first listing, in {kept.split} ({kept.source_path}), is kept"
        )
        index.rejects.append(Reject(entry.image_id, entry.split, entry.source_path, "duplicate", detail))
    index.entries = entries
    return index


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise LayoutError(
            f"expected {what} at {path}, but it is {'not a folder' if path.exists() else 'missing'}"
        )
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise LayoutError(
            f"expected {what} at {path}, but it is {'not a file' if path.exists() else 'missing'}"
        )
    return path


def confined(root: Path, *parts: str) -> str | None:
    """``root`` joined with ``parts`` as a normalised path, or None if it leaves ``root``.

    Annotations are untrusted: ``../../etc/x.jpg`` or an absolute path must not turn any file the
    job can read into a row. Lexical, not ``realpath``: a dataset's folders may be symlinks.
    """
    base = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.join(base, *parts))
    return path if os.path.commonpath([base, path]) == base and path != base else None
