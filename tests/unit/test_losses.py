"""Losses against straightforward reference formulas, with ignore masks."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from mltr import build_loss

pytestmark = pytest.mark.unit

B, K = 6, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(B, K, generator=g) < 0.4).double()
    ignore = torch.rand(B, K, generator=g) < 0.25
    return logits, targets, ignore


def reference_sum(per_entry, ignore):
    """Loop over entries: the sum of the non-ignored per-entry losses, divided by the batch size."""
    total = 0.0
    for i in range(B):
        for k in range(K):
            if not ignore[i, k]:
                total += per_entry(i, k)
    return torch.tensor(total / B, dtype=torch.float64)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bce(batch):
    logits, targets, ignore = batch

    def entry(i, k):
        p, y = sigmoid(logits[i, k].item()), targets[i, k].item()
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    torch.testing.assert_close(build_loss("bce")(logits, targets, ignore), reference_sum(entry, ignore))


@pytest.mark.parametrize("gamma,alpha", [(2.0, None), (1.5, 0.25)])
def test_focal(batch, gamma, alpha):
    logits, targets, ignore = batch

    def entry(i, k):
        p, y = sigmoid(logits[i, k].item()), targets[i, k].item()
        p_t = p if y else 1 - p
        a = 1.0 if alpha is None else (alpha if y else 1 - alpha)
        return -a * (1 - p_t) ** gamma * math.log(p_t)

    loss = build_loss("focal", gamma=gamma, alpha=alpha)(logits, targets, ignore)
    torch.testing.assert_close(loss, reference_sum(entry, ignore))
    # torchvision's implementation agrees once its ignored entries are dropped.
    tv = sigmoid_focal_loss(
        logits, targets, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="none"
    )
    torch.testing.assert_close(loss, tv[~ignore].sum() / B)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.1), (4.0, 0.0, 0.0)])
def test_asymmetric(batch, gamma_neg, gamma_pos, clip):
    logits, targets, ignore = batch

    def entry(i, k):
        p, y = sigmoid(logits[i, k].item()), targets[i, k].item()
        if y:
            return -((1 - p) ** gamma_pos) * math.log(p)
        p_m = max(p - clip, 0.0)
        return -(p_m**gamma_neg) * math.log(max(1 - p_m, 1e-8))

    loss = build_loss("asl", gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets, ignore)
    torch.testing.assert_close(loss, reference_sum(entry, ignore))


def test_asl_defaults_are_the_papers(batch):
    logits, targets, ignore = batch
    explicit = build_loss("asl", gamma_neg=4, gamma_pos=0, clip=0.05)(logits, targets, ignore)
    torch.testing.assert_close(build_loss("asl")(logits, targets, ignore), explicit)


def test_special_cases_agree(batch):
    logits, targets, ignore = batch
    bce = build_loss("bce")(logits, targets, ignore)
    torch.testing.assert_close(build_loss("focal", gamma=0.0)(logits, targets, ignore), bce)
    torch.testing.assert_close(
        build_loss("asl", gamma_neg=0, gamma_pos=0, clip=0)(logits, targets, ignore), bce
    )
    focal = build_loss("focal", gamma=2.0)(logits, targets, ignore)
    torch.testing.assert_close(
        build_loss("asl", gamma_neg=2, gamma_pos=2, clip=0)(logits, targets, ignore), focal
    )


@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_ignored_entries_take_no_part(batch, name):
    logits, targets, ignore = batch
    loss_fn = build_loss(name)
    # Whatever the logits and targets of ignored entries, neither the loss nor the gradient changes.
    changed_logits = torch.where(ignore, torch.full_like(logits, 50.0), logits).requires_grad_()
    changed_targets = torch.where(ignore, 1 - targets, targets)
    plain = logits.clone().requires_grad_()
    a = loss_fn(plain, targets, ignore)
    b = loss_fn(changed_logits, changed_targets, ignore.to(torch.uint8))
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    assert torch.equal(changed_logits.grad[ignore], torch.zeros(int(ignore.sum()), dtype=torch.float64))
    torch.testing.assert_close(plain.grad[~ignore], changed_logits.grad[~ignore])


@pytest.mark.parametrize("name", ["bce", "focal", "asl"])
def test_finite_for_extreme_logits(name):
    logits = torch.tensor([[60.0, -60.0, 0.0], [-60.0, 60.0, 30.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss = build_loss(name)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_build_loss_errors():
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="same shape"):
        build_loss("bce")(torch.zeros(2, 3), torch.zeros(2, 4))
