"""Pieces of the training loop as pure functions (no Ray)."""

import math
import pickle
import warnings

import numpy as np
import pytest
import ray.train
import torch
from sklearn.metrics import precision_recall_curve

from mltr.config import ModelArgs, OptimConfig, ScalingArgs
from mltr.errors import MltrError, TrainingDiverged
from mltr.losses import build_loss
from mltr.model import IMAGENET_MEAN, IMAGENET_STD, MlTrConfig, create_model, normalize
from mltr.train import (
    accumulation,
    any_rank_diverged,
    diverged,
    epoch_batches,
    forward_backward,
    label_frequency_baseline,
    make_ema,
    make_scheduler,
    micro_pr_curve,
    optimizer_step,
    optimizer_steps,
    param_groups,
    restore_optimizer,
    restore_schedule,
)
from mltr.trainer import fit

pytestmark = pytest.mark.unit


def test_label_frequency_baseline_is_the_val_prevalence():
    train = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
    val = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    ignore = np.zeros_like(val, dtype=bool)
    # Every image gets the same scores: each class's AP is its share of positives in val.
    assert label_frequency_baseline(train, val, ignore) == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


def test_micro_pr_curve_matches_sklearn_and_skips_ignored():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(50, 4)))
    targets = torch.from_numpy(rng.random((50, 4)) < 0.3)
    ignore = torch.zeros(50, 4, dtype=torch.bool)
    ignore[:5, 0] = True
    recall, precision = micro_pr_curve(logits, targets, ignore, points=10_000)
    keep = ~ignore.numpy()
    ref_p, ref_r, _ = precision_recall_curve(targets.numpy()[keep], logits.numpy()[keep])
    # Same curve: every (recall, precision) point of ours lies on sklearn's (no ties in random scores).
    ours = set(zip(np.round(recall, 9), np.round(precision, 9), strict=True))
    theirs = set(zip(np.round(ref_r, 9), np.round(ref_p, 9), strict=True))
    assert ours <= theirs and len(recall) == keep.sum()  # one point per non-ignored entry


@pytest.mark.parametrize(("rows", "world", "batch"), [(100, 2, 16), (450, 2, 16), (64, 1, 64), (1000, 8, 32)])
def test_epochs_cut_from_a_stream_take_what_each_worker_holds(rows, world, batch):
    epochs = 7
    per_epoch = [epoch_batches(rows, world, batch, e) for e in range(epochs)]
    # Equal steps on every worker; never more rows than the equal split gives each of them
    # (floor(epochs * rows / world)); less than one batch of it left over.
    held = epochs * rows // world
    assert sum(per_epoch) * batch <= held < (sum(per_epoch) + 1) * batch
    # Every epoch is a whole epoch's worth, to within one batch.
    assert all(abs(n * world * batch - rows) < world * batch for n in per_epoch)


def test_a_stream_smaller_than_one_batch_per_worker_is_refused():
    with pytest.raises(ValueError, match="cannot fill one batch of 16 on each of 4 workers"):
        epoch_batches(63, 4, 16, 0)


@pytest.mark.parametrize(
    ("rows", "world", "batch", "accumulate", "epochs", "expected"),
    # 100 rows, 2 x 16: 3 batches per epoch (3.125), a 4th every 8th epoch.
    [
        (100, 2, 16, 1, 2, 6),
        (100, 2, 16, 2, 2, 4),
        (100, 2, 16, 1, 8, 25),
        (1000, 8, 32, 3, 1, 1),
        (1000, 8, 32, 2, 1, 2),
    ],
)
def test_optimizer_steps_end_every_epoch_with_a_step(rows, world, batch, accumulate, epochs, expected):
    assert optimizer_steps(rows, world, batch, accumulate, epochs) == expected


def test_no_weight_decay_parameters_get_none():
    model = create_model("mltr_tiny", num_classes=5)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    skip = model.no_weight_decay()
    named = dict(model.named_parameters())
    assert {id(p) for p in no_decay["params"]} == {id(named[n]) for n in skip}
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    assert all(p.ndim > 1 for p in decay["params"])


def test_training_components_reject_bad_values_naming_the_flag():
    with pytest.raises(ValueError, match="--epochs must be at least 1"):
        OptimConfig(epochs=0)
    with pytest.raises(ValueError, match="--ema-decay"):
        OptimConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="--warmup"):
        OptimConfig(warmup=1.0)
    with pytest.raises(ValueError, match="--num-workers must be at least 1"):
        ScalingArgs(num_workers=0)


