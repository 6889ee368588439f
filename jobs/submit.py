"""Submit a stage to a Ray cluster as a job, through Ray's Jobs API, and follow it.

    mltr submit pipeline --address http://head:8265 -- --dataset coco --root /data/coco2014 --out s3://bucket/datasets
    mltr submit train --no-wait -- --data s3://bucket/datasets/coco --config coco --use-gpu --num-workers 8

What follows ``--`` is the stage's own flags; the job runs ``python -m jobs.<stage> <flags>`` on the
cluster, in this working directory packed and uploaded by Ray (``--working-dir``, with the
usual excludes: ``.venv``, ``work/``, ``.git``, ...). The object-store and MLflow settings of
this shell (``AWS_*``, ``MLFLOW_*``; see ``FORWARDED_ENV``, and ``--env NAME`` for more) go to the
job as environment variables of its runtime env: never on its command line nor in a file of the
upload. The runtime env is part of the job's record, though: whoever can list the cluster's jobs
(``ray job list``, the Jobs API) reads those values; on a shared cluster give its nodes their
own credentials (an instance role, a Kubernetes secret) and forward none (``--no-forward-env``:
only ``--env`` names go). ``AWS_PROFILE`` names a profile of this machine's ``~/.aws`` files and
goes only with ``--env AWS_PROFILE``. Ray's token
authentication works through Ray's own settings (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).

With ``--wait`` (default) the job's logs stream here and this command exits with the job's
status: 0 when it succeeded, the driver's own exit status when it failed (2: a user error, see
its last line), 1 when Ray stopped it. Ctrl-C stops following, not the job. ``--no-wait``
prints the submission id and returns at once. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from mltr.errors import ConfigError

# The stages a cluster runs as jobs (jobs.cli names them; the module is jobs.<stage>).
STAGES = (
    "make-synthetic", "preprocess", "train", "tune", "register", "promote", "evaluate",
    "predict", "export", "pipeline",
)  # fmt: skip
# Settings the job reads from its environment, taken from this shell where set.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_REGISTRY_URI",
)  # fmt: skip
EXCLUDES = (".venv", "venv", "work/", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # in the order Ray's clients read them
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


@dataclass(frozen=True)
class Submission:
    """What goes to the cluster: the entrypoint, its runtime env, and how to follow it."""

    stage: str
    stage_args: tuple[str, ...]
    address: str | None = None
    wait: bool = True
    working_dir: str = "."
    env: tuple[str, ...] = ()  # more variable names to forward
    submission_id: str | None = None
    python: str = "python"
    forwarded: dict[str, str] = field(default_factory=dict)  # filled from the environment

    @property
    def entrypoint(self) -> str:
        module = "jobs." + self.stage.replace("-", "_")
        return shlex.join([self.python, "-m", module, *self.stage_args])

    def runtime_env(self) -> dict:
        return {
            "working_dir": self.working_dir,
            "excludes": list(EXCLUDES),
            "env_vars": dict(self.forwarded),
        }


def parse(argv: list[str]) -> Submission:
    parser = argparse.ArgumentParser(
        prog="mltr submit",
        usage="mltr submit STAGE [--address URL] [--wait | --no-wait] [...] -- [STAGE FLAGS]",
        description="Submit a stage as a Ray job (Jobs API), stream its logs, exit with its status.",
    )
    parser.add_argument("stage", choices=STAGES, help="the stage to run: python -m jobs.<stage>")
    parser.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS, "
        "else http://127.0.0.1:8265)",
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the job's logs and exit with its status (default), or return once it is submitted",
    )
    parser.add_argument("--working-dir", default=".", help="the folder uploaded as the job's working dir")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this environment variable too (repeatable); its value is read from this shell",
    )
    parser.add_argument(
        "--forward-env",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send this shell's object-store and MLflow settings ("
        + ", ".join(FORWARDED_ENV)
        + ", where set) with the job "
        "(default); --no-forward-env sends only the --env names, for nodes with their own",
    )
    parser.add_argument("--submission-id", default=None, help="the job's id (default: Ray's)")
    parser.add_argument(
        "--python", default="python", help="the cluster's Python that runs the stage (default: python)"
    )
    if "--" in argv:
        cut = argv.index("--")
        own, stage_args = argv[:cut], argv[cut + 1 :]
    else:
        own, stage_args = argv, []
    args = parser.parse_args(own)
    names = [*(FORWARDED_ENV if args.forward_env else ()), *args.env]
    forwarded = {name: os.environ[name] for name in names if name in os.environ}
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise ConfigError(f"--env {', '.join(missing)}: not set in this shell")
    if not os.path.isdir(args.working_dir):
        raise ConfigError(f"--working-dir {args.working_dir}: not a folder")
    return Submission(
        stage=args.stage,
        stage_args=tuple(stage_args),
        address=args.address,
        wait=args.wait,
        working_dir=args.working_dir,
        env=tuple(args.env),
        submission_id=args.submission_id,
        python=args.python,
        forwarded=forwarded,
    )


def job_server(address: str | None) -> str:
    """Where jobs go: ``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` (as Ray's
    own clients read them), else the local head's dashboard."""
    return next((a for a in (address, *map(os.environ.get, ADDRESS_VARIABLES)) if a), DEFAULT_ADDRESS)


def client_for(address: str | None):
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    where = job_server(address)
    # Ray's client lets these variables override the address it is given: --address goes where
    # it says, not to the cluster a variable of this shell names.
    hidden = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        return JobSubmissionClient(where)
    except AuthenticationError as exc:
        # Ray's message says where it looked for the token (RAY_AUTH_TOKEN, ~/.ray/auth_token).
        raise ConfigError(
            f"{where}: {str(exc).splitlines()[0]} (set RAY_AUTH_TOKEN to the cluster's token)"
        ) from None
    except (ConnectionError, requests.exceptions.RequestException, RuntimeError, ValueError) as exc:
        raise ConfigError(f"no Ray job server answers at {where}: {exc}") from None
    finally:
        os.environ.update(hidden)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _status(info) -> str:
    return str(getattr(info.status, "value", info.status))


def exit_status(info) -> int:
    """The job's status as this command's exit status."""
    status = _status(info)
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and info.driver_exit_code not in (None, 0):
        code = int(info.driver_exit_code)
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says it
    return 1


URL_SETTINGS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_REGISTRY_URI",
)  # fmt: skip


def _loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    try:
        host = urlsplit(url if "://" in url else f"//{url}").hostname or ""
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def loopback_settings(forwarded: dict[str, str], server: str) -> list[str]:
    """Forwarded settings that point at this machine's loopback while the job server is elsewhere:
    the job would reach its own node's loopback, not this machine's services. (Behind a
    port-forward the server looks local too: then nothing can be told.)"""
    if _loopback(server):
        return []
    return [name for name in URL_SETTINGS if name in forwarded and _loopback(forwarded[name])]


def run(submission: Submission) -> tuple[int, dict]:
    server = job_server(submission.address)
    for name in loopback_settings(submission.forwarded, server):
        print(
            f"submit: warning: {name}={submission.forwarded[name]} is this machine's loopback; the job "
            f"on {server} reaches its own node's instead (export an address the cluster reaches, "
            f"or --no-forward-env when the nodes have their own settings)",
            file=sys.stderr,
            flush=True,
        )
    client = client_for(submission.address)
    try:
        job_id = client.submit_job(
            entrypoint=submission.entrypoint,
            runtime_env=submission.runtime_env(),
            submission_id=submission.submission_id,
            metadata={"mltr.stage": submission.stage},
        )
    except RuntimeError as exc:  # the job server refused it (a used --submission-id, a bad runtime env)
        raise ConfigError(
            f"{client.get_address()} refused the job: {str(exc).strip().splitlines()[-1]}"
        ) from None
    summary = {
        "submission_id": job_id,
        "stage": submission.stage,
        "entrypoint": submission.entrypoint,
        "address": client.get_address(),
        "forwarded_env": sorted(submission.forwarded),
    }
    print(
        f"submitted {submission.stage} as job {job_id} to {client.get_address()}", file=sys.stderr, flush=True
    )
    if not submission.wait:
        return 0, {**summary, "status": _status(client.get_job_info(job_id))}
    try:
        asyncio.run(_follow(client, job_id))
        info = client.get_job_info(job_id)
        while _status(info) not in TERMINAL:
            time.sleep(0.5)  # the log stream can end a moment before the status is final
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        print(
            f"stopped following job {job_id}; it keeps running (ray job stop {job_id} stops it)",
            file=sys.stderr,
            flush=True,
        )
        return 130, {**summary, "status": "RUNNING"}
    status = _status(info)
    code = exit_status(info)
    return code, {
        **summary,
        "status": status,
        "driver_exit_code": info.driver_exit_code,
        "message": info.message,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        submission = parse(argv)
        code, summary = run(submission)
    except ConfigError as exc:
        print(f"submit: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
