"""Multi-label metrics: mAP, CP/CR/CF1/OP/OR/OF1, F1-optimal thresholds, streaming accumulation.

Conventions, the same for every function here:

* Inputs are (N, K) tensors or arrays: ``scores``/``logits`` (what the model returns; mAP only
  ranks, so any increasing function of the logits gives the same mAP), ``targets`` (0/1), and an
  optional ``ignore`` mask (True = the entry takes no part, as the dataset's ``ignore`` column).
* Thresholds are probabilities in [0, 1] and are applied to the logits as
  ``sigmoid(logit) >= threshold``, computed as ``logit >= log(t / (1 - t))`` in float64 so that
  saturated sigmoids do not create ties.
* Class-averaged figures (mAP, CP, CR) average over the classes that have at least one positive
  (non-ignored) entry; a class without positives has AP NaN and is left out.
* Every figure is a fraction in [0, 1].
* Scores that are NaN are refused (as scikit-learn does): they have no rank, and a model that
  returns them would otherwise score the label frequencies of its ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mltr.errors import ConfigError

# Classes are processed in groups of this many columns so the sorted copies stay small.
_CLASS_CHUNK = 16


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _prepare(
    scores: Any, targets: Any, ignore: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, positive, valid): float scores, and bool masks of positives and of non-ignored entries."""
    scores = _as_tensor(scores)
    if not scores.is_floating_point():
        scores = scores.double()
    positive = _as_tensor(targets) != 0
    valid = torch.ones_like(positive) if ignore is None else _as_tensor(ignore) == 0
    if scores.ndim != 2 or positive.shape != scores.shape or valid.shape != scores.shape:
        raise ValueError(
            f"scores, targets and ignore must be (N, K) of one shape: {tuple(scores.shape)}, "
            f"{tuple(positive.shape)}, {tuple(valid.shape)}"
        )
    nan = int(torch.isnan(scores).sum()) if scores.is_floating_point() else 0
    if nan:
        raise ConfigError(
            f"{nan} of {scores.numel()} scores are NaN: the model's outputs are not numbers "
            f"(did its training diverge?), and cannot be ranked"
        )
    return scores, positive & valid, valid


