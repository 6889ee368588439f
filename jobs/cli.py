"""The ``mltr`` console script: ``mltr <job> [flags]`` runs ``python -m jobs.<job> [flags]`` (a
``-`` in the job's name is a ``_`` in its module's: ``mltr make-synthetic`` is ``jobs.make_synthetic``)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

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


def summary(module: str) -> str:
    """The first sentence of a job module's docstring, read from its source: listing the jobs
    imports none of them (each pulls in Ray, torch or MLflow)."""
    spec = importlib.util.find_spec(module)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) if spec and spec.origin else None
    paragraph = " ".join((doc or "").split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s", paragraph.replace("``", ""), maxsplit=1)[0].rstrip(".")


def usage() -> str:
    width = max(map(len, JOBS))
    lines = [f"  {name:<{width}}  {summary(module)}" for name, module in JOBS.items()]
    return "usage: mltr <job> [flags]   (mltr <job> --help for its flags)\n\njobs:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"mltr: unknown job {name!r}; choose one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[name])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
