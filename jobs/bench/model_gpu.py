"""Benchmark MlTr on a GPU: images/s and model FLOP utilisation (MFU), training and inference.

    python -m jobs.bench model-gpu                    # mltr_s at 224 and mltr_l at 384, bf16 autocast
    python -m jobs.bench model-gpu --compile          # the same through torch.compile

For every variant, and for its Swin-only ablation (``cross_window=False``), times a training step
(forward and ASL loss under bf16 autocast, backward, fused AdamW step) and inference (forward
under ``torch.inference_mode``) with CUDA events, after warm-up steps. FLOPs are counted once per
network with ``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplications and attention,
forward and backward); MFU is achieved FLOP/s over the peak dense bf16 FLOP/s of the card, from a
table of known cards or ``--peak-tflops``. A batch that does not fit is halved until it does.
Exits with status 2 when CUDA is not available. Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from jobs._config import opt, parse_config, to_dict
from mltr import build_loss, create_model

# Peak dense bf16 tensor-core FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}

# Default batch per variant: large enough to keep a card busy, small enough for 80 GB in training.
DEFAULT_BATCH = {"mltr_tiny": 256, "mltr_s": 128, "mltr_m": 48, "mltr_l": 32, "mltr_xl": 16}


@dataclass(frozen=True)
class BenchModelGpuConfig:
    """GPU images/s and MFU of MlTr variants and their Swin-only ablations, bf16 autocast."""

    variants: tuple[str, ...] = opt(("mltr_s", "mltr_l"), "variants, comma-separated")
    batch_size: int = opt(
        0, "training batch (0: per variant, mltr_s 128, mltr_l 32); inference uses twice it"
    )
    ablation: bool = opt(True, "also time each variant with cross-window attention removed")
    compile: bool = opt(False, "run the networks through torch.compile")
    warmup: int = opt(5, "untimed steps (more with --compile: the first steps compile)")
    steps: int = opt(20, "timed steps; the median is reported")
    num_classes: int = opt(80, "classes of the head")
    peak_tflops: float | None = opt(
        None, "peak dense bf16 TFLOP/s of the card (default: from a table of cards)"
    )
    device: str = opt("cuda", "cuda, or cpu for a smoke run of this script (no MFU)")


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a card, from ``--peak-tflops`` or the table; None when unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward, and backward if it runs one), counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny CPU smoke figures and GPU figures alike stay readable)."""
    return float(f"{x:.{digits}g}")


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_train_step(
    model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> Callable[[], None]:
    loss_fn = build_loss("asl")
    fused = images.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)

    def step() -> None:
        with _autocast(images.device):
            logits = model(images)
        loss_fn(logits.float(), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_infer_step(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), _autocast(images.device):
            model(images)

    return step


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per step after ``warmup`` steps (CUDA events on a GPU)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def bench_network(
    config: BenchModelGpuConfig,
    variant: str,
    cross_window: bool,
    batch: int,
    device: torch.device,
    peak: float | None,
) -> dict[str, Any]:
    """Train and inference figures of one network; halves the batch on out-of-memory."""
    while True:
        try:
            return _bench_network(config, variant, cross_window, batch, device, peak)
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"  {variant}: batch {batch} does not fit, trying {batch // 2}", flush=True)
            batch //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _bench_network(
    config: BenchModelGpuConfig,
    variant: str,
    cross_window: bool,
    batch: int,
    device: torch.device,
    peak: float | None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(variant, num_classes=config.num_classes, cross_window=cross_window).to(device)
    size = model.config.image_size
    params = sum(p.numel() for p in model.parameters())
    network = torch.compile(model) if config.compile else model
    images = torch.randn(batch, 3, size, size, device=device)
    targets = (torch.rand(batch, config.num_classes, device=device) < 0.05).float()
    model.train()
    train_step = make_train_step(network, images, targets)
    train_flops = count_flops(make_train_step(model, images, targets))
    train_s = time_steps(train_step, device, config.warmup, config.steps)

    model.eval()
    infer_images = torch.randn(2 * batch, 3, size, size, device=device)
    infer_flops = count_flops(make_infer_step(model, infer_images))
    infer_s = time_steps(make_infer_step(network, infer_images), device, config.warmup, config.steps)
    memory_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, network, train_step, images, infer_images
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "variant": variant,
        "cross_window": cross_window,
        "image_size": size,
        "params_m": round(params / 1e6, 3),
        "train_batch": batch,
        "train_images_per_s": round(batch / train_s, 2),
        "train_tflop_per_step": _sig(train_flops / 1e12),
        "train_achieved_tflops": _sig(train_flops / train_s / 1e12),
        "infer_batch": 2 * batch,
        "infer_images_per_s": round(2 * batch / infer_s, 2),
        "infer_tflop_per_step": _sig(infer_flops / 1e12),
        "infer_achieved_tflops": _sig(infer_flops / infer_s / 1e12),
        "train_mfu": None if peak is None else _sig(train_flops / train_s / peak),
        "infer_mfu": None if peak is None else _sig(infer_flops / infer_s / peak),
        "peak_memory_gb": None if memory_gb is None else round(memory_gb, 2),
    }


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchModelGpuConfig, argv, prog="python -m jobs.bench model-gpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: CUDA is not available on this machine; this benchmark needs a GPU "
            "(use `python -m jobs.bench model` for the CPU benchmark)",
            file=sys.stderr,
        )
        return 2
    device = torch.device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, config.peak_tflops) if device.type == "cuda" or config.peak_tflops else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(
        f"{name}: peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} dense bf16", flush=True
    )

    runs = []
    for variant in config.variants:
        batch = config.batch_size or DEFAULT_BATCH.get(variant, 32)
        for cross_window in (True, False) if config.ablation else (True,):
            run = bench_network(config, variant, cross_window, batch, device, peak)
            runs.append(run)
            label = variant if cross_window else f"{variant} (ablation)"
            mfu = {
                p: "n/a" if run[f"{p}_mfu"] is None else f"{run[f'{p}_mfu']:.1%}" for p in ("train", "infer")
            }
            print(
                f"  {label:22s} train {run['train_images_per_s']:8.1f} images/s (batch {run['train_batch']}, "
                f"MFU {mfu['train']})   inference {run['infer_images_per_s']:8.1f} images/s "
                f"(MFU {mfu['infer']})",
                flush=True,
            )
    ratios = {}
    for variant in config.variants:
        pair = {r["cross_window"]: r for r in runs if r["variant"] == variant}
        if len(pair) == 2:
            ratios[variant] = {
                "train": round(pair[True]["train_images_per_s"] / pair[False]["train_images_per_s"], 3),
                "infer": round(pair[True]["infer_images_per_s"] / pair[False]["infer_images_per_s"], 3),
            }
            print(
                f"  {variant}: MlTr / ablation, training {ratios[variant]['train']:.3f}x, "
                f"inference {ratios[variant]['infer']:.3f}x"
            )
    print(
        json.dumps(
            {
                "bench": "model-gpu",
                "config": to_dict(config),
                "device": name,
                "torch": torch.__version__,
                "peak_tflops": None if peak is None else peak / 1e12,
                "runs": runs,
                "ratios": ratios,
            }
        )
    )
    return 0
