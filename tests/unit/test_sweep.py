"""The sweep's pure parts: its flags, how many trials run at once, and how trials are ranked and reported."""

import csv
import io
import math

import pytest

from jobs import tune
from jobs._config import parse_config
from mltr.errors import ConfigError
from mltr.sweep import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    STOPPED,
    TrialRecord,
    best,
    plot_by_window_and_loss,
    rank,
    table_csv,
    table_markdown,
)

pytestmark = pytest.mark.unit


def record(trial_id, calib, status=FINISHED, val=0.5, window=4, loss="asl", model=True):
    return TrialRecord(
        trial_id=trial_id,
        window_size=window,
        loss=loss,
        lr=1e-4,
        status=status,
        epochs=3,
        calib_mAP=calib,
        val_mAP=val,
        mlflow_run_id=f"run-{trial_id}",
        model_uri=f"models:/m-{trial_id}" if model else None,
    )


def test_trials_rank_by_the_calibration_map_and_the_best_is_a_finished_one_with_a_model():
    records = [
        record("a", 0.40, val=0.90),  # the best val mAP does not choose: it is only reported
        record("b", 0.70, status=STOPPED),  # stopped early: no final model
        record("c", None, status=FAILED),
        record("d", 0.55),
        record("e", math.nan),
        record("f", 0.60, model=False),  # finished, but no logged model to ship
    ]
    assert [r.trial_id for r in rank(records)] == ["b", "f", "d", "a", "c", "e"]
    assert best(records).trial_id == "d"
    assert best([record("x", 0.3, status=INTERRUPTED), record("y", None, status=FAILED)]) is None


def test_results_tables_are_ranked_and_complete(tmp_path):
    records = [record("a", 0.4, window=2, loss="bce"), record("b", 0.6, window=4, loss="asl")]
    rows = list(csv.DictReader(io.StringIO(table_csv(records))))
    assert [r["trial_id"] for r in rows] == ["b", "a"]
    assert rows[0]["model_uri"] == "models:/m-b" and float(rows[1]["calib_mAP"]) == 0.4
    lines = table_markdown(records).splitlines()
    assert lines[2].startswith("| 1 | b | 4 | asl |") and lines[3].startswith("| 2 | a | 2 | bce |")
    plot_by_window_and_loss(records + [record("c", None, status=FAILED)], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_flags_parse_like_the_issue_names_them_and_trials_inherit_training_flags():
    config = parse_config(
        tune.SweepConfig,
        ["--config", "tiny", "--window-sizes", "2,4", "--losses", "bce,focal,asl", "--lr-range", "1e-5,1e-3",
         "--num-samples", "3", "--scheduler", "fifo", "--batch-size", "8", "--data", "x"],
        job="tune",
    )  # fmt: skip
    assert config.sweep.window_sizes == (2, 4) and config.sweep.losses == ("bce", "focal", "asl")
    assert config.sweep.lr_range == (1e-5, 1e-3) and config.sweep.num_samples == 3
    assert config.train.model.variant == "mltr_tiny"  # the tune preset extends the training preset
    assert config.train.optim.batch_size == 8


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"losses": ("bce", "hinge")}, "--losses: unknown ['hinge']"),
        ({"lr_range": (1e-3, 1e-5)}, "--lr-range must be low,high"),
        ({"lrs": (1e-3, 0.0)}, "--lrs must be positive"),
        ({"window_sizes": (0,)}, "--window-sizes must be positive"),
        ({"num_samples": 0}, "--num-samples must be at least 1"),
        ({"reduction_factor": 1}, "--reduction-factor must be at least 2"),
    ],
)
def test_bad_sweep_flags_are_refused_with_the_flag_named(flags, message):
    with pytest.raises(ConfigError) as info:
        tune.SweepArgs(**flags)
    assert message in str(info.value)


def sweep_config(**flat):
    from jobs._config import from_flat

    return from_flat(tune.SweepConfig, {"data": "x", "num_workers": 1, "decode_actors": 1, **flat})


def test_trials_at_once_follow_the_cluster_and_a_too_small_cluster_is_refused_with_why():
    config = sweep_config()
    need = tune.trial_cpus(config.train)
    assert need == pytest.approx(1 + 1 + 1 + tune.DRIVER_CPU)  # worker, decode actor, evaluation, driver
    assert tune.concurrency(config, config.train, {"CPU": 4}) == 1
    assert tune.concurrency(config, config.train, {"CPU": 12}) == 3
    assert tune.concurrency(sweep_config(max_concurrent_trials=2), config.train, {"CPU": 12}) == 2
    with pytest.raises(ConfigError) as info:
        tune.concurrency(config, config.train, {"CPU": 2})
    assert "Ray Data's tasks run outside the trial's placement group" in str(info.value)
    gpu = sweep_config(use_gpu=True, gpus_per_worker=0.5, num_workers=2)
    assert tune.concurrency(gpu, gpu.train, {"CPU": 64, "GPU": 2}) == 2
    with pytest.raises(ConfigError, match="a trial needs 1 GPUs, the cluster has 0"):
        tune.concurrency(gpu, gpu.train, {"CPU": 64})


def test_what_a_run_and_a_sweep_ask_an_autoscaler_for_and_what_a_refusal_suggests():
    from jobs import train
    from jobs._runtime import covers

    config = sweep_config(num_workers=2, use_gpu=True, gpus_per_worker=0.5, decode_actors=3)
    bundles = train.run_bundles(config.train)
    assert bundles == [{"CPU": 1.0, "GPU": 0.5}] * 2 + [{"CPU": 1.0}] * 3 + [{"CPU": 1.0}]
    # Without --decode-actors they take what the cluster has left: at least one is asked for.
    assert train.run_bundles(sweep_config(decode_actors=None).train) == [{"CPU": 1.0}] * 3
    assert covers({"CPU": 6, "GPU": 1}, bundles) and not covers({"CPU": 5, "GPU": 1}, bundles)
    assert not covers({"CPU": 64}, bundles)  # no GPU at all
    assert covers({"CPU": 1}, [])
    # A refusal says how to get a bigger cluster: wait for the autoscaler, or that the wait was not enough.
    with pytest.raises(ConfigError, match="on an autoscaling cluster pass --wait-for-resources SECONDS"):
        tune.concurrency(config, config.train, {"CPU": 2})
    waited = sweep_config(wait_for_resources=30)
    with pytest.raises(ConfigError, match="did not add them in --wait-for-resources 30s"):
        tune.concurrency(waited, waited.train, {"CPU": 2})
    with pytest.raises(ConfigError, match="--wait-for-resources must be 0 or more seconds, got -1"):
        sweep_config(wait_for_resources=-1)
