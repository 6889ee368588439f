"""NUS-WIDE, in the official layout or the common CSV layout (detected from the root).

Official layout:

    <root>/ImageList/{TrainImagelist,TestImagelist}.txt    lines like ``actor\\0001_2124494179.jpg``
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt   one 0/1 per image line
    <root>/ConceptsList/Concepts81.txt
    <root>/Flickr/<dir>/<name>.jpg

CSV layout: one ``*.csv`` in the root with columns ``filename,label,split``; ``filename`` is
relative to the root, ``label`` a list of concept names (``['sky', 'clouds']`` or
``sky|clouds``) and ``split`` is ``train``, ``val`` or ``test`` (``test`` becomes ``val``).

Classes follow Concepts81.txt. ``image_id`` is the file name without extension. Images with no
concept are not rows (counted as ``empty``); listed images that are absent are rejects
(``missing``), found when the conversion reads them.
"""

from __future__ import annotations

import ast
import csv
import io
from pathlib import Path, PureWindowsPath

import numpy as np

from pipeline.readers.base import (
    AnnotationError,
    DatasetIndex,
    Fingerprint,
    ImageEntry,
    LayoutError,
    Reject,
    confined,
    require_dir,
    require_file,
)

# ConceptsList/Concepts81.txt, in its order (alphabetical).
NUS_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars",
    "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake",
    "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost", "garden", "glacier",
    "grass", "harbor", "horses", "house", "lake", "leaf", "map", "military", "moon", "mountain",
    "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad", "rainbow", "reflection",
    "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer", "sports", "statue",
    "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town",
    "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window",
    "zebra",
)  # fmt: skip

OFFICIAL_SPLITS = {"train": "Train", "val": "Test"}
MAX_LABEL_CELL = 4096  # characters of one CSV label cell: 81 concept names fit many times over
CSV_SPLITS = {"train": "train", "val": "val", "test": "val"}
CSV_COLUMNS = ("filename", "label", "split")


def detect_layout(root: Path) -> str:
    if (root / "ImageList").is_dir():
        return "official"
    if any(root.glob("*.csv")):
        return "csv"
    raise LayoutError(
        f"expected NUS-WIDE under {root}: either the official layout (ImageList/, Groundtruth/TrainTestLabels/, "
        "ConceptsList/Concepts81.txt, Flickr/) or a CSV file with columns filename,label,split"
    )


def read_concepts(root: Path, fingerprint: Fingerprint, required: bool) -> list[str]:
    path = root / "ConceptsList" / "Concepts81.txt"
    if not path.is_file():
        if required:
            require_file(path, "the NUS-WIDE concept list")
        return list(NUS_CONCEPTS)
    concepts = [line.strip() for line in fingerprint.read_text(path).splitlines() if line.strip()]
    if len(set(concepts)) != len(concepts) or not concepts:
        raise AnnotationError(path, "the concept list is empty or repeats a concept")
    return concepts


def image_id_of(filename: str) -> str:
    return PureWindowsPath(filename).stem


def _read_official(root: Path, splits: tuple[str, ...], fingerprint: Fingerprint):
    concepts = read_concepts(root, fingerprint, required=True)
    labels_dir = require_dir(root / "Groundtruth" / "TrainTestLabels", "the NUS-WIDE label files")
    entries: list[ImageEntry] = []
    rejects: list[Reject] = []
    empty: dict[str, int] = {}
    for split in splits:
        tag = OFFICIAL_SPLITS[split]
        list_path = require_file(
            root / "ImageList" / f"{tag}Imagelist.txt", f"the NUS-WIDE {split} image list"
        )
        lines = [ln.strip() for ln in fingerprint.read_text(list_path).splitlines() if ln.strip()]
        matrix = np.zeros((len(lines), len(concepts)), dtype=bool)
        for c, concept in enumerate(concepts):
            path = require_file(labels_dir / f"Labels_{concept}_{tag}.txt", f"the labels of {concept!r}")
            values = fingerprint.read(path).split()
            if len(values) != len(lines):
                raise AnnotationError(path, f"{len(values)} labels for {len(lines)} images in {list_path}")
            column = np.array(values)  # bytes: NUS-WIDE's 81 files hold 13 million of them
            positive = column == b"1"
            valid = positive | (column == b"0")
            if not valid.all():
                bad = int(np.argmin(valid))
                value = values[bad].decode(errors="replace")
                raise AnnotationError(
                    path, f"label {bad + 1} is {value!r}: labels must be 0 or 1, one per line"
                )
            matrix[:, c] = positive
        empty[split] = 0
        for line, row in zip(lines, matrix, strict=True):
            parts = PureWindowsPath(line).parts[-2:]  # dir\name.jpg (older lists hold a full C:\...\ path)
            labels = tuple(int(i) for i in np.flatnonzero(row))
            if not labels:
                empty[split] += 1
                continue
            source = confined(root, "Flickr", *parts)
            if source is None:
                detail = f"{list_path}: {line!r} leaves {root / 'Flickr'}"
                rejects.append(Reject(image_id_of(line), split, line, "outside_root", detail))
                continue
            entries.append(ImageEntry(image_id_of(line), split, source, labels))
    return concepts, entries, empty, rejects


