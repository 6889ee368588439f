"""How fast mltr_tiny learns from scratch: the conv stem against Swin's patch stem, same recipe, same run.

    python -m jobs.bench tiny-recipe                               # the tiny preset's recipe, 420 steps
    python -m jobs.bench tiny-recipe --lr 1e-3 --augment default --steps 210 --seeds 0,1

A plain PyTorch loop on one thread (no Ray: this measures the model and the recipe, not the
pipeline). It generates the demo's kind of COCO-layout set (``--classes`` learnable classes, with
faulty files), decodes its usable images once into memory (train images to a shorter side of
80 px, val images by the evaluation resize to 64 px), and trains each stem with the project's
own pieces: ``make_transform`` augmentation, the model's ``normalize``, the ASL loss, AdamW with
``param_groups``, the OneCycle ``make_scheduler``, clipping. Val mAP is measured every
``--eval-every`` steps; the figure reported is the **last** step's (nothing is selected on val),
with the best point of the curve beside it for the shape of the curve only. Ends with one JSON
line holding every figure and ``ratio`` (conv stem over patch stem, final val mAP, mean over seeds).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from jobs._config import opt, parse_config, to_dict
from mltr.losses import build_loss
from mltr.metrics import mean_average_precision
from mltr.model import create_model, normalize
from mltr.train import label_frequency_baseline, make_scheduler, optimizer_step, param_groups
from pipeline.ingest import AugmentConfig, IngestConfig, make_transform
from pipeline.synthetic import DEMO_CLASSES, Truth, generate

AUGMENTS = {
    "off": AugmentConfig(crop_min_scale=1.0, flip_p=0.0, randaugment=False, cutout_p=0.0),
    "tiny": AugmentConfig(crop_min_scale=1.0, flip_p=0.5, randaugment=False, cutout_p=0.0),  # the preset's
    "light": AugmentConfig(crop_min_scale=0.7, flip_p=0.5, randaugment=False, cutout_p=0.0),
    "default": AugmentConfig(),  # crop 0.5, flip, RandAugment, cutout 0.5
}


@dataclass(frozen=True)
class BenchTinyRecipeConfig:
    """Val mAP of mltr_tiny after a fixed number of steps: conv stem vs patch stem."""

    images: int = opt(600, "images in the generated COCO-layout set (about 3/4 train)")
    classes: int = opt(DEMO_CLASSES, "learnable classes drawn (of COCO's 80)")
    data_seed: int = opt(0, "seed of the generated set")
    steps: int = opt(420, "optimiser steps (the demo: 30 epochs of 2 workers x 16 images)")
    batch_size: int = opt(32, "images per step")
    lr: float = opt(5e-4, "peak learning rate (OneCycle, AdamW)")
    warmup: float = opt(0.2, "warm-up fraction of the schedule")
    loss: Literal["asl", "bce", "focal"] = opt("asl", "loss")
    augment: Literal["off", "tiny", "light", "default"] = opt("tiny", "augmentation (see AUGMENTS)")
    stem_widths: tuple[int, ...] = opt((32, 64), "widths of the conv stem's 3x3 convs")
    seeds: tuple[int, ...] = opt((0,), "training seeds, comma-separated; each stem runs every seed")
    eval_every: int = opt(42, "steps between val evaluations")
    workdir: str | None = opt(None, "keep the generated set here (default: a temporary folder)")


def load_images(root: Path) -> dict:
    """Usable rows of the generated set, decoded once: train at a shorter side of 80 px, val as evaluated."""
    truth = Truth.load(root)
    num_classes = len(truth.classes)
    evaluation = make_transform(IngestConfig(num_classes, image_size=64))
    out: dict = {"num_classes": num_classes}
    for split in ("train", "val"):
        images, targets = [], torch.zeros(len(truth.rows(split)), num_classes)
        for i, row in enumerate(truth.rows(split)):
            image = Image.open(root / row.file).convert("RGB")
            scale = 80 / min(image.size)
            if split == "train":
                image = image.resize(
                    (round(image.width * scale), round(image.height * scale)), Image.BILINEAR
                )
            tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # 3, H, W uint8
            images.append(tensor if split == "train" else evaluation(tensor))
            targets[i, row.labels] = 1.0
        out[split] = (images, targets)
    return out


@torch.no_grad()
def val_map(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    config = model.config
    logits = torch.cat(
        [model(normalize(images[i : i + 128], config.mean, config.std)) for i in range(0, len(images), 128)]
    )
    model.train()
    return float(mean_average_precision(logits, targets)[0])


def train_once(config: BenchTinyRecipeConfig, data: dict, stem: str, seed: int) -> dict:
    torch.manual_seed(seed)
    widths = config.stem_widths if stem == "conv" else ()
    model = create_model("mltr_tiny", num_classes=data["num_classes"], stem=stem, stem_widths=widths).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=config.lr)
    scheduler = make_scheduler(optimizer, config.lr, config.steps, config.warmup)
    criterion = build_loss(config.loss)
    transform = make_transform(
        IngestConfig(data["num_classes"], image_size=64, augment=AUGMENTS[config.augment])
    )
    (train_images, train_targets), (val_images, val_targets) = data["train"], data["val"]
    val_x = torch.stack(val_images)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve, step_seconds = [], 0.0
    for step in range(1, config.steps + 1):
        if len(order) < config.batch_size:
            order = torch.randperm(len(train_images), generator=generator).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size :]
        images = torch.stack([transform(train_images[i]) for i in batch])
        started = time.perf_counter()
        loss = criterion(model(normalize(images, model.config.mean, model.config.std)), train_targets[batch])
        loss.backward()
        optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)
        step_seconds += time.perf_counter() - started
        if step % config.eval_every == 0 or step == config.steps:
            curve.append({"step": step, "val_mAP": round(val_map(model, val_x, val_targets), 4)})
    best = max(curve, key=lambda point: point["val_mAP"])
    return {
        "stem": stem,
        "seed": seed,
        "final_val_mAP": curve[-1]["val_mAP"],
        "best_val_mAP_on_curve": best["val_mAP"],
        "best_step": best["step"],
        "ms_per_step": round(1000 * step_seconds / config.steps, 1),
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "curve": curve,
    }


def run(config: BenchTinyRecipeConfig) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mltr-bench-tiny-") as tmp:
        root = Path(config.workdir or tmp) / f"coco-{config.images}-{config.classes}-{config.data_seed}"
        if not (root / "_truth.json").exists():
            print(f"generating {config.images} images of {config.classes} classes in {root} ...", flush=True)
            generate("coco", root, config.images, seed=config.data_seed, faults=True, classes=config.classes)
        data = load_images(root)
    baseline = label_frequency_baseline(
        data["train"][1].numpy(), data["val"][1].numpy(), np.zeros(data["val"][1].shape, dtype=bool)
    )
    runs = []
    for seed in config.seeds:
        for stem in ("patch", "conv"):  # the baseline first, in the same run
            result = train_once(config, data, stem, seed)
            print(
                f"{stem:5s} stem, seed {seed}: final val mAP {result['final_val_mAP']:.4f} "
                f"(best on the curve {result['best_val_mAP_on_curve']:.4f} at step {result['best_step']}), "
                f"{result['ms_per_step']:.1f} ms/step",
                flush=True,
            )
            runs.append(result)
    final = {
        stem: statistics.mean(r["final_val_mAP"] for r in runs if r["stem"] == stem)
        for stem in ("patch", "conv")
    }
    print(
        f"\nlabel-frequency baseline {baseline:.4f}\n"
        f"patch stem {final['patch']:.4f} ({final['patch'] / baseline:.2f}x the baseline)\n"
        f"conv stem  {final['conv']:.4f} ({final['conv'] / baseline:.2f}x the baseline)   "
        f"ratio conv/patch {final['conv'] / final['patch']:.3f}\n",
        flush=True,
    )
    return {
        "bench": "tiny-recipe",
        "train_rows": len(data["train"][0]),
        "val_rows": len(data["val"][0]),
        "label_frequency_baseline_mAP": round(float(baseline), 4),
        "patch_final_val_mAP": round(final["patch"], 4),
        "conv_final_val_mAP": round(final["conv"], 4),
        "ratio": round(final["conv"] / final["patch"], 3),
        "conv_over_baseline": round(final["conv"] / baseline, 2),
        "runs": runs,
        "config": to_dict(config),
    }


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchTinyRecipeConfig, argv, prog="python -m jobs.bench tiny-recipe")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
