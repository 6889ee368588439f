"""Promote a registered version to ``champion`` only when it scores better on the same images, or roll back.

    mltr promote --name mltr-coco --data s3://bucket/datasets/coco [--alias challenger | --version 7]
                 [--split val] [--min-gain 0.0] [--force]
    mltr promote --name mltr-coco --rollback

Both the candidate and the current champion are scored from their registered models on the same
split (never from logged metrics); the decision is on the mAP difference, with a 95% paired
bootstrap interval over images. ``champion`` moves only when the candidate is better by at least
``--min-gain`` (a tie does not promote unless ``--min-gain`` is negative; ``--force`` promotes anyway); the displaced champion becomes ``previous-champion``. The
decision, both scores and the interval are tags on both versions. With no champion yet the
candidate becomes champion once it is scored (its classes checked against the dataset's).
``challenger`` leaves a version that becomes champion, if it still points there. ``--rollback``
swaps ``champion`` and ``previous-champion``. Every alias move happens under the model's
promotion lease (renewed while held, checked before each move) and is read back. Ends with one
JSON line.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs._config import check_at_least, component, opt, parse_config
from jobs._models import TrackingArgs, check_classes, load_predictor, score_split
from jobs._runtime import run_job, setup_logging
from mltr import registry
from mltr.errors import ConfigError
from mltr.metrics import mean_average_precision
from pipeline.dataset import load_manifest

log = logging.getLogger("jobs.promote")

# Tags of a decision: on the candidate under PROMOTION (its decision: promoted, refused, forced,
# first-champion, restored, rolled-back), on the champion it was judged against under CHALLENGE
# (the same figures, from the defender's side). A champion's own decision tag is never
# overwritten by a challenge it survived.
PROMOTION, CHALLENGE = "mltr.promotion.", "mltr.challenge."
DECISION_TAG = PROMOTION + "decision"


@dataclass(frozen=True)
class PromoteConfig:
    """Which version to promote, judged on which data, by how much it must win."""

    name: str | None = opt(None, "registered model name")
    version: int | None = opt(None, "the candidate version (default: the --alias version)")
    alias: str = opt(registry.CHALLENGER, "the candidate's alias, when no --version is given")
    data: str | None = opt(None, "a converted dataset: both models are scored on its --split")
    split: str = opt("val", "the split both models are scored on")
    min_gain: float = opt(
        0.0, "the least mAP difference (candidate - champion) that promotes; a tie promotes only if negative"
    )
    force: bool = opt(False, "promote whatever the difference (recorded as forced)")
    rollback: bool = opt(False, "swap champion and previous-champion back")
    resamples: int = opt(1000, "bootstrap resamples of the images")
    batch_size: int = opt(32, "images per forward pass")
    lease_settle_s: float = opt(2.0, "promotion lease: seconds a taker waits before reading itself back")
    lease_ttl_s: float = opt(900.0, "promotion lease: seconds after which a holder's lease is stale")
    tracking: TrackingArgs = component(TrackingArgs)

    def __post_init__(self):
        check_at_least(self, 1, "batch_size")
        check_at_least(self, 20, "resamples")  # fewer draws give no 95% interval
        check_at_least(self, 0, "lease_settle_s")
        if self.lease_ttl_s <= self.lease_settle_s:  # it would go stale while its taker settles
            raise ConfigError(
                f"--lease-ttl-s must be more than --lease-settle-s ({self.lease_settle_s:g}), got {self.lease_ttl_s:g}"
            )


def _record(client: MlflowClient, name: str, version: str, prefix: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, prefix + key, value)


def rollback(client: MlflowClient, config: PromoteConfig, lease: registry.PromotionLease) -> dict:
    current = registry.aliases(client, config.name)
    champion, previous = current.get(registry.CHAMPION), current.get(registry.PREVIOUS)
    if previous is None or champion is None:
        raise registry.RegistryError(
            f"{config.name!r} has no champion and previous-champion to swap: {current}"
        )
    after = registry.move_aliases(
        client, config.name, {registry.CHAMPION: previous, registry.PREVIOUS: champion}, lease
    )
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = {"at": stamp, "lease": lease.holder["id"]}
    _record(client, config.name, previous, PROMOTION, {**base, "decision": "restored", "champion": champion})
    _record(
        client, config.name, champion, PROMOTION, {**base, "decision": "rolled-back", "champion": previous}
    )
    return {
        "name": config.name,
        "decision": "rolled-back",
        "champion": previous,
        "previous_champion": champion,
        "aliases": after,
    }


def _champion_moves(client: MlflowClient, name: str, candidate: str, champion: str | None) -> dict:
    """The alias moves that make ``candidate`` the champion. ``challenger`` goes too when it still
    points at the candidate, read now: a version registered while the models were scored took
    ``challenger`` (registering takes no lease) and keeps it, to be judged in its turn."""
    moves: dict[str, str | None] = {registry.CHAMPION: candidate}
    if champion is not None:
        moves[registry.PREVIOUS] = champion
    if registry.aliases(client, name).get(registry.CHALLENGER) == candidate:
        moves[registry.CHALLENGER] = None
    return moves


def better(gain: float, min_gain: float) -> bool:
    """Whether a candidate ``gain`` mAP over the champion promotes it: by at least ``min_gain``, and
    strictly better unless ``min_gain`` is negative (a tie, as the same model registered twice,
    moves nothing; a negative ``min_gain`` accepts a candidate up to that much worse)."""
    return gain >= min_gain and (gain > 0 or min_gain < 0)


def trained_on(client: MlflowClient, name: str, roles: list[tuple[str, str]], manifest) -> dict[str, str]:
    """``{ROLE_trained_on: fingerprint}`` of the data each version was trained on (its registered
    tag), with a warning for one trained on other data than it is scored on: its training images
    may be among the ones it is scored on, which would flatter it."""
    found = {}
    for role, version in roles:
        fingerprint = client.get_model_version(name, version).tags.get("dataset_fingerprint", "")
        found[f"{role}_trained_on"] = fingerprint or "unknown"
        if fingerprint != manifest.fingerprint:
            log.warning(
                "%s version %s was trained on %s, not on %s (%s), which it is scored on: make sure "
                "none of its training images is in this split",
                role, version, f"data {fingerprint}" if fingerprint else "unrecorded data",
                manifest.uri, manifest.fingerprint,
            )  # fmt: skip
    return found


def promote(client: MlflowClient, config: PromoteConfig, lease: registry.PromotionLease) -> dict:
    name = config.name
    candidate = registry.resolve_version(
        client, name, config.version, None if config.version else config.alias
    )
    current = registry.aliases(client, name)
    champion = current.get(registry.CHAMPION)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = {"at": stamp, "lease": lease.holder["id"]}
    cand = str(candidate.version)
    if champion == cand:
        raise registry.RegistryError(f"{name!r} version {cand} is already the champion")

    # Even a first champion is scored: it must predict this dataset's classes, on a split the
    # dataset has, and its score goes on record beside the decision.
    manifest = load_manifest(config.data)
    scores = {}
    roles = [("candidate", cand)] + ([("champion", champion)] if champion is not None else [])
    for role, version in roles:
        predictor = load_predictor(f"models:/{name}/{version}", client, batch_size=config.batch_size)
        check_classes(predictor, manifest, f"models:/{name}/{version}")
        logits, targets, ignore = score_split(predictor, manifest, config.split, config.batch_size)
        scores[role] = logits
        log.info("scored %s version %s on %s/%s", role, version, manifest.uri, config.split)
    fingerprints = trained_on(client, name, roles, manifest)
    where = {
        "data": f"{manifest.uri}#{config.split}",
        "dataset_fingerprint": manifest.fingerprint,
        "images": str(len(targets)),
        **fingerprints,
    }
    if champion is None:
        candidate_map, _ = mean_average_precision(scores["candidate"], targets, ignore)
        tags = {
            **base,
            "decision": "first-champion",
            "candidate": cand,
            "candidate_mAP": f"{candidate_map:.6f}",
        }
        lease.check()
        _record(client, name, cand, PROMOTION, {**tags, **where})
        after = registry.move_aliases(client, name, _champion_moves(client, name, cand, None), lease)
        return {
            "name": name,
            "decision": "first-champion",
            "candidate": cand,
            "champion": cand,
            "candidate_mAP": candidate_map,
            "images": len(targets),
            "dataset_fingerprint": manifest.fingerprint,
            **fingerprints,
            "aliases": after,
        }
    comparison = registry.paired_bootstrap(
        scores["candidate"], scores["champion"], targets, ignore, resamples=config.resamples
    )
    wins = better(comparison.gain, config.min_gain)
    decision = "promoted" if wins else ("forced" if config.force else "refused")
    tags = {
        **base,
        "decision": decision,
        "candidate": cand,
        "champion": champion,
        "candidate_mAP": f"{comparison.candidate_mAP:.6f}",
        "champion_mAP": f"{comparison.champion_mAP:.6f}",
        "gain": f"{comparison.gain:.6f}",
        "gain_ci95": f"[{comparison.low:.6f}, {comparison.high:.6f}]",
        "min_gain": f"{config.min_gain:g}",
        **where,
    }
    # The decision is recorded before any alias moves: an alias never points at a version whose
    # recorded decision lost (a crash in between leaves the old champion in place).
    lease.check()
    _record(client, name, cand, PROMOTION, tags)
    _record(client, name, champion, CHALLENGE, tags)
    if decision != "refused":
        after = registry.move_aliases(client, name, _champion_moves(client, name, cand, champion), lease)
    else:
        after = registry.aliases(client, name)
    return {
        "name": name,
        "decision": decision,
        "candidate": cand,
        "champion": after.get(registry.CHAMPION),
        "previous_champion": after.get(registry.PREVIOUS),
        "candidate_mAP": comparison.candidate_mAP,
        "champion_mAP": comparison.champion_mAP,
        "gain": comparison.gain,
        "gain_ci95": [comparison.low, comparison.high],
        "min_gain": config.min_gain,
        "images": comparison.images,
        "dataset_fingerprint": manifest.fingerprint,
        **fingerprints,
        "aliases": after,
    }


def run(config: PromoteConfig) -> dict:
    if not config.name:
        raise ConfigError("--name is required")
    if not config.rollback and not config.data:
        raise ConfigError("--data is required: both models are scored on the same split of it")
    client = config.tracking.client()
    try:
        client.get_registered_model(config.name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise  # the registry could not answer: not a missing model
        raise ConfigError(
            f"no registered model {config.name!r} in {client.tracking_uri}: mltr register first"
        ) from None
    lease = registry.PromotionLease(
        client, config.name, ttl_s=config.lease_ttl_s, settle_s=config.lease_settle_s
    )
    with lease:
        result = rollback(client, config, lease) if config.rollback else promote(client, config, lease)
    line = {"promoted": "promoted", "forced": "promoted (forced)", "refused": "refused"}.get(
        result["decision"], result["decision"]
    )
    if "gain" in result:
        print(
            f"{config.name}: candidate v{result['candidate']} mAP {result['candidate_mAP']:.4f} vs champion "
            f"mAP {result['champion_mAP']:.4f}: gain {result['gain']:+.4f} "
            f"(95% CI {result['gain_ci95'][0]:+.4f} .. {result['gain_ci95'][1]:+.4f}, {result['images']} images) -> {line}",
            flush=True,
        )
    elif "candidate_mAP" in result:
        print(
            f"{config.name}: v{result['candidate']} mAP {result['candidate_mAP']:.4f} ({result['images']} images) "
            f"-> {line}: there was no champion",
            flush=True,
        )
    else:
        print(f"{config.name}: {line}; champion is v{result['champion']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_config(PromoteConfig, argv, prog="mltr promote", job="promote")
    return run_job("promote", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