def parse_label_list(text: str) -> list[str]:
    text = text.strip()
    if not text:
        return []
    if len(text) > MAX_LABEL_CELL:  # literal_eval of a huge nested literal exhausts memory or the stack
        raise ValueError(f"a label cell of {len(text)} characters (at most {MAX_LABEL_CELL})")
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (MemoryError, RecursionError):
            raise ValueError("a label cell too deeply nested to parse") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of concept names, got {text!r}")
        return [v.strip() for v in value]
    return [v.strip() for v in text.replace(",", "|").split("|") if v.strip()]


def _read_csv(root: Path, splits: tuple[str, ...], fingerprint: Fingerprint):
    csv_files = sorted(root.glob("*.csv"))
    if len(csv_files) != 1:
        raise LayoutError(
            f"expected exactly one NUS-WIDE CSV file in {root}, found {[p.name for p in csv_files]}"
        )
    path = csv_files[0]
    concepts = read_concepts(root, fingerprint, required=False)
    index_of = {c: i for i, c in enumerate(concepts)}
    reader = csv.DictReader(io.StringIO(fingerprint.read_text(path)))
    missing_columns = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_columns:
        raise AnnotationError(path, f"missing columns {missing_columns}; found {reader.fieldnames}")
    entries: list[ImageEntry] = []
    rejects: list[Reject] = []
    empty = dict.fromkeys(splits, 0)
    for line_no, row in _rows(reader, path, rejects):
        split = CSV_SPLITS.get((row["split"] or "").strip().lower())
        filename = (row["filename"] or "").strip()
        if split is None:  # a typo or a cut-off line: that line's reject, the others are read
            detail = f"{path} line {line_no}: unknown split {row['split']!r} (expected train, val or test)"
            rejects.append(Reject(image_id_of(filename) if filename else f"line {line_no}", "unknown",
                                  filename or str(path), "bad_annotation", detail))  # fmt: skip
            continue
        if split not in splits:
            continue
        if not filename:
            detail = f"{path} line {line_no}: no filename"
            rejects.append(Reject(f"line {line_no}", split, str(path), "bad_annotation", detail))
            continue
        image_id, source = image_id_of(filename), confined(root, PureWindowsPath(filename).as_posix())
        if source is None:
            detail = f"{path} line {line_no}: {filename!r} leaves {root}"
            rejects.append(Reject(image_id, split, filename, "outside_root", detail))
            continue
        try:
            names = parse_label_list(row["label"] or "")
            unknown = [n for n in names if n not in index_of]
            if unknown:
                raise ValueError(f"unknown concepts {unknown}")
        except (ValueError, SyntaxError) as exc:
            rejects.append(Reject(image_id, split, source, "bad_annotation", f"{path} line {line_no}: {exc}"))
            continue
        labels = tuple(sorted({index_of[n] for n in names}))
        if not labels:
            empty[split] += 1
            continue
        entries.append(ImageEntry(image_id, split, source, labels))
    return concepts, entries, empty, rejects


def _rows(reader: csv.DictReader, path: Path, rejects: list[Reject]):
    """(line number, row) of a CSV; a line the csv module cannot read (a field over its limit) is rejected."""
    while True:
        start = reader.line_num + 1  # a record starts on the line after the last one read
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # line_num may not count the line that failed: name where it starts
            line_no = start
            detail = f"{path} line {line_no} (its split unread): {exc}"
            rejects.append(Reject(f"line {line_no}", "unknown", str(path), "bad_annotation", detail))
            continue
        yield reader.line_num, row


def read_nuswide(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"NUS-WIDE root {root} does not exist or is not a folder")
    layout = detect_layout(root)
    fingerprint = Fingerprint(root)
    read = _read_official if layout == "official" else _read_csv
    concepts, entries, empty, rejects = read(root, tuple(splits), fingerprint)
    return DatasetIndex(
        name="nuswide",
        root=str(root),
        layout=f"nuswide-{layout}",
        classes=concepts,
        entries=entries,
        splits=tuple(splits),
        empty=empty,
        rejects=rejects,
        fingerprint=fingerprint.hexdigest(),
    )
