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
    stopped = record("s", 0.3, status=STOPPED, val=math.nan, window=2, loss="asl", model=False)
    rows = list(csv.DictReader(io.StringIO(table_csv([*records, stopped]))))
    assert [r["trial_id"] for r in rows] == ["b", "a", "s"]
    assert rows[2]["val_mAP"] == "" == rows[2]["model_uri"]  # missing figures are empty, NaN or None
    assert rows[0]["model_uri"] == "models:/m-b" and float(rows[1]["calib_mAP"]) == 0.4
    lines = table_markdown(records).splitlines()
    assert lines[2].startswith("| 1 | b | 4 | asl |") and lines[3].startswith("| 2 | a | 2 | bce |")
    import matplotlib.axes

    heights, bar = [], matplotlib.axes.Axes.bar

    def recorded_bar(self, x, height, *args, **kwargs):
        heights.append(list(height))
        return bar(self, x, height, *args, **kwargs)

    matplotlib.axes.Axes.bar = recorded_bar
    try:
        plot_by_window_and_loss(records + [record("c", None, status=FAILED)], tmp_path / "plot.png")
    finally:
        matplotlib.axes.Axes.bar = bar
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # calib then val, per loss (asl, bce) over windows (2, 4): a pair with no figure has no bar.
    assert [[None if math.isnan(v) else v for v in h] for h in heights[:2]] == [[None, 0.6], [0.4, None]]


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
        ({"window_sizes": (2, 4, 2)}, "--window-sizes names 2 more than once"),
        ({"losses": ("asl", "bce", "asl")}, "--losses names asl more than once"),
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


def test_a_restored_trial_at_its_last_epoch_is_not_stopped_before_it_logs_its_model():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    epochs = 3  # rungs before the last epoch: max_t = epochs - 1, as the sweep sets it
    kwargs = dict(time_attr="epochs_done", metric="selection_mAP", mode="max", max_t=epochs - 1,
                  grace_period=1, reduction_factor=2, stop_last_trials=False)  # fmt: skip
    for scheduler, expected in ((ASHAScheduler(**kwargs), TrialScheduler.STOP),
                                (tune.LastEpochASHA(**kwargs), TrialScheduler.CONTINUE)):  # fmt: skip
        # After a restore the rungs start empty: one trial, resumed from epoch 1, reports epoch 2;
        # another, resumed from epoch 2, reports its last epoch, lower.
        resumed, last = SimpleNamespace(trial_id="resumed"), SimpleNamespace(trial_id="last")
        for trial in (resumed, last):
            scheduler.on_trial_add(None, trial)
        scheduler.on_trial_result(None, resumed, {"epochs_done": 2, "selection_mAP": 0.70})
        assert scheduler.on_trial_result(None, last, {"epochs_done": 3, "selection_mAP": 0.65}) == expected


def test_a_failed_trial_is_not_scored_and_a_history_of_nans_is_no_figure(monkeypatch):
    import types

    import pandas as pd
    import ray.tune

    configs = {
        t: {"window_size": 2, "loss": "asl", "lr": lr}
        for t, lr in (("diverged", 1e-2), ("nan", 1e-3), ("ok", 1e-4))
    }
    statuses = {"diverged": "ERROR", "nan": "TERMINATED", "ok": "TERMINATED"}

    class Analysis:
        def __init__(self, path, storage_filesystem=None):
            self.trials = [
                types.SimpleNamespace(trial_id=t, status=s, config=configs[t]) for t, s in statuses.items()
            ]

    def result(trial_id, history, error=None):
        frame = pd.DataFrame(history)
        return types.SimpleNamespace(path=f"/sweep/{trial_id}", config=configs[trial_id], metrics=history[-1],
                                     metrics_dataframe=frame, error=error)  # fmt: skip

    ok_run = types.SimpleNamespace(
        info=types.SimpleNamespace(run_id="run-ok", status="FINISHED"),
        data=types.SimpleNamespace(metrics={"calib_mAP": 0.5, "val_mAP": 0.55, "epochs_done": 2},
                                   tags={tune.TRIAL_TAG: "ok", "mltr.model_uri": "models:/m-ok"}),
    )  # fmt: skip
    monkeypatch.setattr(ray.tune, "ExperimentAnalysis", Analysis)
    monkeypatch.setattr(tune, "_child_runs", lambda client, parent: [ok_run])
    results = [
        result("diverged", [{"epochs_done": 1, "selection_mAP": 0.72, "val_selected_mAP": 0.74}],
               error=RuntimeError("TrainingDiverged: the training loss is nan")),
        result("nan", [{"epochs_done": 1, "selection_mAP": math.nan, "val_selected_mAP": math.nan}]),
        result("ok", [{"epochs_done": 2, "selection_mAP": 0.5, "val_selected_mAP": 0.55}]),
    ]  # fmt: skip
    records = {r.trial_id: r for r in tune._records(results, "/sweep", None, None, "parent")}
    assert records["diverged"].status == FAILED and records["diverged"].calib_mAP is None
    assert records["nan"].status == STOPPED and records["nan"].calib_mAP is None
    assert [r.trial_id for r in rank(records.values())][0] == "ok" == best(records.values()).trial_id


