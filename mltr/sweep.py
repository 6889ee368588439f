"""What a sweep reports: one record per trial, ranked by the selection metric, as tables and a plot.

The selection metric is the calibration split's mAP of the weights a trial would ship (for a
finished trial, that of its selected epoch; for one a scheduler stopped, the best it reported).
The best trial is the top-ranked one that finished with a model; ``val_mAP`` is only reported.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FINISHED, STOPPED, FAILED, INTERRUPTED = "finished", "stopped early", "failed", "interrupted"


@dataclass(frozen=True)
class TrialRecord:
    trial_id: str
    window_size: int
    loss: str
    lr: float
    status: str  # FINISHED, STOPPED, FAILED or INTERRUPTED
    epochs: int  # epochs it ran
    calib_mAP: float | None  # the selection metric
    val_mAP: float | None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    checkpoint: str | None = None
    error: str | None = None


def _key(record: TrialRecord) -> float:
    value = record.calib_mAP
    return -math.inf if value is None or math.isnan(value) else value


def rank(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Best first by the selection metric; trials without a figure last, in their order."""
    return sorted(records, key=_key, reverse=True)


def best(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The top-ranked trial that finished with a logged model, if any."""
    return next((r for r in rank(records) if r.status == FINISHED and r.model_uri), None)


def table_csv(records: Sequence[TrialRecord]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(TrialRecord)])
    writer.writeheader()
    writer.writerows(
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
        for r in rank(records)
    )  # a figure a trial does not have is an empty cell, whether None or NaN
    return out.getvalue()


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def table_markdown(records: Sequence[TrialRecord]) -> str:
    """The results table a person reads: ranked, one line per trial."""
    lines = [
        "| rank | trial | window | loss | lr | status | epochs | calib mAP | val mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rank(records), start=1):
        lines.append(
            f"| {i} | {r.trial_id} | {r.window_size} | {r.loss} | {r.lr:.2e} | {r.status} | {r.epochs} "
            f"| {_fmt(r.calib_mAP)} | {_fmt(r.val_mAP)} |"
        )
    return "\n".join(lines) + "\n"


def plot_by_window_and_loss(records: Sequence[TrialRecord], path: Path) -> None:
    """mAP by window size (groups) and loss (bars): the best trial of each pair, calibration and val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = sorted({r.window_size for r in records})
    losses = sorted({r.loss for r in records})
    best_of = {}
    for r in rank(records):
        best_of.setdefault((r.window_size, r.loss), r)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100, sharey=True)
    width = 0.8 / max(len(losses), 1)
    for ax, attr, title in (
        (axes[0], "calib_mAP", "calibration mAP (selects)"),
        (axes[1], "val_mAP", "val mAP"),
    ):
        for j, loss in enumerate(losses):
            values = []
            for w in windows:
                record = best_of.get((w, loss))
                value = getattr(record, attr) if record else None
                values.append(math.nan if value is None else value)  # no bar, not a bar at 0
            ax.bar([i + j * width for i in range(len(windows))], values, width=width, label=loss)
        ax.set_xticks(
            [i + width * (len(losses) - 1) / 2 for i in range(len(windows))], [str(w) for w in windows]
        )
        ax.set(xlabel="window size", title=title, ylim=(0, 1))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mAP")
    axes[1].legend(title="loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
