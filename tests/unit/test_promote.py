"""`mltr promote`'s decisions and alias moves on a registry, with the models' scores stubbed.

The registry is a real (embedded) MLflow; what is stubbed is loading a version and scoring it on
a split, which the integration test does with real models: here each version's logits are fixed,
so that what is tested is which aliases move, when, and what is recorded.
"""

import types

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from jobs import promote
from jobs._config import parse_config
from mltr import registry
from mltr.errors import ConfigError

pytestmark = pytest.mark.unit

CLASSES = ("a", "b", "c")
TARGETS = np.random.default_rng(0).random((120, 3)) < 0.4


def logits(noise: float, seed: int) -> np.ndarray:
    return TARGETS + noise * np.random.default_rng(seed).standard_normal(TARGETS.shape)


class Registry:
    """An embedded registry ``m`` whose versions score fixed logits on a stub dataset."""

    def __init__(self, tmp_path, uri, monkeypatch):
        self.uri, self.tmp = uri, tmp_path
        self.client = MlflowClient(self.uri)
        self.client.create_registered_model("m")
        self.scores: dict[str, np.ndarray] = {}
        self.classes: dict[str, tuple] = {}
        self.on_score = None
        manifest = types.SimpleNamespace(
            uri="file:///data/coco", fingerprint="sha256:x", classes=CLASSES, num_classes=len(CLASSES)
        )
        monkeypatch.setattr(promote, "load_manifest", lambda uri: manifest)
        monkeypatch.setattr(promote, "load_predictor", self.load_predictor)
        monkeypatch.setattr(promote, "score_split", self.score_split)

    def add(self, noise: float, classes=CLASSES, trained_on="sha256:x") -> str:
        tags = {"dataset_fingerprint": trained_on} if trained_on else None
        version = self.client.create_model_version("m", source=str(self.tmp / "model"), tags=tags).version
        self.scores[str(version)], self.classes[str(version)] = logits(noise, int(version)), classes
        return str(version)

    def load_predictor(self, uri, client, batch_size=32):
        version = uri.rsplit("/", 1)[-1]
        return types.SimpleNamespace(
            version=version, info=types.SimpleNamespace(classes=self.classes[version])
        )

    def score_split(self, predictor, manifest, split, batch_size=32):
        if self.on_score:
            self.on_score(predictor.version)
        return self.scores[predictor.version], TARGETS.astype(np.float32), np.zeros_like(TARGETS)

    def promote(self, *args):
        flags = ["--name", "m", "--data", "/data/coco", "--resamples", "50", "--lease-settle-s", "0.05"]
        flags += ["--mlflow-uri", self.uri, *args]
        return promote.run(parse_config(promote.PromoteConfig, flags))

    def aliases(self):
        return registry.aliases(self.client, "m")


@pytest.fixture
def models(tmp_path, sqlite_store, monkeypatch):
    return Registry(tmp_path, sqlite_store, monkeypatch)


def test_a_first_champion_is_scored_on_the_data_and_consumes_its_challenger_alias(models):
    other = models.add(0.5, classes=("x", "y", "z"))
    models.client.set_registered_model_alias("m", "challenger", other)
    with pytest.raises(ConfigError, match="trained on other data"):  # no champion yet, still checked
        models.promote()
    assert models.aliases() == {"challenger": other}

    first = models.add(0.5)
    models.client.set_registered_model_alias("m", "challenger", first)
    result = models.promote()
    assert result["decision"] == "first-champion" and result["candidate_mAP"] > 0.5
    # It is the champion; challenger no longer points at it (a second promote would refuse it).
    assert models.aliases() == {"champion": first}
    tags = models.client.get_model_version("m", first).tags
    assert tags["mltr.promotion.candidate_mAP"] == f"{result['candidate_mAP']:.6f}"
    assert tags["mltr.promotion.data"] == "file:///data/coco#val"


def test_a_version_registered_while_the_models_are_scored_keeps_its_challenger_alias(models):
    champion, candidate = models.add(2.0), models.add(0.5)
    models.client.set_registered_model_alias("m", "champion", champion)
    models.client.set_registered_model_alias("m", "challenger", candidate)
    registered = []

    def register_meanwhile(version):  # `mltr register` while the champion is scored
        if version == champion and not registered:
            registered.append(models.add(0.1))
            models.client.set_registered_model_alias("m", "challenger", registered[0])

    models.on_score = register_meanwhile
    result = models.promote()
    assert result["decision"] == "promoted"
    assert models.aliases() == {
        "champion": candidate, "previous-champion": champion, "challenger": registered[0],
    }  # fmt: skip


def test_a_promotion_whose_lease_was_taken_over_moves_no_alias(models):
    champion, candidate = models.add(2.0), models.add(0.5)
    models.client.set_registered_model_alias("m", "champion", champion)
    models.client.set_registered_model_alias("m", "challenger", candidate)

    def taken_over(version):  # its renewals failed until the lease went stale and another took it
        if version == champion:
            models.client.set_registered_model_tag(
                "m", registry.LEASE_TAG, '{"id": "other", "host": "h", "pid": 1, "since": 0, "expires": 4e9}'
            )

    models.on_score = taken_over
    with pytest.raises(registry.LeaseLost, match="held by another promotion|not ours any more"):
        models.promote()
    assert models.aliases() == {"champion": champion, "challenger": candidate}
    assert "mltr.promotion.decision" not in models.client.get_model_version("m", candidate).tags


def test_a_version_trained_on_other_data_than_it_is_scored_on_is_flagged(models, caplog):
    champion, candidate = models.add(2.0, trained_on="sha256:older"), models.add(0.5)
    models.client.set_registered_model_alias("m", "champion", champion)
    models.client.set_registered_model_alias("m", "challenger", candidate)
    result = models.promote()
    assert result["candidate_trained_on"] == "sha256:x" and result["champion_trained_on"] == "sha256:older"
    tags = models.client.get_model_version("m", candidate).tags
    assert tags["mltr.promotion.champion_trained_on"] == "sha256:older"
    assert tags["mltr.promotion.dataset_fingerprint"] == "sha256:x"
    (warning,) = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert warning.startswith(f"champion version {champion} was trained on data sha256:older")

    unrecorded = models.add(0.1, trained_on=None)
    models.client.set_registered_model_alias("m", "challenger", unrecorded)
    caplog.clear()
    assert models.promote()["candidate_trained_on"] == "unknown"
    assert any("unrecorded data" in r.getMessage() for r in caplog.records)


def test_the_same_model_registered_again_ties_and_does_not_displace_the_champion(models):
    champion = models.add(0.5)
    again = models.add(0.5)
    models.scores[again] = models.scores[champion]  # the same network: the same scores
    models.client.set_registered_model_alias("m", "champion", champion)
    models.client.set_registered_model_alias("m", "challenger", again)
    result = models.promote()
    assert result["gain"] == 0 and result["decision"] == "refused"
    assert models.aliases() == {"champion": champion, "challenger": again}
    # A negative --min-gain accepts a candidate up to that much worse, a tie included.
    assert models.promote("--min-gain", "-0.01")["decision"] == "promoted"
    assert models.aliases() == {"champion": again, "previous-champion": champion}


def test_a_name_the_registry_does_not_hold_is_named(models):
    flags = ["--name", "absent", "--data", "/data/coco", "--mlflow-uri", models.uri]
    with pytest.raises(ConfigError, match="no registered model 'absent' in sqlite:.*: mltr register first"):
        promote.run(parse_config(promote.PromoteConfig, flags))