def test_model_arguments_resolve_once_into_the_models_config():
    resolved = ModelArgs(variant="mltr_s", window_size=12, image_size=384, head="query").resolve(20)
    assert isinstance(resolved, MlTrConfig)
    assert (resolved.num_classes, resolved.window_size, resolved.image_size, resolved.head) == (
        20,
        12,
        384,
        "query",
    )
    assert resolved.embed_dim == 96 and resolved.depths == (2, 2, 6, 2)  # the rest is the variant's
    assert ModelArgs().resolve(5) == MlTrConfig(
        **{**create_model("mltr_tiny").config.__dict__, "num_classes": 5}
    )
    with pytest.raises(ValueError, match="unknown model 'mltr_huge'"):
        ModelArgs(variant="mltr_huge").resolve(5)
    with pytest.raises(ValueError, match="window_size=5 does not fit"):
        ModelArgs(window_size=5).resolve(5)


def test_normalize_follows_the_models_input_contract():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    x = images.numpy().astype(np.float64) / 255.0
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.numpy(), (x - mean) / std, rtol=1e-5, atol=1e-5)
    # Another contract's mean and std are the ones applied.
    config = MlTrConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(
        normalize(images, config.mean, config.std).numpy(), (x - 0.5) / 0.25, rtol=1e-5, atol=1e-5
    )
    # Pixels already scaled would be scaled again: refused.
    with pytest.raises(ValueError, match="normalize takes uint8 pixels .0-255., got torch.float32"):
        normalize(images.float() / 255)


def test_normalize_stays_float32_under_autocast():
    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = normalize(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, normalize(images))


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 12, 100])
def test_the_schedule_runs_any_number_of_steps_and_peaks_at_the_learning_rate(total):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)  # as the loop makes it
    scheduler = make_scheduler(optimizer, 0.1, total)
    rates = []
    for _ in range(total + 2):  # steps past the end are not taken
        rates.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)
    assert 0.05 < max(rates) <= 0.1 + 1e-9
    if total >= 3:  # OneCycle: warm up from below the peak, end far below it
        assert rates[0] < 0.05 and rates[total - 1] < 1e-3


def test_the_ema_follows_its_closed_form():
    decay = 0.9
    model = torch.nn.Linear(2, 1, bias=False)
    ema = make_ema(model, decay)
    values = [torch.tensor([[float(k), -2.0 * k]]) for k in range(1, 6)]
    for value in values:
        with torch.no_grad():
            model.weight.copy_(value)
        ema.update_parameters(model)
    # The first update copies the weights; each later one moves decay of the way: e_k = d e_(k-1) + (1 - d) w_k.
    expected = decay ** (len(values) - 1) * values[0] + sum(
        (1 - decay) * decay ** (len(values) - 1 - k) * values[k] for k in range(1, len(values))
    )
    torch.testing.assert_close(ema.module.weight, expected)


@pytest.mark.parametrize("decay", [0.998, 0.9999, 0.9995, 0.9])
def test_the_ema_of_an_unchanging_model_is_that_model_whatever_the_decay(decay):
    # Integer buffers (relative position indices) are copied, not averaged: averaged in float32,
    # 0.9999 and others truncated entries to v - 1, and the EMA read the wrong position biases.
    torch.manual_seed(0)
    model = create_model("mltr_tiny", num_classes=5).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.normal_()  # so that a wrong index changes the output
    ema = make_ema(model, decay)
    for _ in range(3):
        ema.update_parameters(model)
    for name, buffer in ema.module.named_buffers():
        assert torch.equal(buffer, model.get_buffer(name)), name
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ema.module.eval()(x), model(x))


def batch_of(images: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image": images, "targets": targets, "ignore_mask": torch.zeros_like(targets, dtype=torch.bool)}


def test_accumulating_two_micro_batches_is_one_step_on_the_doubled_batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(8, 5, generator=generator) < 0.3).float()
    criterion = build_loss("asl")

    def gradients(micro_batches: list[slice]) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        # The patch stem: BatchNorm would see different batch statistics in halves of the batch.
        model = create_model("mltr_tiny", num_classes=5, stem="patch", stem_widths=())
        for part in micro_batches:
            batch = batch_of(images[part], targets[part])
            forward_backward(model, criterion, batch, torch.device("cpu"), len(micro_batches))
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    # What the optimiser step sees: the accumulated gradient is the doubled batch's.
    whole, halves = gradients([slice(0, 8)]), gradients([slice(0, 4), slice(4, 8)])
    assert whole.keys() == halves.keys()
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(("batches", "accumulate"), [(15, 4), (16, 4), (3, 4), (7, 1), (1, 3)])
def test_an_epochs_last_step_averages_the_micro_batches_it_has(batches, accumulate):
    plan = [accumulation(i, batches, accumulate) for i in range(batches)]
    ends = [i for i, (_, step) in enumerate(plan) if step]
    assert ends[-1] == batches - 1 and len(ends) == math.ceil(batches / accumulate)  # the scheduler's count
    start = 0
    for end in ends:  # each step divides its losses by the micro-batches it gathers, the last one too
        assert {size for size, _ in plan[start : end + 1]} == {end + 1 - start}
        start = end + 1
    # 15 batches of 4: three steps of 4 and a last of 3, whose losses are divided by 3, not 4.
    if (batches, accumulate) == (15, 4):
        assert [size for size, step in plan if step] == [4, 4, 4, 3]


