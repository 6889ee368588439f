"""`mltr tune` as the sweep tests run it: the real job, with each trial recorded and one made to fail.

    python -m tests.sweep_job <mltr tune flags>

Each trial appends its learning rate to the file ``$SWEEP_LEDGER`` when it starts (so a test sees
which trials ran, and how often); the trial whose learning rate is ``$SWEEP_FAIL_LR`` raises
before it trains. Everything else is ``jobs.tune``'s own trial and job.
"""

from __future__ import annotations

import json
import os
import sys

from jobs import tune
from jobs._config import parse_config
from jobs._runtime import run_job, setup_logging


def recorded_trial(params: dict, ctx: tune.TrialContext) -> None:
    with open(os.environ["SWEEP_LEDGER"], "a") as ledger:
        ledger.write(json.dumps({"lr": params["lr"], "pid": os.getpid()}) + "\n")
    fail = os.environ.get("SWEEP_FAIL_LR")
    if fail and params["lr"] == float(fail):
        raise RuntimeError(f"trial with lr {params['lr']:g} fails on purpose")
    tune.run_trial(params, ctx)


def main(argv: list[str]) -> int:
    # Run as __main__, the trial reaches Tune's processes pickled by value: they need not import tests.
    setup_logging()
    config = parse_config(tune.SweepConfig, argv, prog="mltr tune", job="tune")
    return run_job("tune", lambda: tune.run(config, trial=recorded_trial))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
