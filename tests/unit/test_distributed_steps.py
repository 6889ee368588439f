"""The loop's distributed pieces in two real processes (gloo, no Ray): per-rank RNG across a resume,
no_sync, and stopping together when one rank's loss is not a number."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mltr.losses import build_loss
from mltr.model import create_model
from mltr.train import (
    EvalBatches,
    any_rank_diverged,
    forward_backward,
    gather_rng_states,
    mean_over_ranks,
    optimizer_step,
    param_groups,
    restore_rng_state,
    seed_everything,
)

pytestmark = pytest.mark.unit

WORLD = 2


def draws() -> tuple[list[float], list[float], float]:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), random.random()


def all_reduces(
    model: torch.nn.parallel.DistributedDataParallel, accumulate: int, micro_batches: int
) -> list[int]:
    """The micro-batches (by index) whose backward all-reduced gradients, over ``micro_batches``."""
    calls: set[int] = set()
    current = [0]

    def counting_hook(state, bucket):
        calls.add(current[0])
        future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return future.then(lambda f: f.value()[0] / WORLD)

    model.register_comm_hook(None, counting_hook)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    criterion = build_loss("asl")
    generator = torch.Generator().manual_seed(0)
    for i in range(micro_batches):
        current[0] = i
        batch = {
            "image": torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=generator),
            "targets": (torch.rand(2, 3, generator=generator) < 0.5).float(),
            "ignore_mask": torch.zeros(2, 3, dtype=torch.bool),
        }
        step = (i + 1) % accumulate == 0
        forward_backward(model, criterion, batch, torch.device("cpu"), accumulate, sync=step)
        if step:
            optimizer_step(model, optimizer, None, None, grad_clip=1.0)
    return sorted(calls)


def worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    # Each rank's generators, advanced differently, saved as a checkpoint does; then what it draws next.
    seed_everything(100 + rank)
    draws()
    states = gather_rng_states()
    expected = draws()
    # A resume: every rank starts with the same seed, then restores its own state from the checkpoint.
    seed_everything(0)
    restored = restore_rng_state(states, rank, seed=0)
    after = draws()
    # A resume on more workers than the checkpoint knows: the extra rank is seeded afresh, not a copy.
    seed_everything(0)
    fresh = restore_rng_state(states[:1], rank, seed=0)
    after_fewer = draws()

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        create_model("mltr_tiny", num_classes=3, stem="patch", stem_widths=())
    )
    accumulated = all_reduces(model, accumulate=2, micro_batches=4)
    model = torch.nn.parallel.DistributedDataParallel(
        create_model("mltr_tiny", num_classes=3, stem="patch", stem_widths=())
    )
    every_step = all_reduces(model, accumulate=1, micro_batches=4)
    cpu = torch.device("cpu")
    # Only rank 1's loss went NaN: both ranks stop, at the same step. Neither: both go on.
    one_diverged = any_rank_diverged(finite=rank == 0, device=cpu)
    none_diverged = any_rank_diverged(finite=True, device=cpu)
    # The epoch's training loss: rank 0 summed 2.0 over 4 batches, rank 1 6.0 over 4.
    train_loss = mean_over_ranks(2.0 if rank == 0 else 6.0, 4, cpu)
    # Evaluation batches are kept only if every rank's share fits: rank 1's does not, so both stream.
    from tests.unit.test_train_steps import CountingShard, eval_split

    split = eval_split()
    size = sum(t.numel() * t.element_size() for batch in split for t in batch.values())
    shard = CountingShard(split)
    batches = EvalBatches(shard, 8, cpu, limit_bytes=size if rank == 0 else size - 1)
    epochs = [len(list(batches)) for _ in range(3)]
    results[rank] = {
        "states": len(states),
        "expected": expected,
        "after": after,
        "restored": restored,
        "fresh": fresh,
        "after_fewer": after_fewer,
        "accumulated": accumulated,
        "every_step": every_step,
        "one_diverged": one_diverged,
        "none_diverged": none_diverged,
        "train_loss": train_loss,
        "eval_epochs": epochs,
        "eval_streams": shard.streams,
    }
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        shared = manager.dict()
        init_file = str(tmp_path_factory.mktemp("dist") / "init")
        mp.start_processes(worker, args=(init_file, shared), nprocs=WORLD, join=True, start_method="spawn")
        return dict(shared)


def test_each_rank_resumes_its_own_random_numbers(results):
    assert results[0]["states"] == results[1]["states"] == WORLD  # both ranks' states are in the checkpoint
    for rank in range(WORLD):
        assert results[rank]["restored"] and results[rank]["after"] == results[rank]["expected"]
    # After the resume the ranks do not draw identical numbers (they would with rank 0's state on both).
    assert results[0]["after"] != results[1]["after"]
    # A rank the checkpoint has no state for is seeded afresh: it does not copy rank 0's draws.
    assert results[0]["after_fewer"] == results[0]["expected"]
    assert not results[1]["fresh"] and results[1]["after_fewer"] != results[0]["after_fewer"]


def test_accumulation_skips_the_all_reduce_of_the_micro_batches_before_the_last(results):
    for rank in range(WORLD):
        # 4 micro-batches: with accumulation 2 only the last of each pair all-reduces; without, all four.
        assert results[rank]["accumulated"] == [1, 3]
        assert results[rank]["every_step"] == [0, 1, 2, 3]


def test_a_loss_that_is_not_a_number_on_one_rank_stops_every_rank(results):
    assert [results[rank]["one_diverged"] for rank in range(WORLD)] == [True, True]
    assert [results[rank]["none_diverged"] for rank in range(WORLD)] == [False, False]


def test_the_training_loss_is_every_ranks_mean_on_every_rank(results):
    assert [results[rank]["train_loss"] for rank in range(WORLD)] == [1.0, 1.0]


def test_evaluation_batches_are_kept_only_when_every_ranks_share_fits(results):
    for rank in range(WORLD):
        assert results[rank]["eval_epochs"] == [3, 3, 3]
        assert results[rank]["eval_streams"] == 3  # rank 0's share fits, rank 1's does not: both stream
