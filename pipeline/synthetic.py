"""Tiny datasets in the official layouts, for tests, the demo and benchmarks.

Each image is a drawn scene whose objects decide its labels: every class is a distinct
(shape, colour) pair, objects vary in size (some are small), class frequencies follow a long
tail and classes come in pairs that tend to co-occur. A small model can learn them. The files
are laid out exactly as the real datasets are (COCO 2014 JSON + JPEG folders, VOCdevkit,
NUS-WIDE lists or CSV), so the readers cannot tell them apart. ``faults=True`` adds what real
data holds: truncated, corrupt and non-image files, a missing file, grayscale, CMYK and PNG
images under ``.jpg``, images without annotations and, for VOC, unreadable XML.

:func:`generate` returns, and writes to ``<out>/_truth.json``, what it drew: per image the
split, labels, ignored classes and the outcome a correct converter must reach.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mltr.errors import ConfigError
from pipeline.readers.nuswide import NUS_CONCEPTS
from pipeline.readers.voc import VOC_CLASSES

FORMATS = ("coco", "voc", "nuswide")
TRUTH_FILE = "_truth.json"

# The 80 COCO categories with their real, non-contiguous ids: (id, name, supercategory).
COCO_CATEGORIES = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"),
    (36, "snowboard", "sports"), (37, "sports ball", "sports"), (38, "kite", "sports"),
    (39, "baseball bat", "sports"), (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"), (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"),
    (54, "sandwich", "food"), (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"),
    (62, "chair", "furniture"), (63, "couch", "furniture"), (64, "potted plant", "furniture"),
    (65, "bed", "furniture"), (67, "dining table", "furniture"), (70, "toilet", "furniture"),
    (72, "tv", "electronic"), (73, "laptop", "electronic"), (74, "mouse", "electronic"),
    (75, "remote", "electronic"), (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)  # fmt: skip

SHAPES = ("ellipse", "square", "triangle", "diamond", "cross", "ring", "bars", "star")

RGB = tuple[int, int, int]
Look = tuple[str, RGB]  # (shape, colour) of one class

# ``generate(classes=K)``: objects per image (equally likely) and their side as a fraction of the
# image's shorter side, and how much of an object's box a later object may cover.
LEARNABLE_COUNTS = (1, 2, 3)
LEARNABLE_SIZES = (0.25, 0.45)
LEARNABLE_MAX_OVERLAP = 0.3
# The demo's and the learning tests' class count: a 600-image COCO set has a label-frequency
# baseline of 0.16, and mltr_tiny reaches 0.95-0.97 val mAP in ~420 steps (docs/tiny-model.md).
DEMO_CLASSES = 12

# Faults and the outcome a correct converter reaches for each: a reject reason, or a row.
FAULT_OUTCOMES = {
    "truncated": "truncated",
    "corrupt": "corrupt",
    "not_an_image": "unreadable",
    "missing": "missing",
    "grayscale": "row",
    "cmyk": "row",
    "png_as_jpg": "row",
    "no_annotations": "empty",
    "bad_xml": "bad_annotation",  # VOC only
    "xml_bomb": "bad_annotation",  # VOC only: an entity-expansion attack
}
VOC_ONLY_FAULTS = ("bad_xml", "xml_bomb")


@dataclass
class TruthImage:
    image_id: str
    split: str
    file: str  # path of the image file relative to the dataset root
    labels: list[int]
    ignore: list[int] = field(default_factory=list)
    fault: str | None = None
    outcome: str = "row"  # "row", "empty" or a reject reason
    width: int = 0
    height: int = 0


@dataclass
class Truth:
    format: str
    layout: str
    classes: list[str]
    images: list[TruthImage]

    def by_id(self) -> dict[str, TruthImage]:
        return {im.image_id: im for im in self.images}

    def rows(self, split: str | None = None) -> list[TruthImage]:
        return [im for im in self.images if im.outcome == "row" and (split is None or im.split == split)]

    def rejects(self) -> dict[str, str]:
        return {im.image_id: im.outcome for im in self.images if im.outcome not in ("row", "empty")}

    def empty(self, split: str) -> int:
        return sum(1 for im in self.images if im.outcome == "empty" and im.split == split)

    @classmethod
    def load(cls, root: str | Path) -> Truth:
        data = json.loads((Path(root) / TRUTH_FILE).read_text())
        return cls(
            format=data["format"],
            layout=data["layout"],
            classes=data["classes"],
            images=[TruthImage(**im) for im in data["images"]],
        )

    def save(self, root: Path) -> None:
        (root / TRUTH_FILE).write_text(json.dumps(asdict(self)))


# --- drawing ---------------------------------------------------------------------------------------


def class_look(index: int, num_classes: int) -> tuple[str, tuple[int, int, int]]:
    """The (shape, RGB colour) that draws class ``index`` of ``num_classes``: distinct for every class.

    Hues are spread over the whole colour circle, as few as the classes need (3 for VOC's 20),
    so neighbouring classes differ as much as they can.
    """
    hues = -(-num_classes // len(SHAPES))
    shape = SHAPES[index % len(SHAPES)]
    hue = (index // len(SHAPES)) / hues
    return shape, _hsv_to_rgb(hue, 0.9, 0.95)


def spread_classes(count: int, num_classes: int) -> list[int]:
    """``count`` class indices spread evenly over ``0..num_classes-1`` (every k-th, starting at 0)."""
    if not 1 <= count <= num_classes:
        raise ConfigError(f"classes must be in 1..{num_classes}, got {count}")
    return [i * num_classes // count for i in range(count)]


def distinct_looks(drawn: Sequence[int]) -> dict[int, Look]:
    """One look per drawn class: the i-th of K gets hue i/K and shape ``SHAPES[i % 8]``.

    Every class has a hue of its own (1/K of the colour circle apart) and neighbouring hues have
    different shapes; for 12 <= K <= 24 classes of one shape are at least a third of the circle apart.
    """
    count = len(drawn)
    return {cls: (SHAPES[i % len(SHAPES)], _hsv_to_rgb(i / count, 0.9, 0.95)) for i, cls in enumerate(drawn)}


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, (x1 - x0) // 2
    w = max(2, r // 3)
    if shape == "ellipse":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=color)
    elif shape == "cross":
        draw.rectangle((cx - w, y0, cx + w, y1), fill=color)
        draw.rectangle((x0, cy - w, x1, cy + w), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=w)
    elif shape == "bars":
        for k in range(3):
            top = y0 + k * (y1 - y0) // 3
            draw.rectangle((x0, top, x1, top + max(1, (y1 - y0) // 6)), fill=color)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        draw.polygon(points, fill=color)
    else:
        raise ValueError(shape)


def draw_scene(
    rng: random.Random,
    width: int,
    height: int,
    objects: list[tuple[int, float]],
    num_classes: int,
    noise: float = 6.0,
    looks: Mapping[int, Look] | None = None,
    max_overlap: float = 1.0,
) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Draw ``objects`` ((class index, relative size) pairs) on a muted gradient; returns the image and boxes.

    ``looks`` maps class indices to their (shape, colour) (default: :func:`class_look`). With
    ``max_overlap < 1`` an object is placed (up to 20 tries) so that it covers at most that
    fraction of any earlier object's box, so every drawn object stays visible.
    """
    top = np.array([rng.randint(70, 190) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(70, 190) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp  # H, 1, 3
    pixels = np.broadcast_to(pixels, (height, width, 3)).copy()
    if noise:
        np_rng = np.random.default_rng(rng.getrandbits(32))
        pixels += np_rng.normal(0.0, noise, size=pixels.shape).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    boxes = []
    for cls, rel_size in objects:
        side = max(6, int(rel_size * min(width, height)))
        for _ in range(20 if max_overlap < 1.0 else 1):
            x0 = rng.randint(0, max(0, width - side))
            y0 = rng.randint(0, max(0, height - side))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_covered(box, earlier) <= max_overlap for earlier in boxes):
                break
        shape, color = looks[cls] if looks is not None else class_look(cls, num_classes)
        _draw_shape(draw, shape, box, color)
        boxes.append(box)
    return img, boxes


def _covered(box: tuple[int, int, int, int], earlier: tuple[int, int, int, int]) -> float:
    """Fraction of ``earlier``'s area that ``box`` covers."""
    w = min(box[2], earlier[2]) - max(box[0], earlier[0])
    h = min(box[3], earlier[3]) - max(box[1], earlier[1])
    area = (earlier[2] - earlier[0]) * (earlier[3] - earlier[1])
    return max(0, w) * max(0, h) / max(1, area)


def sample_learnable_objects(rng: random.Random, drawn: Sequence[int]) -> list[tuple[int, float]]:
    """1-3 objects of different classes, uniform over ``drawn``, each 25-45% of the shorter side."""
    classes = rng.sample(list(drawn), min(len(drawn), rng.choice(LEARNABLE_COUNTS)))
    return [(c, rng.uniform(*LEARNABLE_SIZES)) for c in classes]


def sample_objects(rng: random.Random, num_classes: int) -> list[tuple[int, float]]:
    """1-4 objects from a long-tailed class distribution; class 2j+1 often joins class 2j."""
    weights = [1.0 / (k + 1) ** 0.6 for k in range(num_classes)]
    count = rng.choice((1, 1, 2, 2, 2, 3, 4))
    classes: list[int] = []
    for cls in rng.choices(range(num_classes), weights=weights, k=count):
        classes.append(cls)
        partner = cls + 1 if cls % 2 == 0 else cls - 1
        if partner < num_classes and rng.random() < 0.5:
            classes.append(partner)
    # Some objects are small (about a tenth of the shorter side).
    return [(c, rng.uniform(0.1, 0.16) if rng.random() < 0.25 else rng.uniform(0.22, 0.4)) for c in classes]


def encode(img: Image.Image, fault: str | None, quality: int = 90) -> bytes:
    """Encode a drawn scene as the file a fault calls for (a well-formed RGB JPEG without one)."""
    buf = io.BytesIO()
    if fault == "grayscale":
        img.convert("L").save(buf, "JPEG", quality=quality)
    elif fault == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif fault == "png_as_jpg":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    if fault == "truncated":
        return data[: len(data) * 3 // 5]
    if fault == "corrupt":
        # Overwrite a Huffman table: the header parses, the scan cannot be decoded.
        corrupted = bytearray(data)
        dht = data.find(b"\xff\xc4")
        corrupted[dht + 4 : dht + 30] = b"\xff" * 26
        return bytes(corrupted)
    if fault == "not_an_image":
        return b"<html><body>404 Not Found</body></html>\n"
    return data


# --- layouts -----------------------------------------------------------------------------------------


@dataclass
class _Drawn:
    truth: TruthImage
    objects: list[tuple[int, float]]
    difficult: list[bool]
    boxes: list[tuple[int, int, int, int]]


def _assign_faults(n: int, fmt: str, rng: random.Random) -> dict[int, str]:
    kinds = [k for k in FAULT_OUTCOMES if fmt == "voc" or k not in VOC_ONLY_FAULTS]
    if n < 2 * len(kinds):
        raise ConfigError(f"--faults needs at least {2 * len(kinds)} images for {fmt}, got {n}")
    positions = rng.sample(range(n), len(kinds))
    return dict(zip(positions, kinds, strict=True))


def _draw_all(
    fmt: str,
    out: Path,
    n: int,
    seed: int,
    faults: bool,
    num_classes: int,
    size: tuple[int, int] | None,
    noise: float,
    file_for,
    classes: int | None = None,
) -> list[_Drawn]:
    rng = random.Random(seed)
    drawn_classes = spread_classes(classes, num_classes) if classes is not None else None
    looks = distinct_looks(drawn_classes) if drawn_classes is not None else None
    fault_at = _assign_faults(n, fmt, rng) if faults else {}
    n_train = max(1, min(n - 1, round(n * 0.75)))
    drawn = []
    for i in range(n):
        split = "train" if i < n_train else "val"
        fault = fault_at.get(i)
        width, height = size or (rng.randint(160, 320), rng.randint(120, 240))
        if fault == "no_annotations":
            objects = []
        elif drawn_classes is not None:
            objects = sample_learnable_objects(rng, drawn_classes)
        else:
            objects = sample_objects(rng, num_classes)
        # VOC: some objects are 'difficult'; never all of an image's first object, so most images keep a label.
        difficult = [fmt == "voc" and k > 0 and rng.random() < 0.2 for k in range(len(objects))]
        image_id, rel_file = file_for(i, split, rng)
        img, boxes = draw_scene(
            rng,
            width,
            height,
            objects,
            num_classes,
            noise=noise,
            looks=looks,
            max_overlap=LEARNABLE_MAX_OVERLAP if looks is not None else 1.0,
        )
        if fault != "missing":
            path = out / rel_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(img, fault))
        positive = sorted({c for (c, _), d in zip(objects, difficult, strict=True) if not d})
        ignore = sorted({c for (c, _), d in zip(objects, difficult, strict=True) if d} - set(positive))
        outcome = FAULT_OUTCOMES[fault] if fault else "row"
        if outcome == "row" and not positive and not ignore:
            outcome = "empty"
        truth = TruthImage(image_id, split, rel_file, positive, ignore, fault, outcome, width, height)
        drawn.append(_Drawn(truth, objects, difficult, boxes))
    return drawn


def _write_coco(out: Path, n: int, seed: int, faults: bool, size, noise, classes: int | None = None) -> Truth:
    ids = random.Random(seed + 1).sample(range(1, 581930), n)

    def file_for(i, split, rng):
        return str(ids[i]), f"{split}2014/COCO_{split}2014_{ids[i]:012d}.jpg"

    drawn = _draw_all("coco", out, n, seed, faults, len(COCO_CATEGORIES), size, noise, file_for, classes)
    categories = [{"supercategory": s, "id": i, "name": name} for i, name, s in COCO_CATEGORIES]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split in ("train", "val"):
        images, annotations = [], []
        for d in drawn:
            t = d.truth
            if t.split != split:
                continue
            images.append(
                {
                    "license": 1,
                    "file_name": Path(t.file).name,
                    "coco_url": f"http://images.cocodataset.org/{split}2014/{Path(t.file).name}",
                    "height": t.height,
                    "width": t.width,
                    "date_captured": "2013-11-14 11:18:45",
                    "id": int(t.image_id),
                }
            )
            for (cls, _), (x0, y0, x1, y1) in zip(d.objects, d.boxes, strict=True):
                w, h = x1 - x0, y1 - y0
                annotations.append(
                    {
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                        "area": float(w * h),
                        "iscrowd": 0,
                        "image_id": int(t.image_id),
                        "bbox": [float(x0), float(y0), float(w), float(h)],
                        "category_id": COCO_CATEGORIES[cls][0],
                        "id": ann_id,
                    }
                )
                ann_id += 1
        doc = {
            "info": {"description": "mltr synthetic COCO 2014", "version": "1.0", "year": 2014},
            "images": images,
            "licenses": [
                {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution"}
            ],
            "annotations": annotations,
            "categories": categories,
        }
        (out / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(doc))
    return Truth("coco", "coco2014", [c[1] for c in COCO_CATEGORIES], [d.truth for d in drawn])


_XML_BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<annotation><folder>&lol3;</folder></annotation>
"""


def _voc_xml(d: _Drawn) -> str:
    t = d.truth
    objs = []
    for (cls, _), difficult, (x0, y0, x1, y1) in zip(d.objects, d.difficult, d.boxes, strict=True):
        objs.append(
            f"\t<object>\n\t\t<name>{VOC_CLASSES[cls]}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(difficult)}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n"
            f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    return (
        f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{t.image_id}.jpg</filename>\n"
        "\t<source>\n\t\t<database>The VOC2007 Database</database>\n\t\t<annotation>PASCAL VOC2007</annotation>\n"
        "\t\t<image>flickr</image>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{t.width}</width>\n\t\t<height>{t.height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
        f"\t<segmented>0</segmented>\n{''.join(objs)}</annotation>\n"
    )


def _write_voc(out: Path, n: int, seed: int, faults: bool, size, noise, classes: int | None = None) -> Truth:
    voc = out / "VOCdevkit" / "VOC2007"
    numbers = sorted(random.Random(seed + 1).sample(range(1, 10000), n))

    def file_for(i, split, rng):
        image_id = f"{numbers[i]:06d}"
        return image_id, f"VOCdevkit/VOC2007/JPEGImages/{image_id}.jpg"

    drawn = _draw_all("voc", out, n, seed, faults, len(VOC_CLASSES), size, noise, file_for, classes)
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for d in drawn:
        t = d.truth
        xml = _voc_xml(d)
        if t.fault == "bad_xml":
            xml = xml[: len(xml) // 2]  # cut mid-element
        elif t.fault == "xml_bomb":
            xml = _XML_BOMB
        (voc / "Annotations" / f"{t.image_id}.xml").write_text(xml)
    for split, image_set in (("train", "trainval"), ("val", "test")):
        members = [d for d in drawn if d.truth.split == split]
        (voc / "ImageSets" / "Main" / f"{image_set}.txt").write_text(
            "".join(f"{d.truth.image_id}\n" for d in members)
        )
        for c, name in enumerate(VOC_CLASSES):
            lines = []
            for d in members:
                flags = [
                    difficult for (cls, _), difficult in zip(d.objects, d.difficult, strict=True) if cls == c
                ]
                flag = " 1" if flags and not all(flags) else (" 0" if flags else "-1")
                lines.append(f"{d.truth.image_id} {flag}\n")
            (voc / "ImageSets" / "Main" / f"{name}_{image_set}.txt").write_text("".join(lines))
    return Truth("voc", "voc2007", list(VOC_CLASSES), [d.truth for d in drawn])


NUS_DIRS = ("actor", "airport", "animal", "beach", "bird", "cityscape", "flowers", "sunset")


def _write_nuswide(
    out: Path, n: int, seed: int, faults: bool, size, noise, layout: str, classes: int | None = None
) -> Truth:
    def file_for(i, split, rng):
        name = f"{i + 1:04d}_{rng.randint(10**9, 10**10 - 1)}"
        if layout == "csv":
            return name, f"images/{name}.jpg"
        return name, f"Flickr/{NUS_DIRS[i % len(NUS_DIRS)]}/{name}.jpg"

    drawn = _draw_all("nuswide", out, n, seed, faults, len(NUS_CONCEPTS), size, noise, file_for, classes)
    truths = [d.truth for d in drawn]
    if layout == "csv":
        lines = ["filename,label,split"]
        for t in truths:
            names = [NUS_CONCEPTS[c] for c in t.labels]
            lines.append(f'{t.file},"{names!r}",{t.split}')
        (out / "nus_wide.csv").write_text("\n".join(lines) + "\n")
        return Truth("nuswide", "nuswide-csv", list(NUS_CONCEPTS), truths)

    for sub in ("ImageList", "ConceptsList", "Groundtruth/TrainTestLabels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "ConceptsList" / "Concepts81.txt").write_text("".join(f"{c}\r\n" for c in NUS_CONCEPTS))
    for split, tag in (("train", "Train"), ("val", "Test")):
        members = [t for t in truths if t.split == split]
        windows_paths = [t.file.split("/", 1)[1].replace("/", "\\") for t in members]
        (out / "ImageList" / f"{tag}Imagelist.txt").write_text("".join(f"{p}\r\n" for p in windows_paths))
        for c, concept in enumerate(NUS_CONCEPTS):
            values = "".join(f"{int(c in t.labels)}\r\n" for t in members)
            (out / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{tag}.txt").write_text(values)
    return Truth("nuswide", "nuswide-official", list(NUS_CONCEPTS), truths)


def generate(
    fmt: str,
    out: str | Path,
    images: int,
    seed: int = 0,
    faults: bool = False,
    layout: str = "official",
    size: tuple[int, int] | None = None,
    noise: float = 6.0,
    classes: int | None = None,
) -> Truth:
    """Write a tiny dataset in ``fmt``'s official layout under ``out`` and return what was drawn.

    ``size`` fixes every image's (width, height) (random 160-320 x 120-240 otherwise);
    ``layout="csv"`` writes NUS-WIDE's CSV layout instead of the official one.

    ``classes=K`` draws an easier set a tiny model learns in minutes (the demo's): only K of the
    format's classes, spread over its class list (which stays the official one, so the other
    classes have no positives), each with a hue of its own and a shape (:func:`distinct_looks`),
    1-3 objects of different classes per image, uniformly, at 25-45% of the shorter side and
    overlapping little. None (the default) draws every class as described in the module docstring.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if layout not in ("official", "csv") or (layout == "csv" and fmt != "nuswide"):
        raise ConfigError(f"layout {layout!r} is not available for {fmt} (only nuswide has 'csv')")
    if classes is not None and classes < 1:
        raise ConfigError(f"classes must be at least 1, got {classes}")
    if images < 2:
        raise ConfigError(f"need at least 2 images (one per split), got {images}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "coco":
        truth = _write_coco(out, images, seed, faults, size, noise, classes)
    elif fmt == "voc":
        truth = _write_voc(out, images, seed, faults, size, noise, classes)
    else:
        truth = _write_nuswide(out, images, seed, faults, size, noise, layout, classes)
    truth.save(out)
    return truth
