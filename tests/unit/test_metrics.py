"""Metrics against scikit-learn (random and tied scores, ignore masks), streaming, and a 2-process gather."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from mltr.metrics import (
    MetricAccumulator,
    apply_thresholds,
    best_f1_thresholds,
    mean_average_precision,
    precision_recall_f1,
    top_k_predictions,
)

pytestmark = pytest.mark.unit

N, K = 300, 7


def make(seed: int, tied: bool):
    rng = np.random.default_rng(seed)
    scores = (
        rng.integers(-3, 4, size=(N, K)).astype(np.float32)
        if tied
        else rng.normal(size=(N, K)).astype(np.float32)
    )
    targets = rng.random((N, K)) < 0.3
    targets[:, 5] = False  # a class without positives
    ignore = rng.random((N, K)) < 0.2
    ignore[:, 6] = targets[:, 6]  # a class whose positives are all ignored
    return scores, targets, ignore


def sklearn_ap(scores, targets, ignore):
    out = []
    for k in range(K):
        keep = ~ignore[:, k]
        y = targets[keep, k]
        out.append(average_precision_score(y, scores[keep, k]) if y.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("use_ignore", [False, True])
def test_average_precision_matches_sklearn(tied, use_ignore):
    scores, targets, ignore = make(0, tied)
    if not use_ignore:
        ignore = np.zeros_like(ignore)
    mean_ap, per_class = mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets), ignore)
    expected = sklearn_ap(scores, targets, ignore)
    np.testing.assert_allclose(per_class, expected, rtol=1e-10, atol=1e-12)
    assert np.isnan(per_class[5]) and np.isnan(per_class[6]) == use_ignore
    assert mean_ap == pytest.approx(np.nanmean(expected))


def test_average_precision_is_rank_based():
    scores, targets, _ = make(1, tied=False)
    logits = torch.from_numpy(scores) * 4
    assert mean_average_precision(logits, targets)[0] == pytest.approx(
        mean_average_precision(torch.sigmoid(logits), targets)[0]
    )


def sklearn_prf(pred, targets, ignore):
    """CP/CR: sklearn's per-class scores over classes with positives; OP/OR: over all non-ignored entries."""
    per_p, per_r = [], []
    for k in range(K):
        keep = ~ignore[:, k]
        if targets[keep, k].any():
            per_p.append(precision_score(targets[keep, k], pred[keep, k], zero_division=0))
            per_r.append(recall_score(targets[keep, k], pred[keep, k], zero_division=0))
    cp, cr = np.mean(per_p), np.mean(per_r)
    keep = ~ignore
    return {
        "CP": cp,
        "CR": cr,
        "CF1": 2 * cp * cr / (cp + cr),
        "OP": precision_score(targets[keep], pred[keep], zero_division=0),
        "OR": recall_score(targets[keep], pred[keep], zero_division=0),
        "OF1": f1_score(targets[keep], pred[keep], zero_division=0),
    }


@pytest.mark.parametrize("tied", [False, True])
def test_threshold_and_top3_metrics_match_sklearn(tied):
    scores, targets, ignore = make(2, tied)
    logits = torch.from_numpy(scores)
    pred = (1 / (1 + np.exp(-scores.astype(np.float64)))) >= 0.6
    got = precision_recall_f1(apply_thresholds(logits, 0.6), targets, ignore)
    for name, value in sklearn_prf(pred, targets, ignore).items():
        assert got[name] == pytest.approx(value), name

    masked = np.where(ignore, -np.inf, scores)
    top3 = np.zeros_like(targets)
    for i in range(N):
        top3[i, np.argsort(-masked[i], kind="stable")[:3]] = True
    top3 &= ~ignore  # an image with fewer than 3 non-ignored classes predicts only those
    unthresholded = top_k_predictions(logits, 3, ignore, threshold=None)
    valid_per_image = torch.from_numpy(~ignore).sum(1)
    assert torch.equal(unthresholded.sum(1), valid_per_image.clamp(max=3))
    # The published top-3 figures (ML-GCN's overall_topk): of the top 3, those scoring >= 0.5.
    chosen = top_k_predictions(logits, 3, ignore)
    assert torch.equal(chosen, unthresholded & torch.from_numpy(scores >= 0))
    assert 0 < chosen.sum() < unthresholded.sum()
    assert not (chosen & torch.from_numpy(ignore)).any()
    if not tied:  # with ties the top 3 is not unique
        assert torch.equal(unthresholded, torch.from_numpy(top3))
    got = precision_recall_f1(chosen, targets, ignore)
    for name, value in sklearn_prf(chosen.numpy(), targets, ignore).items():
        assert got[name] == pytest.approx(value), name