def test_a_sweep_sizes_its_local_ray_and_checks_its_windows_with_its_own_trial_flags(capsys):
    from types import SimpleNamespace

    config = sweep_config(num_workers=1, workers_per_trial=2)
    assert tune.trial_train(config).scaling.num_workers == 2
    assert tune.local_cpus(config) >= math.ceil(tune.trial_cpus(tune.trial_train(config)))
    # A preset's window that does not fit the image size is not checked when the sweep sets its own.
    coco = parse_config(
        tune.SweepConfig,
        ["--config", "coco", "--data", "x", "--image-size", "256", "--window-sizes", "8,16"], job="tune",
    )  # fmt: skip
    assert tune.trial_train(coco).model.resolve(80).window_size == 8

    progress = tune.Progress(total=2, epochs=2)
    trial = SimpleNamespace(trial_id="a", config={"window_size": 2, "loss": "asl", "lr": 1e-3})
    progress.on_trial_result(0, [], trial, {tune.SELECTION_METRIC: math.nan, "epochs_done": 1})
    progress.on_trial_result(0, [], trial, {tune.SELECTION_METRIC: 0.8, "epochs_done": 2})
    assert "best so far 0.8000 (a)" in capsys.readouterr().out.splitlines()[-1]


def test_a_sweep_with_trials_to_resume_but_no_parent_run_here_is_refused(sqlite_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_store)
    here, elsewhere = client.create_experiment("mltr"), client.create_experiment("other")
    client.create_run(here, tags={tune.SWEEP_TAG: "grid"})
    tune.check_restorable(client, here, "grid", True, "/runs/grid", "experiment 'mltr'")  # its parent is here
    tune.check_restorable(client, elsewhere, "grid", False, "/runs/grid", "experiment 'other'")  # a new sweep
    with pytest.raises(
        ConfigError, match="sweep 'grid' has its trials' state in /runs/grid but no MLflow parent"
    ):
        tune.check_restorable(client, elsewhere, "grid", True, "/runs/grid", "experiment 'other'")


def test_a_restarted_sweep_runs_as_many_trials_at_once_as_it_started_with_and_says_so(sqlite_store, caplog):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_store)
    parent = client.create_run(client.create_experiment("mltr"), tags={tune.SWEEP_TAG: "grid"}).info.run_id
    assert tune._trials_at_once(client, parent, "grid", 2, restoring=False) == 2  # the first attempt
    with caplog.at_level("WARNING", logger=tune.log.name):
        assert tune._trials_at_once(client, parent, "grid", 2, restoring=True) == 2
        assert not [r for r in caplog.records if r.name == tune.log.name]
        # Ray Tune restores the TuneConfig the sweep started with: a new figure is not used, and
        # the user is told which one is.
        assert tune._trials_at_once(client, parent, "grid", 3, restoring=True) == 2
    assert "resumes with the 2 trials at once it started with" in caplog.text and "not 3" in caplog.text


def test_a_restored_trial_whose_run_already_finished_is_not_trained_again(
    tmp_path, sqlite_store, monkeypatch
):
    import types

    import ray.tune
    from mlflow.tracking import MlflowClient

    from jobs import train as train_job
    from jobs._config import from_flat
    from mltr.tracking import NAME_TAG

    uri = sqlite_store
    client = MlflowClient(uri)
    experiment = client.create_experiment("mltr")
    config = from_flat(train_job.TrainConfig, {"data": str(tmp_path / "ds"), "experiment": "mltr"})
    resolved = train_job.Resolved(config, types.SimpleNamespace(num_classes=80), None, None, 0.0, uri)
    ctx = tune.TrialContext(resolved, "grid", "parent", str(tmp_path))
    monkeypatch.setattr(ray.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t1"))

    class Trained(Exception):
        pass

    def start(*args, **kwargs):
        raise Trained

    monkeypatch.setattr(train_job, "start", start)
    params = {"window_size": 4, "loss": "asl", "lr": 1e-3}
    run = client.create_run(experiment, tags={NAME_TAG: "grid-t1"}).info.run_id
    with pytest.raises(Trained):  # its run is still open: the trial trains (resumes)
        tune.run_trial(params, ctx)
    client.set_tag(run, "mltr.model_uri", "models:/m-1")
    client.set_terminated(run, "FINISHED")
    assert tune.run_trial(params, ctx) is None  # closed with its model before the Ctrl-C: done
    client.create_run(experiment, tags={NAME_TAG: "grid-t2"})
    monkeypatch.setattr(ray.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t2"))
    with pytest.raises(Trained):  # another trial's finished run is not this one's
        tune.run_trial(params, ctx)
