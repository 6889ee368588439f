"""The ``mltr`` console script: ``mltr <job> [flags]`` runs ``python -m jobs.<job> [flags]``."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "make-synthetic": "jobs.make_synthetic",
    "preprocess": "jobs.preprocess",
    "bench": "jobs.bench.__main__",
    "train": "jobs.train",
    "tune": "jobs.tune",
    "register": "jobs.register",
    "promote": "jobs.promote",
    "evaluate": "jobs.evaluate",
    "predict": "jobs.predict",
    "export": "jobs.export",
    "pipeline": "jobs.pipeline",
    "submit": "jobs.submit",
    "demo": "jobs.demo",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mltr <job> [flags]\n\njobs:\n" + "\n".join(f"  {name}" for name in JOBS))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"mltr: unknown job {name!r}; choose one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[name])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
