"""MS-COCO 2014 in its official layout, read through pycocotools.

    <root>/annotations/instances_train2014.json
    <root>/annotations/instances_val2014.json
    <root>/train2014/COCO_train2014_000000000009.jpg
    <root>/val2014/COCO_val2014_000000000042.jpg

Classes are the categories in ascending id order (ids 1..90 with gaps, 80 classes). Every
annotation of an image, crowd or not, makes its category a positive label; an image without
annotations is not a row (counted as ``empty``). ``image_id`` is COCO's image id.

The JSON is untrusted: a ``file_name`` that leaves the root (``../``, an absolute path) rejects its
image (``outside_root``), and annotations of an image id the file does not list are rejected
(``bad_annotation``) instead of losing their labels silently.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

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

SPLIT_DIRS = {"train": "train2014", "val": "val2014"}


def annotation_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{SPLIT_DIRS[split]}.json"


def load_coco(path: Path, data: bytes) -> tuple[COCO, list[tuple[int, Any]]]:
    """Parse an instances JSON into a pycocotools index; a malformed file names itself and the problem.

    Also returns the entries of 'images' left out of the index, with their positions (1-based): one
    whose id is not an integer rejects that image, not the file.
    """
    try:
        dataset = json.loads(data)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(path, f"not UTF-8 text: {exc}") from None
    except RecursionError:
        raise AnnotationError(path, "JSON nested too deeply") from None
    if not isinstance(dataset, dict):
        raise AnnotationError(path, "expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise AnnotationError(path, f"missing or non-list {key!r}")
    check_categories(path, dataset)
    left_out = [(n + 1, image) for n, image in enumerate(dataset["images"]) if image_id_problem(image)]
    if left_out:
        dataset = {**dataset, "images": [image for image in dataset["images"] if not image_id_problem(image)]}
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise AnnotationError(path, f"malformed entry: missing or wrong-typed field {exc}") from None
    return coco, left_out


def check_categories(path: Path, dataset: dict) -> None:
    """Categories with unique integer ids and unique names, as COCO's are: they are the classes.

    pycocotools indexes categories by id: a repeated id would keep its last entry and silently move
    the labels of the first to it.
    """
    names: dict[int, str] = {}
    ids: dict[str, int] = {}
    for n, category in enumerate(dataset["categories"]):
        where = f"category {n + 1} of 'categories'"
        if not isinstance(category, dict):
            raise AnnotationError(path, f"{where} is not an object")
        cat_id, name = category.get("id"), category.get("name")
        if not isinstance(cat_id, int) or isinstance(cat_id, bool):
            raise AnnotationError(path, f"{where} has id {cat_id!r}: category ids are integers")
        if not isinstance(name, str) or not name:
            raise AnnotationError(
                path, f"{where} (id {cat_id}) has name {name!r}: names are non-empty strings"
            )
        if cat_id in names:
            raise AnnotationError(
                path, f"category id {cat_id} is listed twice ({names[cat_id]!r} and {name!r})"
            )
        if name in ids:
            raise AnnotationError(
                path, f"category name {name!r} is listed twice (ids {ids[name]} and {cat_id})"
            )
        names[cat_id], ids[name] = name, cat_id


def image_id_problem(image) -> str | None:
    """Why an entry of 'images' cannot be indexed (its id is not an integer, as COCO's are), or None."""
    image_id = image.get("id") if isinstance(image, dict) else None
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        return None
    return f"has id {image_id!r}: image ids are integers" if isinstance(image, dict) else "is not an object"


def read_coco(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"COCO root {root} does not exist or is not a folder")
    for split in splits:
        require_file(annotation_path(root, split), f"the COCO 2014 {split} annotations")
        require_dir(root / SPLIT_DIRS[split], f"the COCO 2014 {split} images folder")

    fingerprint = Fingerprint(root)
    classes: list[str] | None = None
    entries: list[ImageEntry] = []
    rejects: list[Reject] = []
    empty: dict[str, int] = {}
    for split in splits:
        path = annotation_path(root, split)
        coco, left_out = load_coco(path, fingerprint.read(path))
        for n, image in left_out:
            image_id = image.get("id") if isinstance(image, dict) else None
            file_name = str(image.get("file_name") or "") if isinstance(image, dict) else ""
            detail = f"{path}: image {n} of 'images' {image_id_problem(image)}"
            rejects.append(Reject(str(image_id), split, file_name, "bad_annotation", detail))
        cat_ids = sorted(coco.getCatIds())
        names = [coco.cats[c]["name"] for c in cat_ids]
        if classes is None:
            classes = names
        elif names != classes:
            raise AnnotationError(path, f"categories differ from those of {annotation_path(root, splits[0])}")
        index_of = {cat_id: i for i, cat_id in enumerate(cat_ids)}
        empty[split] = 0
        # An annotation of an image the file does not list would silently lose its label.
        for image_id in sorted(set(coco.imgToAnns) - set(coco.imgs), key=str):
            ann_ids = [a.get("id") for a in coco.imgToAnns[image_id]]
            detail = f"{path}: annotations {ann_ids} refer to image id {image_id!r}, which its 'images' do not list"
            rejects.append(Reject(str(image_id), split, str(path), "bad_annotation", detail))
        # pycocotools keeps the last of entries that repeat an image id: keep the first, reject the others.
        listed: dict = {}
        for info in coco.dataset["images"]:
            kept = listed.setdefault(info["id"], info)
            if kept is not info:
                detail = (
                    f"{path}: image id {info['id']!r} is listed again (file_name {info.get('file_name')!r}); "
                    f"its first entry ({kept.get('file_name')!r}) is kept"
                )
                rejects.append(
                    Reject(str(info["id"]), split, str(info.get("file_name") or ""), "duplicate", detail)
                )
        for image_id in sorted(coco.getImgIds()):
            info = listed[image_id]
            anns = coco.imgToAnns.get(image_id, [])
            try:
                labels = tuple(sorted({index_of[a["category_id"]] for a in anns}))
            except KeyError as exc:
                raise AnnotationError(
                    path, f"an annotation of image {image_id} names unknown category {exc}"
                ) from None
            if not labels:
                empty[split] += 1
                continue
            file_name = str(info.get("file_name") or "")
            if not file_name:
                detail = f"{path}: image {image_id} has no file_name"
                rejects.append(Reject(str(image_id), split, "", "bad_annotation", detail))
                continue
            source = confined(root, SPLIT_DIRS[split], file_name)
            if source is None:
                detail = f"{path}: image {image_id} has file_name {file_name!r}, outside {root}"
                rejects.append(Reject(str(image_id), split, file_name, "outside_root", detail))
                continue
            entries.append(ImageEntry(image_id=str(image_id), split=split, source_path=source, labels=labels))
    return DatasetIndex(
        name="coco",
        root=str(root),
        layout="coco2014",
        classes=classes or [],
        entries=entries,
        splits=tuple(splits),
        empty=empty,
        rejects=rejects,
        fingerprint=fingerprint.hexdigest(),
    )