@pytest.mark.parametrize("tied", [False, True])
def test_best_f1_thresholds_beat_every_candidate(tied):
    scores, targets, ignore = make(3, tied)
    thresholds = best_f1_thresholds(torch.from_numpy(scores), targets, ignore)
    probs = 1 / (1 + np.exp(-scores.astype(np.float64)))
    pred = apply_thresholds(torch.from_numpy(scores), thresholds).numpy()
    for k in range(K):
        keep = ~ignore[:, k]
        y = targets[keep, k]
        if not y.any():
            assert thresholds[k] == 0.5
            continue
        best = max(f1_score(y, probs[keep, k] >= t) for t in np.unique(probs[keep, k]))
        assert f1_score(y, pred[keep, k]) == pytest.approx(best)


def test_best_f1_thresholds_keep_their_predictions_through_a_probability():
    # 400 classes of float32 logits (as the network gives them): applied as logits
    # (apply_thresholds) or as probabilities (the served model), each threshold predicts what it
    # was chosen for. A threshold that is the sigmoid of a score lost that score in about one
    # class in four (logit(sigmoid(x)) > x).
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 400)).astype(np.float32)
    targets = rng.random((60, 400)) < 0.3
    thresholds = best_f1_thresholds(torch.from_numpy(logits), targets)
    as_logits = apply_thresholds(torch.from_numpy(logits), thresholds).numpy()
    as_probabilities = torch.sigmoid(torch.from_numpy(logits)).numpy() >= thresholds

    def f1(predicted, y):  # F1 of each row of bool predictions (R, N) against y (N,)
        tp = (predicted & y).sum(-1)
        return 2 * tp / (predicted.sum(-1) + y.sum())

    for k in range(400):
        y = targets[:, k]
        best = f1(logits[:, k][None, :] >= np.unique(logits[:, k])[:, None], y).max()
        assert f1(as_logits[:, k], y) == best and f1(as_probabilities[:, k], y) == best, k
    # A best cut above logit ~36.7 (sigmoid 1.0 in float64) still predicts.
    saturated = torch.tensor([[40.0], [39.0], [-1.0], [-2.0]], dtype=torch.float64)
    threshold = best_f1_thresholds(saturated, np.array([[1], [1], [0], [0]]))
    assert apply_thresholds(saturated, threshold)[:, 0].tolist() == [True, True, False, False]


def test_accumulator_equals_one_shot():
    scores, targets, ignore = make(4, tied=False)
    acc = MetricAccumulator()
    for start in range(0, N, 64):
        rows = slice(start, start + 64)
        acc.update(
            torch.from_numpy(scores[rows]), torch.from_numpy(targets[rows]), torch.from_numpy(ignore[rows])
        )
    assert len(acc) == N
    result = acc.compute(threshold=0.5, k=3)
    mean_ap, per_class = mean_average_precision(scores, targets, ignore)
    assert result.mAP == pytest.approx(mean_ap) and result.num_samples == N
    np.testing.assert_allclose(result.per_class_ap, per_class)
    assert result.at_threshold == pytest.approx(precision_recall_f1(scores >= 0, targets, ignore))
    flat = result.as_dict()
    assert set(flat) == {"mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"} | {
        f"{m}_top3" for m in ("CP", "CR", "CF1", "OP", "OR", "OF1")
    }
    assert all(0 <= v <= 1 for v in flat.values())
    assert acc.gather() is acc  # not distributed: a no-op


def _gather_worker(rank: int, world: int, init_file: str, queue, first_share: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scores, targets, ignore = make(5, tied=True)
        rows = slice(0, first_share) if rank == 0 else slice(first_share, N)  # unequal: padding is trimmed
        acc = MetricAccumulator()
        if rows.stop > rows.start:
            acc.update(
                torch.from_numpy(scores[rows]),
                torch.from_numpy(targets[rows]),
                torch.from_numpy(ignore[rows]),
            )
        gathered = acc.gather()
        queue.put((rank, len(gathered), gathered.compute().mAP))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("first_share", [170, 0])  # 0: one worker got no rows at all
def test_gather_across_two_gloo_processes(tmp_path, first_share):
    # Forked rather than spawned: two spawned children each import torch again (10-30 s on a busy 2-core
    # machine); forked ones are the same real two-process gloo group and start at once.
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _gather_worker, args=(2, str(tmp_path / "init"), queue, first_share), nprocs=2, start_method="fork"
    )
    results = sorted(queue.get() for _ in range(2))
    scores, targets, ignore = make(5, tied=True)
    expected = mean_average_precision(scores, targets, ignore)[0]
    assert [r[0] for r in results] == [0, 1]
    assert all(r[1] == N and r[2] == pytest.approx(expected) for r in results)


def test_accumulator_rejects_bad_input():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="no batches"):
        acc.compute()
    acc.update(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="classes"):
        acc.update(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 4))


def test_nan_scores_are_refused_not_ranked():
    scores, targets, _ = make(0, tied=False)
    scores[3, 1] = scores[7, 4] = np.nan  # a model whose outputs went NaN
    with pytest.raises(ValueError, match="Input contains NaN"):  # the reference refuses them too
        average_precision_score(targets[:, 1], scores[:, 1])
    for metric in (mean_average_precision, best_f1_thresholds):
        with pytest.raises(
            ValueError, match=rf"2 of {N * K} scores are NaN: the model's outputs are not numbers"
        ):
            metric(scores, targets)
