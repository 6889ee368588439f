"""Checkpoint I/O: MlTr's own format, and ImageNet Swin weights (Microsoft or timm) into an MlTr model.

MlTr's format is one ``torch.save`` file holding ``{"format": "mltr", "version": 1, "config":
<MlTrConfig as a dict>, "state_dict": ..., "extra": {...}}``, so :func:`load_model` rebuilds the
model without knowing its variant. Files are read with ``torch.load(weights_only=True)``.

All file access goes through :func:`open_file`; object storage plugs in there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from mltr.errors import ConfigError
from mltr.model import MlTr, MlTrConfig, convert_state_dict
from mltr.paths import replace_durably

_logger = logging.getLogger(__name__)

FORMAT = "mltr"
VERSION = 1

PathLike = str | os.PathLike


@contextlib.contextmanager
def open_file(path: PathLike, mode: str) -> Iterator[IO[bytes]]:
    """Open a checkpoint for ``"rb"`` or ``"wb"``: a local path or a ``file://`` URI.

    Writes go to a temporary file in the same folder, renamed over ``path`` only once complete
    and on disk, so neither a reader nor a crash sees half a checkpoint.
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"mode must be 'rb' or 'wb', not {mode!r}")
    text = os.fspath(path)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme != "file":
            raise ValueError(f"{text}: only local paths and file:// URIs are supported here, not {scheme}://")
        text = rest
    target = Path(text)
    if mode == "rb":
        with open(target, "rb") as f:
            yield f
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        replace_durably(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read(path: PathLike) -> Mapping[str, Any]:
    """A checkpoint file's contents, loaded without running code (``weights_only``); errors name the file."""
    try:
        with open_file(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read the checkpoint ({exc.strerror})") from None
    try:
        if os.fspath(path).endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            return load_safetensors(data)
        if not data.startswith(b"PK"):  # torch.save writes a zip archive
            raise ConfigError(f"{os.fspath(path)}: not a readable checkpoint (not a file torch.save writes)")
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses what is not plain tensors and containers: a pickle could run code.
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
        reason = (
            lines[0].split(". Please")[0]
            if lines
            else "it holds objects other than tensors and plain containers"
        )
        raise ConfigError(f"{os.fspath(path)}: not a plain checkpoint, refused unread ({reason})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ConfigError(
            f"{os.fspath(path)}: not a readable checkpoint ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(payload, Mapping):
        raise ConfigError(
            f"{os.fspath(path)}: not a checkpoint (a {type(payload).__name__}, not a state dict)"
        )
    return payload


def save_checkpoint(model: MlTr, path: PathLike, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model``'s config and weights, and ``extra`` tensors or primitives, to ``path``."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": dataclasses.asdict(model.config),
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with open_file(path, "wb") as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read an MlTr checkpoint: ``{"config": MlTrConfig, "state_dict": ..., "extra": ...}``."""
    payload = _read(path)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ConfigError(
            f"{os.fspath(path)} is not an MlTr checkpoint (use load_pretrained for Swin weights)"
        )
    if payload.get("version") != VERSION:
        raise ConfigError(
            f"{os.fspath(path)}: MlTr checkpoint version {payload.get('version')}, expected {VERSION}"
        )
    return {
        "config": MlTrConfig(**payload["config"]),
        "state_dict": payload["state_dict"],
        "extra": dict(payload.get("extra") or {}),
    }


def load_model(path: PathLike) -> MlTr:
    """Rebuild the model saved by :func:`save_checkpoint` (on the CPU, in eval mode)."""
    checkpoint = load_checkpoint(path)
    model = MlTr(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


class LoadResult(NamedTuple):
    missing: list[str]
    unexpected: list[str]


def load_pretrained(model: MlTr, source: PathLike | Mapping[str, Any]) -> LoadResult:
    """Load Microsoft Swin, timm Swin or MlTr weights into ``model``; returns (missing, unexpected) keys.

    ``source`` is a path (``.pth``/``.pt``/``.bin``, ``.safetensors``, or an MlTr checkpoint) or a
    state dict, possibly wrapped in ``{"model": ...}``. See :func:`mltr.model.convert_state_dict`
    for the key mapping. Relative-position tables are resampled when windows differ. Head keys
    that do not fit (a classifier of ImageNet's 1000 classes, a query head's per-class queries)
    are skipped: the model keeps its own, reported missing, and the checkpoint's are not reported
    as unexpected; head keys that fit (a query head's class-agnostic decoder) are loaded. Any
    other shape mismatch raises ``ValueError``.
    """
    state_dict = _read(source) if isinstance(source, (str, os.PathLike)) else source
    if state_dict.get("format") == FORMAT:
        state_dict = state_dict["state_dict"]
    converted = convert_state_dict(state_dict, model)
    targets = model.state_dict()
    loadable, unexpected, mismatched, skipped = {}, [], [], []
    for key, value in converted.items():
        if key not in targets:
            (skipped if key.startswith("head.") else unexpected).append(key)
        elif value.shape != targets[key].shape:
            (skipped if key.startswith("head.") else mismatched).append(key)
        else:
            loadable[key] = value
    if mismatched:
        details = ", ".join(
            f"{k} {tuple(converted[k].shape)} vs {tuple(targets[k].shape)}" for k in mismatched
        )
        raise ConfigError(f"checkpoint and model disagree on shapes: {details}")
    if skipped:
        _logger.info(
            "skipped the checkpoint's classifier (it does not fit this head): %s", ", ".join(skipped)
        )
    model.load_state_dict(loadable, strict=False)
    missing = [k for k in targets if k not in loadable]
    return LoadResult(missing, unexpected)


def check_pretrained(config: MlTrConfig, source: PathLike) -> LoadResult:
    """Load ``source`` into a fresh model of ``config`` here: what ``--init-from`` does on every worker,
    checked once before they start. Raises :class:`~mltr.errors.ConfigError` naming the file."""
    model = MlTr(config)
    try:
        result = load_pretrained(model, source)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(
            message if os.fspath(source) in message else f"{os.fspath(source)}: {message}"
        ) from None
    if len(result.missing) == len(model.state_dict()):
        raise ConfigError(
            f"{os.fspath(source)}: none of its weights fit the model; is it a Swin or MlTr checkpoint?"
        )
    return result


# --- the training state: what a checkpoint holds beside the weights -----------------------------------

STATE_VERSION = 1

# A training checkpoint folder: the weights of the model and of its EMA, and the TrainState.
STATE_FILE = "train_state.pt"  # a TrainState: selection, optimiser, schedule, scaler, EMA, RNG, history
MODEL_FILE = "model.pt"  # MlTr's own checkpoint format: mltr.load_model() rebuilds it
EMA_FILE = "model_ema.pt"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE)
WEIGHT_FILES = {"model": MODEL_FILE, "ema": EMA_FILE}


@dataclass
class Selection:
    """What one epoch would ship, chosen on the calibration split: weights, thresholds, and their scores.

    ``weights`` (the model or its EMA) scored the higher calibration mAP; ``thresholds`` are that
    model's per-class F1-optimal thresholds on the calibration split. ``val`` holds its validation
    figures (mAP, and CP..OF1 at those thresholds): reported, never used to choose.
    """

    weights: str  # "model" or "ema"
    calib_mAP: float
    thresholds: list[float]
    val: dict[str, float]
    calib_per_class_ap: list[float]
    val_per_class_ap: list[float]
    val_pr_curve: tuple[list[float], list[float]]  # micro-averaged (recall, precision) on val

    @property
    def val_mAP(self) -> float:
        return self.val["mAP"]


@dataclass
class TrainState:
    """The checkpoint's training state: written by the loop every epoch, read by resume and final logging.

    Saved with :meth:`save` as plain containers and tensors, read with ``torch.load(weights_only=True)``:
    a state file from a shared bucket cannot run code.
    """

    epoch: int  # the epoch this checkpoint ends
    selection: Selection  # this epoch's choice
    best_epoch: int  # the epoch, so far, whose selection scored the highest calibration mAP
    best_calib_mAP: float
    history: list[dict[str, Any]]  # {"epoch": e, "metrics": {...}} for every epoch so far
    rng: list[dict[str, Any]]  # every rank's generators, in rank order (mltr.train.gather_rng_states)
    ema: dict[str, Any]  # state dicts of the EMA, optimiser, schedule and grad scaler
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]

    def save(self, path: PathLike) -> None:
        # Shallow: dataclasses.asdict would deep-copy every optimiser tensor first.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["selection"] = dataclasses.asdict(self.selection)
        payload = {"format": "mltr-train-state", "version": STATE_VERSION, **fields}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with open_file(path, "wb") as f:
            f.write(buffer.getbuffer())

    @classmethod
    def load(cls, path: PathLike) -> TrainState:
        payload = dict(_read(path))
        if payload.pop("format", None) != "mltr-train-state" or payload.pop("version", None) != STATE_VERSION:
            raise ConfigError(f"{os.fspath(path)} is not an MlTr training state of version {STATE_VERSION}")
        selection = payload.pop("selection")
        selection["val_pr_curve"] = tuple(selection["val_pr_curve"])
        return cls(selection=Selection(**selection), **payload)


def save_selected_model(model: MlTr, thresholds: list[float] | tuple[float, ...], folder: PathLike) -> Path:
    """A checkpoint folder holding ``model`` as its selected weights, with per-class ``thresholds``
    and no training history: what ``mltr predict``, ``evaluate`` and ``export`` read from
    ``--model FOLDER``, for a network that no training run of this project produced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder / MODEL_FILE)
    selection = Selection(
        weights="model",
        calib_mAP=float("nan"),
        thresholds=[float(t) for t in thresholds],
        val={},
        calib_per_class_ap=[],
        val_per_class_ap=[],
        val_pr_curve=([], []),
    )
    TrainState(
        epoch=0,
        selection=selection,
        best_epoch=0,
        best_calib_mAP=float("nan"),
        history=[],
        rng=[],
        ema={},
        optimizer={},
        scheduler={},
        scaler={},
    ).save(folder / STATE_FILE)
    return folder
