"""Every built-in class list against its official source, pinned here as literals.

The lists are copied from the datasets' own files, not imported from the code: a test that
imports the code's list cannot catch a wrong name in it (NUS-WIDE's ``toy`` was ``toys`` here,
which rejected every image labelled with the official name).
"""

import pytest

from pipeline.readers import read_index
from pipeline.readers.nuswide import NUS_CONCEPTS
from pipeline.readers.voc import VOC_CLASSES
from pipeline.synthetic import COCO_CATEGORIES

pytestmark = pytest.mark.unit

# NUS-WIDE ConceptsList/Concepts81.txt, in its order.
CONCEPTS81 = [
    "airport",
    "animal",
    "beach",
    "bear",
    "birds",
    "boats",
    "book",
    "bridge",
    "buildings",
    "cars",
    "castle",
    "cat",
    "cityscape",
    "clouds",
    "computer",
    "coral",
    "cow",
    "dancing",
    "dog",
    "earthquake",
    "elk",
    "fire",
    "fish",
    "flags",
    "flowers",
    "food",
    "fox",
    "frost",
    "garden",
    "glacier",
    "grass",
    "harbor",
    "horses",
    "house",
    "lake",
    "leaf",
    "map",
    "military",
    "moon",
    "mountain",
    "nighttime",
    "ocean",
    "person",
    "plane",
    "plants",
    "police",
    "protest",
    "railroad",
    "rainbow",
    "reflection",
    "road",
    "rocks",
    "running",
    "sand",
    "sign",
    "sky",
    "snow",
    "soccer",
    "sports",
    "statue",
    "street",
    "sun",
    "sunset",
    "surf",
    "swimmers",
    "tattoo",
    "temple",
    "tiger",
    "tower",
    "town",
    "toy",
    "train",
    "tree",
    "valley",
    "vehicle",
    "water",
    "waterfall",
    "wedding",
    "whales",
    "window",
    "zebra",
]

# Pascal VOC 2007 (VOCdevkit's VOCcode/VOCinit.m classes), in that (alphabetical) order.
VOC2007 = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]

# MS-COCO 2014 instances_*.json "categories": (id, name), ids 1..90 with the official gaps.
COCO2014 = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
]  # fmt: skip


def test_the_built_in_lists_are_the_official_ones():
    assert len(CONCEPTS81) == 81 and len(VOC2007) == 20 and len(COCO2014) == 80
    assert list(NUS_CONCEPTS) == CONCEPTS81
    assert list(VOC_CLASSES) == VOC2007
    assert [(i, name) for i, name, _ in COCO_CATEGORIES] == COCO2014


def test_a_nuswide_csv_with_the_official_concept_names_keeps_every_image(tmp_path):
    """Every official name is a label: none of these images may be rejected as bad_annotation."""
    (tmp_path / "images").mkdir()
    lines = ["filename,label,split"]
    for i, concept in enumerate(CONCEPTS81):
        lines.append(f"images/{i:03d}.jpg,\"['{concept}']\",{'train' if i % 4 else 'val'}")
    (tmp_path / "nus.csv").write_text("\n".join(lines) + "\n")
    index = read_index("nuswide", str(tmp_path))
    assert index.rejects == []
    assert index.classes == CONCEPTS81
    assert sorted(e.labels[0] for e in index.entries) == list(range(81))
    assert next(e for e in index.entries if e.image_id == f"{CONCEPTS81.index('toy'):03d}").labels == (
        CONCEPTS81.index("toy"),
    )
