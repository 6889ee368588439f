"""Promotion's parts: the paired bootstrap of an mAP difference, and the lease that serialises promotions."""

import re
import threading
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mltr import registry

pytestmark = pytest.mark.unit


def scores_and_targets(n=200, classes=5, noise=1.0, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < 0.3).astype(np.float32)
    return targets + noise * rng.standard_normal((n, classes)), targets


def test_the_gain_of_a_better_model_has_an_interval_above_zero_and_a_tie_is_zero():
    good, targets = scores_and_targets(noise=0.5, seed=1)
    bad = good + 3.0 * np.random.default_rng(2).standard_normal(good.shape)
    better = registry.paired_bootstrap(good, bad, targets, resamples=300)
    assert better.candidate_mAP > better.champion_mAP and better.gain == pytest.approx(
        better.candidate_mAP - better.champion_mAP
    )
    assert 0 < better.low < better.gain < better.high and better.resamples == 300
    worse = registry.paired_bootstrap(bad, good, targets, resamples=300)
    assert worse.high < 0 and worse.gain == pytest.approx(-better.gain)
    tie = registry.paired_bootstrap(good, good.copy(), targets, resamples=50)
    assert tie.gain == 0 and tie.low == 0 and tie.high == 0
    # Ignored entries count for neither model.
    ignore = np.zeros_like(targets, dtype=bool)
    ignore[:, 0] = True
    masked = registry.paired_bootstrap(good, bad, targets, ignore, resamples=20)
    assert masked.candidate_mAP != better.candidate_mAP


@pytest.fixture
def model_name(sqlite_store):
    client = MlflowClient(sqlite_store)
    client.create_registered_model("m")
    return client, "m"


def test_one_holder_at_a_time_and_the_holder_is_recorded(model_name):
    client, name = model_name
    inside, overlaps, holders, errors = [], [], [], []

    def promote(i):
        try:
            with registry.PromotionLease(client, name, settle_s=0.3, wait_s=30) as lease:
                holders.append(client.get_registered_model(name).tags[registry.LEASE_TAG])
                if inside:
                    overlaps.append(i)
                inside.append(i)
                time.sleep(0.2)
                inside.remove(i)
                assert lease.holder is not None
        except Exception as exc:  # a thread's exception would otherwise only be printed
            errors.append(repr(exc))

    threads = [threading.Thread(target=promote, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and overlaps == [] and len(holders) == 4 and len(set(holders)) == 4
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags  # released


def test_a_stale_lease_is_taken_over_and_a_live_one_waited_for(model_name):
    client, name = model_name
    stale = '{"id": "dead", "host": "h", "pid": 1, "since": 0, "expires": 1}'
    client.set_registered_model_tag(name, registry.LEASE_TAG, stale)
    with registry.PromotionLease(client, name, settle_s=0.1, wait_s=5) as lease:
        assert lease.holder["id"] != "dead"
    live = f'{{"id": "other", "host": "h", "pid": 1, "since": 0, "expires": {time.time() + 60}}}'
    client.set_registered_model_tag(name, registry.LEASE_TAG, live)
    with (
        pytest.raises(registry.LeaseBusy, match="holds its lease"),
        registry.PromotionLease(client, name, settle_s=0.1, wait_s=0.5),
    ):
        pass
    assert "other" in client.get_registered_model(name).tags[registry.LEASE_TAG]  # not released by a loser


def test_unknown_versions_and_aliases_say_what_exists(model_name):
    client, name = model_name
    with pytest.raises(registry.RegistryError, match="'m' has no alias @champion; its aliases: none"):
        registry.resolve_version(client, name, alias="champion")
    with pytest.raises(registry.RegistryError, match="no registered model 'x'"):
        registry.resolve_version(client, "x", version=1)


def test_a_held_lease_is_renewed_so_a_long_promotion_is_not_taken_over(model_name):
    client, name = model_name
    with registry.PromotionLease(client, name, ttl_s=0.8, settle_s=0.05) as held:
        # Held three times its ttl (two models scored on a large split): renewed, never stale.
        with (
            pytest.raises(registry.LeaseBusy),
            registry.PromotionLease(client, name, ttl_s=0.8, settle_s=0.05, wait_s=2.4),
        ):
            pass
        held.check()  # still its own: it may move aliases
        assert client.get_registered_model(name).tags[registry.LEASE_TAG].count(held.holder["id"]) == 1
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags


@pytest.mark.parametrize(
    "tag", ["not json", "[]", '{"id": "x", "expires": "2030-01-01"}', '{"expires": 4e9}']
)
def test_a_lease_tag_that_is_not_a_holders_is_taken_as_free(model_name, tag):
    client, name = model_name
    client.set_registered_model_tag(name, registry.LEASE_TAG, tag)
    with registry.PromotionLease(client, name, settle_s=0.05, wait_s=1) as lease:
        lease.check()
    assert registry.LEASE_TAG not in client.get_registered_model(name).tags


def test_a_version_is_tagged_with_the_window_its_network_was_built_with():
    from types import SimpleNamespace

    params = {"model": "mltr_tiny", "window_size": "None", "resolved_window_size": "4", "loss": "asl"}
    run = SimpleNamespace(data=SimpleNamespace(params=params, tags={}, metrics={"val_mAP": 0.5}))
    assert registry.version_tags(run) == {
        "variant": "mltr_tiny",
        "window_size": "4",
        "loss": "asl",
        "val_mAP": "0.500000",
    }


def test_a_lease_interrupted_while_settling_is_withdrawn(model_name, monkeypatch):
    client, name = model_name
    lease = registry.PromotionLease(client, name, settle_s=5)

    def interrupted(seconds):
        assert registry.LEASE_TAG in client.get_registered_model(name).tags  # written, then settling
        raise KeyboardInterrupt

    monkeypatch.setattr(registry.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lease.__enter__()
    assert (
        registry.LEASE_TAG not in client.get_registered_model(name).tags
    )  # the next promotion need not wait


@pytest.mark.parametrize(("ttl_s", "settle_s"), [(2.0, 2.0), (1.0, -1.0), (0.0, 0.0)])
def test_a_lease_that_would_go_stale_while_settling_is_refused(model_name, ttl_s, settle_s):
    client, name = model_name
    with pytest.raises(ValueError, match="settle_s < ttl_s"):
        registry.PromotionLease(client, name, ttl_s=ttl_s, settle_s=settle_s)


@pytest.mark.parametrize(
    ("name", "alias", "says"),
    [
        ("m", "latest", "alias 'latest' cannot be used: 'latest' alias name (case insensitive) is reserved"),
        ("m", "v3", "alias 'v3' cannot be used: Version alias name 'v3' is reserved"),
        ("m", "bad alias!", "alias 'bad alias!' cannot be used: Invalid alias name"),
        ("a/b", "champion", "registered model name 'a/b' cannot be used"),
        ("", "champion", "registered model name '' cannot be used"),
    ],
)
def test_a_name_or_alias_mlflow_refuses_is_refused_before_a_version_is_created(
    sqlite_store, name, alias, says
):
    client = MlflowClient(sqlite_store)
    with pytest.raises(registry.RegistryError, match=re.escape(says)):
        registry.register_run(client, "no-such-run", name, alias=alias)  # refused before the run is read
    assert client.search_model_versions() == []