def test_a_loss_that_is_not_a_number_stops_training_with_an_error_the_user_fixes():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    batch = batch_of(images, (torch.rand(4, 5, generator=generator) < 0.3).float())
    model, criterion = create_model("mltr_tiny", num_classes=5), build_loss("asl")
    cpu = torch.device("cpu")
    loss = forward_backward(model, criterion, batch, cpu, 1)
    assert math.isfinite(loss) and not any_rank_diverged(math.isfinite(loss), cpu)
    # A learning rate far too large: the step leaves weights that are not numbers.
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=math.inf), None, None, grad_clip=0)
    loss = forward_backward(model, criterion, batch, cpu, 1)
    assert math.isnan(loss) and any_rank_diverged(math.isfinite(loss), cpu)  # one worker: its own loss
    error = diverged(epoch=2, epochs=5, batch=6, lr=0.25, loss=loss)
    assert str(error) == (
        "epoch 3 of 5, batch 7, lr 0.25: the training loss is nan: training diverged; "
        "lower --lr, or pass --grad-clip"
    )
    assert isinstance(error, MltrError)  # a job prints it as one line, exit status 2
    # It reaches the driver pickled, as Ray sends a worker's return value: same type, same line.
    sent = pickle.loads(pickle.dumps(error))
    assert type(sent) is TrainingDiverged and str(sent) == str(error)


class Finished:
    """A trainer whose workers finished: ``fit`` returns what Ray Train returns for them."""

    def __init__(self, return_value):
        self.result = ray.train.Result(
            metrics={"epoch": 0}, checkpoint=None, error=None, path="/runs/r", return_value=return_value
        )

    def fit(self):
        return self.result


def test_fit_raises_the_divergence_the_workers_returned_and_returns_any_other_result():
    returned = TrainingDiverged("epoch 1 of 2, batch 3, lr 4: the training loss is nan")
    with pytest.raises(TrainingDiverged) as info:
        fit(Finished(returned))
    assert info.value is returned
    trainer = Finished(None)
    assert fit(trainer) is trainer.result


