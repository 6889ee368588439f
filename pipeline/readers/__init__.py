"""Dataset readers, one module per dataset: each turns an official layout into a :class:`DatasetIndex`."""

from __future__ import annotations

from collections.abc import Callable

from mltr.errors import ConfigError
from pipeline.readers.base import (
    SPLITS,
    AnnotationError,
    DatasetIndex,
    ImageEntry,
    LayoutError,
    Reject,
    reject_duplicates,
)
from pipeline.readers.coco import read_coco
from pipeline.readers.nuswide import read_nuswide
from pipeline.readers.voc import read_voc

READERS: dict[str, Callable[..., DatasetIndex]] = {
    "coco": read_coco,
    "voc": read_voc,
    "nuswide": read_nuswide,
}


def read_index(dataset: str, root: str, splits: tuple[str, ...] = SPLITS) -> DatasetIndex:
    """Read a dataset's annotations into an index of images to convert."""
    if dataset not in READERS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(READERS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits or len(set(splits)) != len(splits):
        raise ConfigError(f"splits must be a non-empty subset of {SPLITS}, each once, got {splits}")
    return reject_duplicates(READERS[dataset](root, tuple(splits)))


__all__ = [
    "READERS",
    "SPLITS",
    "AnnotationError",
    "DatasetIndex",
    "ImageEntry",
    "LayoutError",
    "Reject",
    "read_index",
]
