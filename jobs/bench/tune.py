"""What Ray Tune's machinery costs a sweep: the same trials as a sweep vs back to back in one process.

    python -m jobs.bench tune                          # 4 trials (window 2,4 x loss bce,asl), 2 epochs each
    python -m jobs.bench tune --data ./datasets/coco --epochs 3

Both run the same trials of ``mltr_tiny`` (the tiny preset, 1 Train worker, 1 decode actor) on the
same local Ray, tracked in the same embedded MLflow: back to back, each one ``jobs.train``'s run
through the shared trainer builder (``train.start`` -> ``build_trainer(...).fit()`` -> ``report``);
then as ``jobs.tune``'s sweep with at most one trial at a time and FIFO (every trial runs every
epoch). Without ``--data`` it generates and converts the demo's kind of COCO-layout set first.
Ends with one JSON line holding every figure and ``ratio`` (sweep over back to back, wall time).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jobs import train as train_job
from jobs import tune
from jobs._config import opt, parse_config, replace_flat, to_dict
from jobs._runtime import init_ray
from mltr.sweep import FINISHED
from mltr.trainer import build_trainer, fit
from pipeline.convert import convert
from pipeline.readers import read_index
from pipeline.synthetic import DEMO_CLASSES, generate


@dataclass(frozen=True)
class BenchTuneConfig:
    """Wall time of N trials: a sweep (one trial at a time) vs back to back through the trainer builder."""

    data: str | None = opt(None, "a converted dataset URI (default: generate the demo's kind, 600 images)")
    window_sizes: tuple[int, ...] = opt((2, 4), "window sizes of the trials")
    losses: tuple[str, ...] = opt(("bce", "asl"), "losses of the trials")
    lr: float = opt(5e-4, "peak learning rate of every trial")
    epochs: int = opt(2, "epochs of every trial")
    workdir: str | None = opt(None, "where datasets, runs and MLflow go (default: a temporary folder)")


def back_to_back(config: BenchTuneConfig, resolved: train_job.Resolved) -> list[float]:
    """Each trial as ``jobs.train`` runs it, one after another: the wall time of each."""
    stamp, times = time.time_ns(), []
    for window in config.window_sizes:
        for loss in config.losses:
            trial = replace_flat(
                resolved.config, window_size=window, loss=loss, name=f"plain-{stamp}-w{window}-{loss}"
            )
            model = trial.model.resolve(resolved.manifest.num_classes)
            started = time.perf_counter()
            trial_resolved = dataclasses.replace(resolved, config=trial, model=model)
            run, client = train_job.start(trial_resolved)
            train_job.report(trial_resolved, run, client, fit(build_trainer(run)))
            times.append(time.perf_counter() - started)
            print(f"back to back: window {window}, {loss}: {times[-1]:.1f} s", flush=True)
    return times


def run(config: BenchTuneConfig) -> dict:
    work = Path(config.workdir or tempfile.mkdtemp(prefix="mltr-bench-tune-")).resolve()
    # One local Ray for both, sized as the sweep sizes its own for one trial, started before either.
    init_ray(num_cpus=4, log_to_driver=False)
    data = config.data
    if data is None:
        generate("coco", work / "src", 600, seed=0, faults=True, classes=DEMO_CLASSES)
        convert(read_index("coco", str(work / "src")), str(work / "datasets"), rows_per_shard=64)
        data = str(work / "datasets" / "coco")
    common = [
        "--config", "tiny", "--data", data, "--epochs", str(config.epochs), "--lr", str(config.lr),
        "--num-workers", "1", "--decode-actors", "1", "--workdir", str(work),
    ]  # fmt: skip
    train = parse_config(train_job.TrainConfig, common, job="train")
    sweep = parse_config(
        tune.SweepConfig,
        [
            *common, "--window-sizes", ",".join(map(str, config.window_sizes)), "--losses", ",".join(config.losses),
            "--lrs", str(config.lr), "--scheduler", "fifo", "--max-concurrent-trials", "1",
            "--name", f"bench-sweep-{time.time_ns()}",
        ],
        job="tune",
    )  # fmt: skip
    trials = len(config.window_sizes) * len(config.losses)
    print(f"{trials} trials of mltr_tiny, {config.epochs} epochs, 1 worker each, on {data}", flush=True)

    resolved = train_job.resolve(train)
    started = time.perf_counter()
    plain = back_to_back(config, resolved)
    plain_s = time.perf_counter() - started

    started = time.perf_counter()
    result = tune.run(sweep)
    sweep_s = time.perf_counter() - started
    finished = [t for t in result["trials"] if t["status"] == FINISHED]
    if len(finished) != trials:
        raise RuntimeError(f"the sweep finished {len(finished)} of {trials} trials: {result['trials']}")

    figures = {
        "bench": "tune",
        "trials": trials,
        "epochs": config.epochs,
        "back_to_back_s": round(plain_s, 1),
        "back_to_back_trial_s": [round(t, 1) for t in plain],
        "sweep_s": round(sweep_s, 1),
        "ratio": round(sweep_s / plain_s, 3),
        "config": to_dict(config),
    }
    print(
        f"\nback to back (trainer builder): {plain_s:6.1f} s\n"
        f"sweep (Tune, 1 at a time)     : {sweep_s:6.1f} s   ratio {sweep_s / plain_s:.3f}x\n",
        flush=True,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    config = parse_config(BenchTuneConfig, argv, prog="python -m jobs.bench tune")
    print(json.dumps(run(config)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