def test_clipping_bounds_the_gradient_norm_of_the_step():
    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    (1000 * model(torch.ones(2, 4)).sum()).backward()
    raw = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert raw > 10
    # Plain SGD at rate 1: the step is minus the (clipped) gradient.
    optimizer_step(model, torch.optim.SGD(model.parameters(), lr=1.0), None, None, grad_clip=0.5)
    step = torch.sqrt(
        sum((p.detach() - b).pow(2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert step == pytest.approx(0.5, rel=1e-4)


def test_a_restored_schedule_continues_where_it_stopped():
    def rates(restore_at: int | None, total: int = 12) -> list[float]:
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = make_scheduler(optimizer, 0.1, total, warmup=0.25)
        out = []
        for step in range(total):
            if step == restore_at:  # a resume as the loop does it: build both, then load both states
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
                scheduler = make_scheduler(optimizer, 0.1, total, warmup=0.25)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            out.append(optimizer.param_groups[0]["lr"])
            model(torch.ones(1, 2)).sum().backward()
            optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)
        return out

    uninterrupted = rates(None)
    assert rates(5) == pytest.approx(uninterrupted)
    # The peak after a warm-up of 25% of the 12 steps.
    assert max(uninterrupted) == pytest.approx(0.1) and uninterrupted.index(max(uninterrupted)) == 2


@pytest.mark.parametrize("finished_steps", [12, 2], ids=["onecycle", "too-short-for-onecycle"])
def test_an_extended_run_continues_on_its_longer_schedule_at_the_step_reached(finished_steps):
    model = torch.nn.Linear(2, 1)

    def step(optimizer, scheduler):
        model(torch.ones(1, 2)).sum().backward()
        optimizer_step(model, optimizer, scheduler, None, grad_clip=1.0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    # Under 3 steps the run keeps the peak rate (no OneCycle), and its optimizer groups lack OneCycle's keys.
    scheduler = make_scheduler(optimizer, 0.1, finished_steps, warmup=0.25)
    finished = []
    for _ in range(finished_steps):  # the finished run: its last step at the final rate
        finished.append(optimizer.param_groups[0]["lr"])
        step(optimizer, scheduler)
    assert finished[-1] < 1e-5 if finished_steps >= 3 else finished == [0.1, 0.1]
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    # Extended to 16 steps: built for 16, then the checkpoint's states loaded as the loop does.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = make_scheduler(optimizer, 0.1, 16, warmup=0.25)
    restore_optimizer(optimizer, state["optimizer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" and the like
        restore_schedule(scheduler, state["scheduler"], steps_done=finished_steps)
    extended = []
    for _ in range(16 - finished_steps):
        extended.append(optimizer.param_groups[0]["lr"])
        step(optimizer, scheduler)
    assert optimizer.state[model.weight]["step"] == 16  # Adam's moments went on from the checkpoint's

    # The rates of a 16-step schedule from the step reached on, annealing to its end.
    fresh = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    reference = make_scheduler(fresh, 0.1, 16, warmup=0.25)
    expected = []
    for i in range(16):
        if i >= finished_steps:
            expected.append(fresh.param_groups[0]["lr"])
        fresh.step()
        reference.step()
    assert extended == pytest.approx(expected)
    assert extended[-1] < 1e-5  # the longer schedule's own end
    if finished_steps == 12:
        assert extended[0] > 0.01 and extended == sorted(extended, reverse=True)


def test_what_ray_train_unpickles_beside_the_workers_needs_neither_torch_nor_mlflow(tmp_path, monkeypatch):
    import subprocess
    import sys

    import ray.cloudpickle

    import mltr.trainer
    from mltr.train import LoopConfig
    from mltr.trainer import DATASETS, DataPlan, TrainRun, build_trainer

    # What build_trainer hands Ray Train (no Ray here: the datasets are stand-ins).
    monkeypatch.setattr(mltr.trainer, "TorchTrainer", lambda loop, **kwargs: kwargs)
    run = TrainRun(
        name="r",
        model=ModelArgs(variant="mltr_tiny").resolve(num_classes=5),
        optim=OptimConfig(epochs=3, lr=1e-3),
        data=DataPlan(dict.fromkeys(DATASETS), train_rows=8, shuffle_buffer=0),
        scaling=ScalingArgs(num_workers=2),
        storage_path=str(tmp_path),
        mlflow_uri="sqlite:///m.db",
        mlflow_run_id="abc",
        init_from="w.pth",
    )
    sent = build_trainer(run)
    # The workers rebuild the very config the driver resolved.
    assert LoopConfig.from_dict(sent["train_loop_config"]["loop"]) == run.loop_config()
    # Ray Train's DatasetManager (one per run, beside the workers) unpickles the loop and data
    # configs but runs neither: with a LoopConfig there it imported torch and MLflow (855 MB
    # against 240 MB). Ray's own TorchConfig takes torch into the controller anyway.
    payload = ray.cloudpickle.dumps((sent["train_loop_config"], sent["dataset_config"]))
    (tmp_path / "sent.pkl").write_bytes(payload)
    code = (
        "import pickle, sys\n"
        f"pickle.loads(open({str(tmp_path / 'sent.pkl')!r}, 'rb').read())\n"
        "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"]


class CountingShard:
    """A worker's dataset shard: the same batches every execution, counting the executions."""

    def __init__(self, batches):
        self.batches, self.streams = batches, 0

    def iter_torch_batches(self, batch_size, device):
        assert device == "cpu"
        self.streams += 1
        yield from self.batches


def eval_split(batches: int = 3, rows: int = 4) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "image": torch.full((rows, 3, 8, 8), i, dtype=torch.uint8),
            "targets": torch.zeros(rows, 2),
            "ignore_mask": torch.zeros(rows, 2, dtype=torch.bool),
        }
        for i in range(batches)
    ]


def test_evaluation_batches_are_streamed_once_and_kept_while_they_fit_else_streamed_every_epoch():
    from mltr.train import EvalBatches

    split = eval_split()
    size = sum(t.numel() * t.element_size() for batch in split for t in batch.values())
    for limit, streams in ((size, 1), (size - 1, 3)):
        shard = CountingShard(split)
        batches = EvalBatches(shard, 8, torch.device("cpu"), limit_bytes=limit)
        for _ in range(3):  # three epochs: every batch, in order, each time
            assert [int(batch["image"][0, 0, 0, 0]) for batch in batches] == [0, 1, 2]
        assert shard.streams == streams
