"""Pascal VOC 2007 in its official layout.

    <root>/VOCdevkit/VOC2007/ImageSets/Main/{trainval,test}.txt
    <root>/VOCdevkit/VOC2007/Annotations/000005.xml
    <root>/VOCdevkit/VOC2007/JPEGImages/000005.jpg

``root`` may also be the ``VOCdevkit`` or the ``VOC2007`` folder itself. ``trainval`` becomes
split ``train`` and ``test`` becomes ``val``. Labels come from non-difficult objects; a class
present only as difficult objects goes to ``ignore``. The XML is untrusted input and is parsed
with defusedxml (no entity expansion, no external entities); an unreadable XML rejects its
image with reason ``bad_annotation`` and the run goes on.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from pipeline.readers.base import (
    DatasetIndex,
    Fingerprint,
    ImageEntry,
    LayoutError,
    Reject,
    confined,
    require_dir,
    require_file,
)

# The 20 standard classes, in alphabetical order (the class-index order of every VOC dataset here).
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

IMAGE_SETS = {"train": "trainval", "val": "test"}


def find_voc2007(root: Path) -> Path:
    for candidate in (root / "VOCdevkit" / "VOC2007", root / "VOC2007", root):
        if (candidate / "Annotations").is_dir() and (candidate / "ImageSets" / "Main").is_dir():
            return candidate
    raise LayoutError(
        f"expected the VOC 2007 layout under {root}: VOCdevkit/VOC2007/ with Annotations/, "
        "ImageSets/Main/ and JPEGImages/"
    )


def parse_objects(data: bytes, path: str) -> list[tuple[str, bool]]:
    """``(class name, difficult)`` for every object of one annotation XML; raises ValueError when unreadable."""
    try:
        root = SafeET.fromstring(data)
    except DefusedXmlException as exc:
        raise ValueError(f"refused unsafe XML ({type(exc).__name__}): {path}") from None
    except ParseError as exc:
        raise ValueError(f"invalid XML ({exc}): {path}") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, expected <annotation>: {path}")
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"unknown class {name!r}: {path}")
        if difficult not in ("0", "1"):
            raise ValueError(f"difficult must be 0 or 1, got {difficult!r}: {path}")
        objects.append((name, difficult == "1"))
    return objects


def labels_from_objects(objects: list[tuple[str, bool]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Positive classes (some non-difficult object) and ignored classes (only difficult objects)."""
    positive = {VOC_CLASSES.index(name) for name, difficult in objects if not difficult}
    difficult_only = {VOC_CLASSES.index(name) for name, difficult in objects if difficult} - positive
    return tuple(sorted(positive)), tuple(sorted(difficult_only))


def read_voc(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"VOC root {root} does not exist or is not a folder")
    voc = find_voc2007(root)
    require_dir(voc / "JPEGImages", "the VOC 2007 images folder")
    fingerprint = Fingerprint(voc)
    entries: list[ImageEntry] = []
    rejects: list[Reject] = []
    empty: dict[str, int] = {}
    for split in splits:
        list_path = require_file(
            voc / "ImageSets" / "Main" / f"{IMAGE_SETS[split]}.txt", f"the VOC {split} list"
        )
        ids = [line.strip() for line in fingerprint.read_text(list_path).splitlines() if line.strip()]
        empty[split] = 0
        for image_id in ids:
            image_path = confined(voc, "JPEGImages", f"{image_id}.jpg")
            xml_file = confined(voc, "Annotations", f"{image_id}.xml")
            if image_path is None or xml_file is None:
                detail = f"{list_path}: image id {image_id!r} leaves {voc}"
                rejects.append(Reject(image_id, split, image_id, "outside_root", detail))
                continue
            xml_path = Path(xml_file)
            try:
                objects = parse_objects(fingerprint.read(xml_path), str(xml_path))
            except FileNotFoundError:
                rejects.append(Reject(image_id, split, image_path, "bad_annotation", f"missing {xml_path}"))
                continue
            except OSError as exc:  # a folder, no permission: the image's annotation is unreadable
                detail = f"unreadable {xml_path}: {exc.strerror or exc}"
                rejects.append(Reject(image_id, split, image_path, "bad_annotation", detail))
                continue
            except ValueError as exc:
                rejects.append(Reject(image_id, split, image_path, "bad_annotation", str(exc)))
                continue
            labels, ignore = labels_from_objects(objects)
            if not labels and not ignore:
                empty[split] += 1
                continue
            entries.append(ImageEntry(image_id, split, image_path, labels, ignore))
    return DatasetIndex(
        name="voc",
        root=str(root),
        layout="voc2007",
        classes=list(VOC_CLASSES),
        entries=entries,
        splits=tuple(splits),
        empty=empty,
        rejects=rejects,
        fingerprint=fingerprint.hexdigest(),
    )
