"""Benchmark MlTr on the CPU against its Swin-only ablation and timm's Swin, same run.

    python -m jobs.bench model --variant mltr_s --image-size 224 --batch-size 8

Times a training step (forward, ASL loss, backward, AdamW step) and inference (forward under
``torch.inference_mode``) of three networks on random images: MlTr, the same network with
cross-window attention removed (``cross_window=False``, i.e. Swin in MlTr's code), and timm's
Swin of the same layout (``pretrained=False``) as an outside reference. The networks take turns
step by step (the order rotating every round), so load from other processes on the machine hits
all of them alike; after ``--warmup`` untimed rounds the median of ``--steps`` timed rounds is
reported, and next to it the best (fastest) round, which on a shared machine is the one least
disturbed by other processes; the load average before and after is recorded. Ends with one JSON
line holding every figure, ``ratio`` (MlTr over ablation, training step, medians),
``ratio_infer``, their ``*_best`` counterparts and the ratios over timm.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from jobs._config import opt, parse_config, to_dict
from mltr import build_loss, create_model
from mltr.model import stage_window

# timm's Swin with the same stage layout as each MlTr variant (the outside reference).
TIMM_REFERENCE = {
    "mltr_s": "swin_tiny_patch4_window7_224",
    "mltr_m": "swin_small_patch4_window7_224",
    "mltr_l": "swin_base_patch4_window7_224",
    "mltr_xl": "swin_large_patch4_window7_224",
}


@dataclass(frozen=True)
class BenchModelConfig:
    """Training-step and inference images/s of MlTr, its Swin-only ablation and timm's Swin on the CPU."""

    variant: str = opt("mltr_s", "MlTr variant")
    image_size: int | None = opt(None, "image side in pixels (default: the variant's)")
    window_size: int | None = opt(None, "window size (default: the variant's)")
    batch_size: int = opt(8, "images per step")
    num_classes: int = opt(80, "classes of the head")
    warmup: int = opt(2, "untimed rounds before timing")
    steps: int = opt(5, "timed rounds; the median is reported")
    timm: bool = opt(True, "also time timm's Swin of the same layout (needs timm)")
    # On a machine shared with other busy processes, one thread per core makes OpenMP threads wait on each
    # other (steps 10-30x slower and erratic); --threads 1 measures the networks rather than the contention.
    threads: int | None = opt(None, "torch intra-op threads (default: torch's default, one per core)")
    seed: int = opt(0, "seed of weights and data")


def _timm_reference(config: BenchModelConfig, image_size: int, window_size: int) -> torch.nn.Module | None:
    name = TIMM_REFERENCE.get(config.variant)
    if not config.timm or name is None:
        return None
    try:
        import timm
    except ImportError:
        print("timm is not installed: no outside reference", file=sys.stderr)
        return None
    return timm.create_model(
        name, pretrained=False, num_classes=config.num_classes, img_size=image_size, window_size=window_size
    )


def _interleaved(steps: dict[str, Callable[[], None]], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, calling them in turn, the order rotating every round."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _train_step(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    loss_fn = build_loss("asl")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        model.train()
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _infer_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            model(images)

    return step


def _gflops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchModelConfig, argv, prog="python -m jobs.bench model")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    overrides = {"num_classes": config.num_classes}
    if config.image_size is not None:
        overrides["image_size"] = config.image_size
    if config.window_size is not None:
        overrides["window_size"] = config.window_size
    try:
        models = {
            "mltr": create_model(config.variant, **overrides),
            "ablation": create_model(config.variant, cross_window=False, **overrides),
        }
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_config = models["mltr"].config
    size = model_config.image_size
    # Give timm the window MlTr's first stage uses, so the reference has the same windows.
    reference = _timm_reference(
        config, size, stage_window(size // model_config.patch_size, model_config.window_size)[0]
    )
    if reference is not None:
        models["timm"] = reference

    images = torch.randn(config.batch_size, 3, size, size)
    targets = (torch.rand(config.batch_size, config.num_classes) < 0.05).float()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    gflops = {name: _gflops_per_image(m, images) for name, m in models.items()}
    print(
        f"{config.variant} at {size} px, window {model_config.window_size}, batch {config.batch_size}, "
        f"{torch.get_num_threads()} threads, {config.warmup} warm-up + {config.steps} timed rounds"
    )
    for name in models:
        print(
            f"  {name:9s} {params[name] / 1e6:7.2f} M parameters, "
            f"{gflops[name]:6.2f} GFLOP per image (forward)"
        )

    load_before = os.getloadavg()[0]
    train = _interleaved(
        {name: _train_step(m, images, targets) for name, m in models.items()}, config.warmup, config.steps
    )
    infer = _interleaved(
        {name: _infer_step(m, images) for name, m in models.items()}, config.warmup, config.steps
    )
    result: dict[str, object] = {
        "bench": "model",
        "config": to_dict(config),
        "image_size": size,
        "window_size": model_config.window_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "params_m": {name: round(n / 1e6, 3) for name, n in params.items()},
        "gflops_per_image": {name: round(g, 3) for name, g in gflops.items()},
    }
    # images/s per network, phase and statistic; suffix "" for medians and "_best" for the fastest round.
    rates = {
        (name, phase, suffix): config.batch_size / stat(times[name])
        for phase, times in (("train", train), ("infer", infer))
        for name in models
        for suffix, stat in (("", statistics.median), ("_best", min))
    }
    for (name, phase, suffix), rate in rates.items():
        result[f"{name}_{phase}_images_per_s{suffix}"] = round(rate, 3)
    pairs = [("ratio", "mltr", "ablation")]
    if "timm" in models:
        pairs += [("vs_timm", "mltr", "timm"), ("ablation_vs_timm", "ablation", "timm")]
    for key, top, bottom in pairs:
        for phase, tag in (("train", ""), ("infer", "_infer")):
            if key != "ratio":
                tag = f"_{phase}"
            for suffix in ("", "_best"):
                ratio = rates[(top, phase, suffix)] / rates[(bottom, phase, suffix)]
                result[f"{key}{tag}{suffix}"] = round(ratio, 3)
    print("images/s (median | best round):")
    for name in models:
        print(
            f"  {name:9s} train {rates[(name, 'train', '')]:7.2f} | {rates[(name, 'train', '_best')]:7.2f}   "
            f"inference {rates[(name, 'infer', '')]:7.2f} | {rates[(name, 'infer', '_best')]:7.2f}"
        )
    print(
        f"MlTr / ablation: training {result['ratio']:.3f}x | {result['ratio_best']:.3f}x, "
        f"inference {result['ratio_infer']:.3f}x | {result['ratio_infer_best']:.3f}x"
    )
    if "timm" in models:
        print(
            f"MlTr / timm Swin: training {result['vs_timm_train']:.3f}x | "
            f"{result['vs_timm_train_best']:.3f}x, "
            f"inference {result['vs_timm_infer']:.3f}x | {result['vs_timm_infer_best']:.3f}x"
        )
    print(f"load average (1 min) before and after: {result['loadavg_1min']}")
    print(json.dumps(result))
    return 0
