"""Multi-label losses on logits, with an ignore mask: BCE, focal, and asymmetric (ASL).

All three take ``(logits, targets, ignore=None)`` with the same shape (B, K). ``targets`` are 0/1
(bool, int or float); ``ignore`` is a bool or 0/1 tensor where True (1) marks an entry that takes
no part (the dataset's ``ignore`` column, e.g. VOC "difficult" objects).

Reduction, the same for all three: the per-entry losses of the non-ignored entries are summed and
divided by the batch size B, i.e. the mean over images of the per-image sum over classes. The
scale of a loss therefore does not depend on how many entries of a batch are ignored, and it is
the scale ASL was published with (per image, the sum over classes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mltr.errors import ConfigError


def _reduce(loss: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    """Sum over the non-ignored entries of a (B, K) loss, divided by B."""
    if ignore is not None:
        loss = loss.masked_fill(ignore.to(torch.bool), 0.0)
    return loss.sum() / loss.shape[0]


def _check(logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
    if targets.shape != logits.shape or (ignore is not None and ignore.shape != logits.shape):
        shapes = f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}"
        if ignore is not None:
            shapes += f", ignore {tuple(ignore.shape)}"
        raise ValueError(f"logits, targets and ignore must have the same shape: {shapes}")
    return targets.to(logits.dtype)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits."""
    targets = _check(logits, targets, ignore)
    return _reduce(F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), ignore)


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: torch.Tensor | None = None,
    gamma: float = 2.0,
    alpha: float | None = None,
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    ``alpha`` weights positives by alpha and negatives by 1 - alpha; None (the default) weighs
    both by 1, since the detection default 0.25 has no meaning for a multi-label classifier.
    """
    targets = _check(logits, targets, ignore)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    one_minus_p_t = torch.sigmoid(-logits) * targets + torch.sigmoid(logits) * (1 - targets)
    loss = ce * one_minus_p_t.pow(gamma)
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _reduce(loss, ignore)


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: torch.Tensor | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    detach_focus: bool = False,
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021).

    ``-[y (1 - p)^gamma_pos log(p) + (1 - y) p_m^gamma_neg log(1 - p_m)]`` with the shifted
    probability ``p_m = max(p - clip, 0)`` for negatives. ``log(p)`` is ``logsigmoid`` (stable for
    any logit); ``log(1 - p_m)`` is clamped at ``eps`` only when ``clip`` is 0, as in the authors'
    code. The gradient flows through the focusing weights as in the paper's derivation and in
    the authors' ``AsymmetricLoss`` (whose lines that would stop it are commented out, whatever
    its ``disable_torch_grad_focal_loss`` says); ``detach_focus=True`` stops it there, as that
    flag does in their ``AsymmetricLossOptimized``.
    """
    targets = _check(logits, targets, ignore)
    one_minus_p = torch.sigmoid(-logits)
    if clip > 0:
        one_minus_pm = (one_minus_p + clip).clamp(max=1.0)
        log_neg = torch.log(one_minus_pm)
    else:
        one_minus_pm = one_minus_p
        log_neg = torch.log(one_minus_p.clamp(min=eps))
    loss = targets * F.logsigmoid(logits) + (1 - targets) * log_neg
    if gamma_neg > 0 or gamma_pos > 0:
        weight = targets * one_minus_p.pow(gamma_pos) + (1 - targets) * (1 - one_minus_pm).pow(gamma_neg)
        loss = loss * (weight.detach() if detach_focus else weight)
    return _reduce(-loss, ignore)


class MultiLabelLoss(nn.Module):
    """One of the losses above as a module: ``loss(logits, targets, ignore=None)``."""

    def __init__(self, name: str, **kwargs: Any):
        super().__init__()
        if name not in LOSSES:
            raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
        self.name = name
        self.kwargs = kwargs
        self.fn = LOSSES[name]

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.fn(logits, targets, ignore, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name)] + [f"{k}={v}" for k, v in self.kwargs.items()])


LOSSES = {"bce": bce_loss, "focal": focal_loss, "asl": asymmetric_loss}


def build_loss(name: str, **kwargs: Any) -> MultiLabelLoss:
    """``build_loss("asl")``, ``build_loss("focal", gamma=2.0)``, ``build_loss("bce")``."""
    return MultiLabelLoss(name, **kwargs)
