"""The model registry on MLflow: versions from training runs, aliases moved behind a lease.

Promotion moves aliases (MLflow's stages are deprecated): ``challenger`` is the latest
registered candidate, ``champion`` the model that serves, ``previous-champion`` the one it
displaced (what a rollback restores). MLflow has no compare-and-set on aliases
(``set_registered_model_alias`` is an upsert), so every alias move happens inside a
:class:`PromotionLease` and is read back afterwards.

The decision compares two models on the same images: :func:`paired_bootstrap` gives the mAP
difference and a 95% interval from resampling images (both models scored on each resample).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mltr.errors import MltrError
from mltr.metrics import mean_average_precision

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous-champion"
LEASE_TAG = "mltr.promotion_lease"  # on the registered model: who holds the promotion lease, until when


class RegistryError(MltrError):
    """The registry is not in the state an operation needs; the message says what to do."""


def default_name(dataset: str) -> str:
    return f"mltr-{dataset}"


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model (read from the model: version searches omit aliases)."""
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def resolve_version(
    client: MlflowClient, name: str, version: str | int | None = None, alias: str | None = None
):
    """The ``ModelVersion`` named by number or by alias, or a :class:`RegistryError` saying what exists."""
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias or CHALLENGER)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        what = f"version {version}" if version is not None else f"alias @{alias or CHALLENGER}"
        try:
            known = aliases(client, name)
        except MlflowException:
            raise RegistryError(
                f"no registered model {name!r}: register a run first (mltr register)"
            ) from None
        raise RegistryError(f"{name!r} has no {what}; its aliases: {known or 'none'}") from None


def version_tags(run) -> dict[str, str]:
    """What a registered version says about itself, from its training run."""
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    out = {
        "dataset": tags.get("mltr.dataset_uri", ""),
        "dataset_fingerprint": tags.get("mltr.dataset_fingerprint", ""),
        "variant": params.get("model", ""),
        # The window the network was built with: the flag is "None" where the variant's own was used.
        "window_size": params.get("resolved_window_size") or params.get("window_size", ""),
        "loss": params.get("loss", ""),
        "calib_mAP": f"{metrics['calib_mAP']:.6f}" if "calib_mAP" in metrics else "",
        "val_mAP": f"{metrics['val_mAP']:.6f}" if "val_mAP" in metrics else "",
        "git_commit": tags.get("mlflow.source.git.commit", ""),
    }
    return {k: v for k, v in out.items() if v}


def check_name_and_alias(name: str, alias: str | None = None) -> None:
    """Refuse a registered model name or alias MLflow would refuse, before anything is written (MLflow
    checks the alias only when it is set, after the version it points at was created)."""
    from mlflow.utils import validation

    checks = [(validation._validate_model_name, name, "registered model name")]
    if alias is not None:
        checks += [(validation._validate_model_alias_name, alias, "alias")]
        checks += [(validation._validate_model_alias_name_reserved, alias, "alias")]
    for check, value, what in checks:
        try:
            check(value)
        except MlflowException as exc:
            raise RegistryError(f"{what} {value!r} cannot be used: {exc.message}") from None


def register_run(client: MlflowClient, run_id: str, name: str, alias: str | None = CHALLENGER):
    """Register the model a training run logged as a new version of ``name``; point ``alias`` at it."""
    import mlflow

    from mltr.tracking import tracking_uri

    check_name_and_alias(name, alias)
    run = client.get_run(run_id)
    model_uri = run.data.tags.get("mltr.model_uri")
    if not model_uri:
        raise RegistryError(
            f"run {run_id} has no logged model (tag mltr.model_uri; status {run.info.status}): "
            f"only a finished training run can be registered"
        )
    with tracking_uri(client.tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=version_tags(run))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on the same images: mAP of each, the difference and its bootstrap interval."""

    candidate_mAP: float
    champion_mAP: float
    gain: float  # candidate - champion
    low: float  # 95% paired bootstrap interval of the gain
    high: float
    images: int
    resamples: int


def paired_bootstrap(
    candidate: np.ndarray,
    champion: np.ndarray,
    targets: np.ndarray,
    ignore: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Comparison:
    """mAP of both score matrices (N, C) on the same images, and a paired bootstrap interval of the gain.

    Each resample draws N images with replacement and scores both models on that same draw: the
    interval is of the difference, so what the two models share (easy and hard images) cancels.
    """
    n = len(targets)
    if not n or candidate.shape != champion.shape or candidate.shape[0] != n:
        raise ValueError(f"scores {candidate.shape} and {champion.shape} for {n} images")
    cand_map, _ = mean_average_precision(candidate, targets, ignore)
    champ_map, _ = mean_average_precision(champion, targets, ignore)
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        sub_ignore = None if ignore is None else ignore[idx]
        a, _ = mean_average_precision(candidate[idx], targets[idx], sub_ignore)
        b, _ = mean_average_precision(champion[idx], targets[idx], sub_ignore)
        if not (np.isnan(a) or np.isnan(b)):
            gains.append(a - b)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail]) if gains else (float("nan"),) * 2
    return Comparison(cand_map, champ_map, cand_map - champ_map, float(low), float(high), n, len(gains))


class LeaseBusy(RegistryError):
    """Another promotion of the same model holds the lease and did not release it in time."""


class LeaseLost(RegistryError):
    """This promotion's lease is no longer its own (taken over as stale): it must not move aliases."""