def _ranked_counts(
    scores: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column, sorted by decreasing score: (sorted scores, positive indicator, tp, fp) at every rank,
    where tp/fp count every entry scoring at least as high (so ties count together) - i.e. the counts at
    the end of each group of tied scores, broadcast to all members of the group."""
    order = torch.argsort(scores, dim=0, descending=True, stable=True)  # N, k
    ranked = scores.gather(0, order)  # N, k
    pos = positive.gather(0, order).double()  # N, k
    neg = (valid & ~positive).gather(0, order).double()  # N, k
    tp, fp = pos.cumsum(0), neg.cumsum(0)  # N, k
    n = ranked.shape[0]
    index = torch.arange(n).unsqueeze(1).expand_as(ranked)  # N, k
    group_last = torch.ones_like(ranked, dtype=torch.bool)
    group_last[:-1] = ranked[:-1] != ranked[1:]
    # Index of the last member of each entry's tie group: a reverse cumulative min over group ends.
    ends = torch.where(group_last, index, torch.full_like(index, n - 1))
    ends = ends.flip(0).cummin(0).values.flip(0)  # N, k
    return ranked, pos, tp.gather(0, ends), fp.gather(0, ends)


def average_precision(scores: Any, targets: Any, ignore: Any = None) -> np.ndarray:
    """Per-class AP (K,), float64, without interpolation (scikit-learn's ``average_precision_score``):
    the sum over distinct score thresholds of recall increase x precision; NaN for classes without positives.
    """
    scores, positive, valid = _prepare(scores, targets, ignore)
    out = []
    for start in range(0, scores.shape[1], _CLASS_CHUNK):
        cols = slice(start, start + _CLASS_CHUNK)
        _, pos, tp, fp = _ranked_counts(scores[:, cols], positive[:, cols], valid[:, cols])
        num_pos = pos.sum(0)  # k
        precision = tp / (tp + fp).clamp(min=1)  # N, k: precision at the threshold of each entry's tie group
        # Each positive raises recall by 1/num_pos at its group's threshold, where precision is read.
        ap = (pos * precision).sum(0) / num_pos
        out.append(torch.where(num_pos > 0, ap, torch.full_like(ap, float("nan"))))
    return torch.cat(out).numpy() if out else np.zeros(0)


def mean_average_precision(scores: Any, targets: Any, ignore: Any = None) -> tuple[float, np.ndarray]:
    """(mAP, per-class AP): the mean of AP over classes with at least one positive; NaN if none has one."""
    per_class = average_precision(scores, targets, ignore)
    present = ~np.isnan(per_class)
    return (float(per_class[present].mean()) if present.any() else float("nan")), per_class


_BELOW_ONE = float(np.nextafter(1.0, 0.0))  # the largest threshold that still predicts (logit ~36.7)


def _logit(threshold: Any) -> torch.Tensor:
    return torch.logit(torch.as_tensor(threshold, dtype=torch.float64))


def apply_thresholds(logits: Any, thresholds: Any = 0.5) -> torch.Tensor:
    """Bool predictions ``sigmoid(logits) >= thresholds`` (one threshold, or one per class)."""
    return _as_tensor(logits, torch.float64) >= _logit(thresholds)


def top_k_predictions(
    logits: Any, k: int = 3, ignore: Any = None, threshold: float | None = 0.5
) -> torch.Tensor:
    """Bool predictions of each image's ``k`` highest-scoring classes that also score at least
    ``threshold`` (the published top-3 figures' convention, ML-GCN's ``overall_topk``: a top-3
    class scoring under 0.5 is not predicted; ``None``: the top ``k`` whatever they score);
    ignored classes are never chosen."""
    logits = _as_tensor(logits, torch.float64)
    if ignore is not None:
        logits = logits.masked_fill(_as_tensor(ignore) != 0, float("-inf"))
    k = min(k, logits.shape[1])
    chosen = torch.zeros(logits.shape, dtype=torch.bool)
    chosen.scatter_(1, logits.topk(k, dim=1).indices, True)
    chosen &= logits > float("-inf")
    return chosen if threshold is None else chosen & apply_thresholds(logits, threshold)


def precision_recall_f1(predictions: Any, targets: Any, ignore: Any = None) -> dict[str, float]:
    """CP, CR, CF1 (per class, averaged) and OP, OR, OF1 (overall) of bool predictions.

    CP is the mean over classes with positives of TP/(TP+FP) (0 for a class predicted nowhere),
    CR the mean of TP/(TP+FN), CF1 = 2 CP CR / (CP + CR); OP, OR and OF1 count over all entries.
    """
    pred, positive, valid = _prepare(predictions, targets, ignore)
    pred = (pred != 0) & valid
    tp = (pred & positive).sum(0).double()  # K
    predicted = pred.sum(0).double()  # K
    actual = positive.sum(0).double()  # K
    present = actual > 0
    cp = (tp / predicted.clamp(min=1))[present].mean().item() if present.any() else float("nan")
    cr = (tp / actual.clamp(min=1))[present].mean().item() if present.any() else float("nan")
    op = tp.sum().item() / max(predicted.sum().item(), 1.0)
    orc = tp.sum().item() / max(actual.sum().item(), 1.0)
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orc, "OF1": _f1(op, orc)}


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def best_f1_thresholds(logits: Any, targets: Any, ignore: Any = None, default: float = 0.5) -> np.ndarray:
    """Per-class probability thresholds (K,) maximising each class's F1 on a validation set.

    For each class the candidates are its distinct scores (predict ``>=`` the candidate); ties in
    F1 go to the highest threshold. The threshold returned lies halfway (in logits) between the
    chosen score and the next lower one, so that the chosen predictions survive the round trip
    through a probability (``logit(sigmoid(x))`` is not always ``x``), and under 1.0, which would
    predict nothing. Classes without positives get ``default``. Apply them with
    :func:`apply_thresholds`.
    """
    scores, positive, valid = _prepare(_as_tensor(logits, torch.float64), targets, ignore)
    out = []
    for start in range(0, scores.shape[1], _CLASS_CHUNK):
        cols = slice(start, start + _CLASS_CHUNK)
        ranked, pos, tp, fp = _ranked_counts(scores[:, cols], positive[:, cols], valid[:, cols])
        num_pos = pos.sum(0)  # k
        # N, k: F1 when predicting this entry's tie group and every higher score.
        f1 = 2 * tp / (tp + fp + num_pos).clamp(min=1)
        best = f1.argmax(0)  # k: first maximum, i.e. the highest threshold among equals
        chosen = ranked.gather(0, best.unsqueeze(0)).squeeze(0)  # k: the lowest score predicted
        below = torch.where(ranked < chosen, ranked, torch.full_like(ranked, float("-inf"))).amax(0)
        below = torch.where(below > float("-inf"), below, chosen - 1.0)  # every score is predicted
        threshold = torch.sigmoid((chosen + below) / 2).clamp(max=_BELOW_ONE)
        out.append(torch.where(num_pos > 0, threshold, torch.full_like(threshold, default)))
    return torch.cat(out).numpy() if out else np.zeros(0)


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """What :meth:`MetricAccumulator.compute` measures; :meth:`as_dict` flattens the scalars for logging."""

    mAP: float
    per_class_ap: np.ndarray
    at_threshold: dict[str, float]
    top_k: dict[str, float]
    k: int
    num_samples: int

    def as_dict(self) -> dict[str, float]:
        flat = {"mAP": self.mAP, **self.at_threshold}
        flat.update({f"{name}_top{self.k}": value for name, value in self.top_k.items()})
        return flat


class MetricAccumulator:
    """Collects (logits, targets, ignore) batch by batch; computes every metric once at the end.

    Chunks are kept on the CPU (logits in ``dtype``, masks as bool) and concatenated once, when
    :meth:`gather` or :meth:`compute` first needs them; the concatenation then replaces the chunks,
    so the data are never held twice for longer than that copy.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._ignore: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(chunk.shape[0] for chunk in self._logits)

    def reset(self) -> None:
        self._logits, self._targets, self._ignore = [], [], []

    def update(self, logits: torch.Tensor, targets: torch.Tensor, ignore: torch.Tensor | None = None) -> None:
        logits = _as_tensor(logits, self.dtype)
        targets = _as_tensor(targets) != 0
        ignore = torch.zeros_like(targets) if ignore is None else _as_tensor(ignore) != 0
        if logits.ndim != 2 or targets.shape != logits.shape or ignore.shape != logits.shape:
            raise ValueError(
                f"logits, targets and ignore must be (B, K) of one shape: {tuple(logits.shape)}, "
                f"{tuple(targets.shape)}, {tuple(ignore.shape)}"
            )
        if self._logits and logits.shape[1] != self._logits[0].shape[1]:
            raise ValueError(f"{logits.shape[1]} classes in this batch, {self._logits[0].shape[1]} before")
        self._logits.append(logits)
        self._targets.append(targets)
        self._ignore.append(ignore)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All rows so far as (logits, targets, ignore): (N, K) float, bool, bool."""
        return self._concat()

    def _concat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._logits:
            raise ValueError("no batches were added")
        if len(self._logits) > 1:
            self._logits = [torch.cat(self._logits)]
            self._targets = [torch.cat(self._targets)]
            self._ignore = [torch.cat(self._ignore)]
        return self._logits[0], self._targets[0], self._ignore[0]

    def gather(self) -> MetricAccumulator:
        """A new accumulator with all workers' rows (rank order), on every rank; ``self`` if not distributed.

        Uses ``all_gather`` with padding to the largest worker (tensors on the current CUDA device
        for NCCL, on the CPU otherwise). Every rank must call it. A sampler that pads the dataset
        (``DistributedSampler``) repeats rows; the accumulator counts them like any others.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        if self._logits:
            logits, targets, ignore = self._concat()
        else:
            logits = torch.zeros(0, 0, dtype=self.dtype)
            targets = ignore = torch.zeros(0, 0, dtype=torch.bool)
        world = dist.get_world_size()
        shape = torch.tensor(list(logits.shape), device=device)
        shapes = [torch.zeros_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape)
        rows = [int(s[0]) for s in shapes]
        classes = {int(s[1]) for s, n in zip(shapes, rows, strict=True) if n > 0}
        if len(classes) > 1:
            raise ValueError(f"workers disagree on the number of classes: {sorted(classes)}")
        out = MetricAccumulator(self.dtype)
        if not classes:
            return out
        num_classes, longest = classes.pop(), max(rows)
        # Targets and ignore travel as one uint8 tensor: bit 0 = positive, bit 1 = ignored.
        packed = targets.to(torch.uint8) | (ignore.to(torch.uint8) << 1)
        parts = []
        for local in (logits, packed):
            padded = torch.zeros(longest, num_classes, dtype=local.dtype, device=device)
            if local.shape[0]:  # a worker without rows (an unequal split) sends padding only
                padded[: local.shape[0]] = local.to(padded.device)
            gathered = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(gathered, padded)
            parts.append(torch.cat([g[:n].cpu() for g, n in zip(gathered, rows, strict=True)]))
        out.update(parts[0], parts[1] & 1, parts[1] >> 1)
        return out

    def compute(self, threshold: float | Sequence[float] | np.ndarray = 0.5, k: int = 3) -> MetricResult:
        """mAP, per-class AP, and CP..OF1 at ``threshold`` (one, or one per class) and for the top
        ``k`` scoring at least 0.5 (:func:`top_k_predictions`, as the published top-3 figures)."""
        logits, targets, ignore = self._concat()
        mean_ap, per_class = mean_average_precision(logits, targets, ignore)
        return MetricResult(
            mAP=mean_ap,
            per_class_ap=per_class,
            at_threshold=precision_recall_f1(apply_thresholds(logits, threshold), targets, ignore),
            top_k=precision_recall_f1(top_k_predictions(logits, k, ignore), targets, ignore),
            k=k,
            num_samples=logits.shape[0],
        )
