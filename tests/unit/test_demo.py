import io
import time

import pytest

from jobs.demo import Terminal, progress

pytestmark = pytest.mark.unit


def test_the_progress_bar_in_a_log_file_is_redrawn_only_when_the_count_moves():
    stream = io.StringIO()  # not a terminal: each redraw is one more "line" of a log
    epochs = [0]

    with progress(Terminal(stream), "train", 3, lambda: epochs[0]):
        time.sleep(2.5)  # two polls (once a second) at 0 epochs
        epochs[0] = 1
        time.sleep(2.5)  # two at 1
        epochs[0] = 3
    draws = [d.split("|")[0].strip() for d in stream.getvalue().split("\r") if d.strip()]
    # Drawn when opened, once at 1 epoch (not once a poll), and at 3 when it closes.
    assert draws == ["train:   0%", "train:  33%", "train: 100%"], stream.getvalue()


def test_the_sweep_bar_counts_a_trial_asha_stopped_as_done(tmp_path, sqlite_store):
    from mlflow.tracking import MlflowClient

    from jobs.demo import sweep_epochs
    from jobs.tune import STOPPED_EARLY_TAG, SWEEP_TAG
    from mltr.tracking import EPOCH_KEY

    client = MlflowClient(sqlite_store)
    experiment = client.create_experiment("mltr", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment, tags={SWEEP_TAG: "sweep"}).info.run_id
    epochs = {"finished": 3, "stopped": 1, "running": 2}
    children = {}
    for name, logged in epochs.items():
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
        for epoch in range(logged):
            client.log_metric(child, EPOCH_KEY, epoch, step=epoch)
        children[name] = child

    assert sweep_epochs(client, "mltr", "sweep", per_trial=3) == 6  # while the sweep runs: what is logged
    client.set_tag(children["stopped"], STOPPED_EARLY_TAG, "true")  # the sweep closes ASHA's trial
    assert sweep_epochs(client, "mltr", "sweep", per_trial=3) == 8  # its two skipped epochs are done
    assert sweep_epochs(client, "mltr", "another sweep", per_trial=3) == 0


def test_the_demo_reuses_its_generated_dataset_only_if_generated_with_the_same_settings(tmp_path):
    from jobs.demo import DemoConfig, generate_source, generated_as, generation

    source = tmp_path / "coco2014"
    small = DemoConfig(images=16, classes=3, seed=1)
    assert generated_as(source) is None
    generate_source(small, source)
    before = len(list(source.rglob("*.jpg")))
    assert generated_as(source) == generation(small) == {"images": 16, "classes": 3, "seed": 1}
    larger = DemoConfig(images=20, classes=3, seed=1)
    assert generated_as(source) != generation(larger)  # so the demo generates it again
    (source / "left-over.txt").write_text("from the earlier generation")
    generate_source(larger, source)
    assert generated_as(source) == generation(larger) and not (source / "left-over.txt").exists()
    assert len(list(source.rglob("*.jpg"))) > before
