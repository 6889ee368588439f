"""Benchmarks of the stages, each against a baseline measured in the same run.

``python -m jobs.bench <name> [flags]``: dispatch to ``jobs.bench.<name>``.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "preprocess": "jobs.bench.preprocess",
    "ingest": "jobs.bench.ingest",
    "model": "jobs.bench.model",
    "model-gpu": "jobs.bench.model_gpu",
    "train-overhead": "jobs.bench.train_overhead",
    "train-gpu": "jobs.bench.train_gpu",
    "tiny-recipe": "jobs.bench.tiny_recipe",
    "tune": "jobs.bench.tune",
    "predict": "jobs.bench.predict",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(f"usage: python -m jobs.bench {{{','.join(BENCHES)}}} [flags]", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