class PromotionLease:
    """Mutual exclusion of promotions of one registered model, on a registered-model tag.

    MLflow offers no atomic compare-and-set, so this is Fischer's timed mutual exclusion: a
    taker that finds the lease free (or stale: past its expiry) writes itself as the holder,
    waits ``settle_s`` (longer than any read-then-write of a competitor takes), and holds the
    lease only if it reads itself back. Of two takers that both found it free, the later write
    wins and the earlier one sees it. The holder (id, host, pid, since, expires) is recorded on
    the model, so a stuck promotion is visible; a lease past ``ttl_s`` is taken over.

    While held, a thread renews the lease every ``ttl_s / 4`` (scoring two models may outlast
    ``ttl_s``); :meth:`check` before every alias move raises :class:`LeaseLost` when the lease
    is not this holder's any more (renewals failed until it went stale and another took it).
    """

    def __init__(
        self,
        client: MlflowClient,
        name: str,
        ttl_s: float = 600.0,
        settle_s: float = 2.0,
        wait_s: float = 300.0,
    ):
        if not (0 <= settle_s < ttl_s and wait_s >= 0):
            raise ValueError(
                f"a lease needs 0 <= settle_s < ttl_s and wait_s >= 0, got {settle_s}, {ttl_s}, {wait_s}"
            )
        self.client, self.name = client, name
        self.ttl_s, self.settle_s, self.wait_s = ttl_s, settle_s, wait_s
        self.holder: dict | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: str | None = None

    def read(self) -> dict | None:
        """The recorded holder; ``None`` when free or unreadable (a tag that is not a holder's can
        hold no one out: it is taken over, with a warning, as a stale one is)."""
        text = self.client.get_registered_model(self.name).tags.get(LEASE_TAG)
        try:
            current = json.loads(text) if text else None
        except json.JSONDecodeError:
            current = None
        if text and not (
            isinstance(current, dict) and isinstance(current.get("expires"), int | float) and "id" in current
        ):
            log.warning(
                "the promotion lease tag of %s is not a holder's (%r): taking it as free", self.name, text
            )
            return None
        return current

    def _renew(self) -> None:
        period = self.ttl_s / 4
        while not self._stop.wait(period):
            try:
                current = self.read()
                if current is None or current.get("id") != self.holder["id"]:
                    self._lost = f"the lease of {self.name!r} is held by another promotion now: {current}"
                    return
                self.holder = {**self.holder, "expires": time.time() + self.ttl_s}
                self.client.set_registered_model_tag(self.name, LEASE_TAG, json.dumps(self.holder))
            except Exception as exc:  # a registry hiccup: the next period tries again; check() judges
                log.warning("could not renew the promotion lease of %s: %s", self.name, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this holder still holds the lease, unexpired."""
        current = self.read()
        if self._lost or self.holder is None or current is None or current.get("id") != self.holder["id"]:
            raise LeaseLost(
                self._lost or f"the promotion lease of {self.name!r} is not ours any more: {current}"
            )
        if current["expires"] < time.time():
            raise LeaseLost(
                f"the promotion lease of {self.name!r} expired at {time.ctime(current['expires'])}"
            )

    def __enter__(self) -> PromotionLease:
        me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop.clear()
        self._lost = None
        deadline = time.monotonic() + self.wait_s
        while True:
            current = self.read()
            if current is None or current.get("expires", 0) < time.time():
                if current is not None:
                    log.warning("taking over the stale promotion lease of %s: %s", self.name, current)
                now = time.time()
                mine = {**me, "since": now, "expires": now + self.ttl_s}
                try:
                    self.client.set_registered_model_tag(self.name, LEASE_TAG, json.dumps(mine))
                except MlflowException as exc:
                    # The SQL store inserts a new tag: of two takers writing it at once, one gets a
                    # unique-constraint error. That one lost the race; it reads again and waits.
                    log.debug("lease write of %s lost a race: %s", self.name, exc.message)
                else:
                    try:
                        time.sleep(self.settle_s)
                        current = self.read()
                    except BaseException:  # Ctrl-C while settling: a lease nobody holds would block for ttl_s
                        self._withdraw(me["id"])
                        raise
                    if current is not None and current.get("id") == me["id"]:
                        self.holder = mine
                        self._renewer = threading.Thread(
                            target=self._renew, name=f"lease-{self.name}", daemon=True
                        )
                        self._renewer.start()
                        return self
            if time.monotonic() > deadline:
                raise LeaseBusy(
                    f"another promotion of {self.name!r} holds its lease ({current}); "
                    f"it expires at {time.ctime(current.get('expires', 0)) if current else '?'}"
                )
            time.sleep(self.settle_s / 2 + random.random() * self.settle_s)

    def _withdraw(self, lease_id: str) -> None:
        """Delete the lease tag if it is still the one with ``lease_id``."""
        current = self.read()
        if current and current.get("id") == lease_id:
            self.client.delete_registered_model_tag(self.name, LEASE_TAG)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.holder:
            self._withdraw(self.holder["id"])
        self.holder = None


def move_aliases(
    client: MlflowClient, name: str, wanted: Mapping[str, str | None], lease: PromotionLease
) -> dict[str, str]:
    """Set (or, for None, delete) aliases under ``lease`` (checked first); read them back and raise
    if any is not as written."""
    lease.check()
    for alias, version in wanted.items():
        if version is None:
            if alias in aliases(client, name):
                client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, version)
    now = aliases(client, name)
    wrong = {a: now.get(a) for a, v in wanted.items() if now.get(a) != v}
    if wrong:
        raise RegistryError(f"{name!r}: aliases read back as {wrong} after writing {dict(wanted)}")
    return now
