"""Benchmark what Ray Train costs per step: mltr_tiny under a 1-worker TorchTrainer vs a plain loop.

    python -m jobs.bench train-overhead

Both run the same step functions of ``mltr.train`` (forward_backward + optimizer_step) on the
same in-memory batches, after the same warm-up, with the same number of torch threads: the
worker reserves every CPU of the local Ray (Ray sets a worker's OMP/torch threads to the CPUs
it reserves). Ends with one JSON line holding every figure and ``ratio`` (Train over plain).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from jobs._config import opt, parse_config, to_dict
from jobs._runtime import init_ray


@dataclass(frozen=True)
class BenchTrainOverheadConfig:
    """Step time of mltr_tiny: 1-worker TorchTrainer vs a plain loop on the same batches."""

    model: str = opt("mltr_tiny", "model variant")
    batch_size: int = opt(32, "images per step")
    num_classes: int = opt(80, "classes")
    steps: int = opt(40, "timed steps")
    warmup: int = opt(5, "untimed steps first")
    threads: int | None = opt(None, "torch threads in both (default: this machine's cores)")
    seed: int = opt(0, "seed of the batches and the model")


def make_batches(config: BenchTrainOverheadConfig, image_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(4):
        batches.append(
            {
                "image": torch.randint(
                    0, 256, (config.batch_size, 3, image_size, image_size), generator=generator
                ).to(torch.uint8),
                "targets": (
                    torch.rand(config.batch_size, config.num_classes, generator=generator) < 0.05
                ).float(),
                "ignore_mask": torch.zeros(config.batch_size, config.num_classes, dtype=torch.bool),
            }
        )
    return batches


def timed_steps(model, batches, config: BenchTrainOverheadConfig, device: torch.device) -> list[float]:
    from mltr.losses import build_loss
    from mltr.train import forward_backward, optimizer_step, param_groups

    criterion = build_loss("asl")
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4)
    times = []
    for step in range(config.warmup + config.steps):
        start = time.perf_counter()
        forward_backward(model, criterion, batches[step % len(batches)], device, 1)
        optimizer_step(model, optimizer, None, None, 1.0)
        if step >= config.warmup:
            times.append(time.perf_counter() - start)
    return times


def plain_loop(config: BenchTrainOverheadConfig, batches) -> list[float]:
    from mltr.model import create_model

    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=config.num_classes).train()
    return timed_steps(model, batches, config, torch.device("cpu"))


def train_loop_per_worker(loop_config: dict) -> dict:
    import ray.train
    import ray.train.torch

    from mltr.model import create_model

    config: BenchTrainOverheadConfig = loop_config["config"]
    torch.manual_seed(config.seed)
    model = ray.train.torch.prepare_model(create_model(config.model, num_classes=config.num_classes).train())
    times = timed_steps(model, loop_config["batches"], config, ray.train.torch.get_device())
    return {"step_times": times, "torch_threads": torch.get_num_threads()}


def run(config: BenchTrainOverheadConfig) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from mltr.model import VARIANTS

    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    batches = make_batches(config, VARIANTS[config.model].image_size)
    print(
        f"plain loop: {config.steps} steps of {config.model}, batch {config.batch_size}, {threads} threads",
        flush=True,
    )
    plain = plain_loop(config, batches)

    init_ray(num_cpus=threads, log_to_driver=False)
    print("1-worker TorchTrainer: same steps ...", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "batches": batches},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=f"bench-train-overhead-{time.time_ns()}", storage_path="/tmp/mltr-bench"
        ),
    )
    result = trainer.fit()
    measured = result.return_value  # the training function's return value (rank 0)
    under_train = measured["step_times"]

    plain_ms, train_ms = statistics.median(plain) * 1e3, statistics.median(under_train) * 1e3
    figures = {
        "bench": "train-overhead",
        "model": config.model,
        "batch_size": config.batch_size,
        "steps": config.steps,
        "torch_threads_plain": threads,
        "torch_threads_worker": measured["torch_threads"],
        "plain_step_ms_median": round(plain_ms, 2),
        "train_step_ms_median": round(train_ms, 2),
        "plain_step_ms_mean": round(statistics.mean(plain) * 1e3, 2),
        "train_step_ms_mean": round(statistics.mean(under_train) * 1e3, 2),
        "ratio": round(train_ms / plain_ms, 3),
        "config": to_dict(config),
    }
    print(
        f"\nplain loop        : {plain_ms:7.1f} ms/step\n"
        f"TorchTrainer (1) : {train_ms:7.1f} ms/step   ratio {train_ms / plain_ms:.3f}x\n",
        flush=True,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchTrainOverheadConfig, argv, prog="python -m jobs.bench train-overhead")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
