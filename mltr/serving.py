"""The model as its users call it: encoded images in, per-class scores and labels out.

:class:`Predictor` holds a network with its classes, calibrated thresholds and input contract,
and turns encoded images (JPEG or PNG bytes, or paths and URIs to read them from) into scores and
labels: decode to RGB uint8, resize by the contract's rule, normalise, run the network in
batches, sigmoid, then each class at or above its threshold. It is what the registered MLflow
model (:class:`mltr.pyfunc.MlTrPyfunc`, logged by :func:`mltr.pyfunc.log_pyfunc_model`) runs,
and what ``mltr predict`` and ``mltr evaluate`` run on a checkpoint.

An image that cannot be read or decoded is one row's ``error``, never the whole batch's.

    model = mlflow.pyfunc.load_model("models:/mltr-coco@champion")
    out = model.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}))
    out.loc[0, "labels"], out.loc[0, "scores"]     # ["cat"], [0.01, 0.93, ...] in class order

Over HTTP (``mlflow models serve``) the ``image`` column arrives as base64 strings in
``{"dataframe_split": {"columns": ["image"], "data": [["/9j/4AAQ..."]]}}``, decoded here row by
row (the signature's type is ``string``: MLflow's ``binary`` would decode the whole column first
and refuse the request for one bad row). A ``path`` is a local file, a ``file://`` or an ``s3://``
URI; any other scheme is that row's error, so a served model fetches nothing else.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltr.errors import ConfigError
from mltr.images import IMAGE_FORMATS, as_stored, kept_as_is, special_file_kind, to_rgb
from mltr.metrics import apply_thresholds
from mltr.model import MlTr, autocast, normalize
from mltr.paths import local_path

# The pyfunc's input: one of these columns per row (bytes win when a row has both).
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
# Its output, one row per input row: labels at the thresholds, scores in class order, and why a
# row has neither (None when it has them).
OUTPUT_COLUMNS = ("labels", "scores", "error")
MODEL_INFO_FILE = "model_info.json"  # the pyfunc artifact with classes, thresholds and input contract
URI_SCHEMES = ("file", "s3")  # where a path may point: a served model fetches from nowhere else
MAX_IMAGE_BYTES = 64 * 2**20  # the most bytes read of one image: a huge file is an error, not an OOM
# torchvision prefixes "<function>, <source file>:<line>, " to the decoder's message.
TORCHVISION_PREFIX = re.compile(r"^\w+, \S+:\d+, ")


class ImageError(ValueError):
    """An input image that cannot be read or decoded; the message names it and says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What the network needs around it: class names, per-class thresholds, input contract, provenance."""

    classes: tuple[str, ...]
    thresholds: tuple[float, ...]
    input: dict[str, Any]  # MlTrConfig.input_contract()
    variant: str | None = None
    dataset_fingerprint: str | None = None
    extra: dict[str, Any] | None = None  # weights, epoch, model config: what the run chose

    def __post_init__(self):
        if len(self.classes) != len(self.thresholds):
            raise ValueError(f"{len(self.classes)} classes but {len(self.thresholds)} thresholds")

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "thresholds": list(self.thresholds),
            "input": self.input,
            "variant": self.variant,
            "dataset_fingerprint": self.dataset_fingerprint,
            **(self.extra or {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        known = {"classes", "thresholds", "input", "variant", "dataset_fingerprint"}
        return cls(
            classes=tuple(data["classes"]),
            thresholds=tuple(float(t) for t in data["thresholds"]),
            input=dict(data["input"]),
            variant=data.get("variant"),
            dataset_fingerprint=data.get("dataset_fingerprint"),
            extra={k: v for k, v in data.items() if k not in known} or None,
        )


def read_image_bytes(source: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of an image at a local path, a ``file://`` or an ``s3://`` URI; an
    :class:`ImageError` naming it for anything that stops the read (another scheme included)."""
    import fsspec

    target = source
    scheme = source.split("://", 1)[0].lower() if "://" in source else "file"
    if scheme not in URI_SCHEMES:
        raise ImageError(f"{source}: not a local path, file:// or s3:// URI")
    if scheme == "file":
        try:
            target = local_path(source)  # file:///data/my%20set/a.jpg is /data/my set/a.jpg
        except ConfigError as exc:
            raise ImageError(str(exc)) from None
        try:  # checked before it is opened: opening a FIFO blocks until someone writes to it
            kind = special_file_kind(os.stat(target).st_mode)
        except OSError:
            kind = None  # fsspec's open below names what is wrong
        if kind == "folder":
            raise ImageError(f"{source}: is a folder, not an image")
        if kind:
            raise ImageError(f"{source}: a {kind}, not a regular file")
    try:
        with fsspec.open(target, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a folder, not an image") from None
    except OSError as exc:
        raise ImageError(f"{source}: cannot be read: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the store's own errors (no credentials, a bad bucket name)
        raise ImageError(f"{source}: cannot be read: {type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:
        raise ImageError(f"{source}: larger than {max_bytes} bytes")
    return data


def open_image(raw: bytes, name: str) -> Any:
    """The PIL image of encoded bytes, its header read but its pixels not yet decoded; an
    :class:`ImageError` for bytes that are no image, or an image over Pillow's decompression-bomb
    limit (``Image.MAX_IMAGE_PIXELS``, the converter's too), before anything large is allocated."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not a decodable JPEG or PNG image: not a recognised image format"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a decodable JPEG or PNG image: bad header: {exc}") from None
    if min(img.size) < 1:
        raise ImageError(f"{name}: not a decodable JPEG or PNG image: invalid size {img.size}")
    return img


def decode_image(
    data: bytes | bytearray | memoryview | str, name: str = "image", stored: dict[str, Any] | None = None
) -> torch.Tensor:
    """Encoded image bytes (base64 text too) -> RGB uint8 (3, H, W); an :class:`ImageError` naming ``name``.

    With ``stored`` (the input contract's ``{"max_side", "quality"}``: how the training data's
    images were stored), the image is first made what the converter would have stored
    (:func:`mltr.images.as_stored`: an RGB JPEG within ``max_side`` is kept, anything else is
    made RGB, downscaled and re-encoded), then decoded as validation decodes stored JPEGs
    (torchvision's libjpeg-turbo): the pixels validation would have seen. Without it, JPEGs
    are decoded as they are and any other format (PNG, GIF, WebP, ...) as the converter reads
    it (Pillow, then :func:`to_rgb`). The header is read first: an image over the
    decompression-bomb limit is an error before its pixels are allocated.
    """
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    if isinstance(data, str):
        try:  # whitespace dropped: MIME base64 (MLflow's own encoder) breaks lines every 76 characters
            data = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: a string that is not base64-encoded image bytes") from None
    raw = bytes(data)
    if not raw:
        raise ImageError(f"{name}: empty")
    img = open_image(raw, name)
    if stored is not None and not kept_as_is(img, int(stored["max_side"])):
        try:
            img.load()
            raw, _, _ = as_stored(img, raw, int(stored["max_side"]), int(stored["quality"]))
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageError(
                f"{name}: not a decodable JPEG or PNG image: {exc or type(exc).__name__}"
            ) from None
        img = open_image(raw, name)
    if img.format == "JPEG":
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            text = TORCHVISION_PREFIX.sub("", str(exc).strip())
            reason = text.splitlines()[0] if text else type(exc).__name__
            raise ImageError(f"{name}: not a decodable JPEG or PNG image: {reason}") from None
    else:
        try:
            img.load()
            rgb = to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageError(
                f"{name}: not a decodable JPEG or PNG image: {exc or type(exc).__name__}"
            ) from None
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise ImageError(f"{name}: decoded to an unexpected shape {tuple(image.shape)}")
    return image


def resize_image(image: torch.Tensor, contract: dict[str, Any]) -> torch.Tensor:
    """RGB uint8 (3, H, W) -> uint8 (3, S, S) by the contract's rule (``squash``), as evaluation resizes."""
    from torchvision.transforms.v2 import functional as F

    if contract["resize"] != "squash":
        raise ValueError(f"unknown resize rule {contract['resize']!r}")
    size = int(contract["image_size"])
    return F.resize(image, [size, size], antialias=True)


def missing_cell(value: Any) -> bool:
    """A cell with nothing in it: None, NaN (pandas' missing value in an object column) or pd.NA."""
    return (
        value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"
    )


def decode_rows(
    items: Iterable[tuple[str, bytes | str | None, str | None]], contract: dict[str, Any]
) -> tuple[np.ndarray, list[str | None]]:
    """``(name, data, path)`` rows -> uint8 pixels (N, 3, S, S) resized by ``contract``, and each
    row's error (None when it decoded; its pixels are then zeros).

    ``data`` (bytes or base64 text) wins; else the image is read from ``path``.
    """
    size = int(contract["image_size"])
    pixels: list[np.ndarray] = []
    errors: list[str | None] = []
    for name, data, path in items:
        try:
            if missing_cell(data):
                if not isinstance(path, str) or not path:  # None, NaN, pd.NA or ""
                    raise ImageError(f"{name}: neither image bytes nor a path")
                data = read_image_bytes(path)
            pixels.append(resize_image(decode_image(data, name, contract.get("stored")), contract).numpy())
            errors.append(None)
        except ImageError as exc:
            pixels.append(np.zeros((3, size, size), dtype=np.uint8))
            errors.append(str(exc))
    return (np.stack(pixels) if pixels else np.zeros((0, 3, size, size), np.uint8)), errors


class Predictor:
    """A network with its :class:`ModelInfo`: encoded images in, scores and labels out, in batches."""

    def __init__(self, model: MlTr, info: ModelInfo, batch_size: int = 32, device: str | None = None):
        if len(info.classes) != model.config.num_classes:
            raise ValueError(
                f"{len(info.classes)} classes for a network of {model.config.num_classes} outputs"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.info = info
        self.batch_size = batch_size
        self.thresholds = np.asarray(info.thresholds, dtype=np.float64)

    @classmethod
    def from_checkpoint(
        cls, folder: str | os.PathLike, classes: Sequence[str], stored: dict[str, int] | None = None, **kwargs
    ) -> Predictor:
        """The weights a training checkpoint (a local folder) selected, with its calibrated
        thresholds; ``stored``: how its dataset's images were stored (the contract's ``stored``)."""
        from mltr.checkpoint import STATE_FILE, WEIGHT_FILES, TrainState, load_model

        state = TrainState.load(Path(folder) / STATE_FILE)
        model = load_model(Path(folder) / WEIGHT_FILES[state.selection.weights])
        info = ModelInfo(
            classes=tuple(classes),
            thresholds=tuple(state.selection.thresholds),
            input=model.config.input_contract() | ({"stored": dict(stored)} if stored else {}),
            extra={"weights": state.selection.weights, "epoch": state.epoch},
        )
        return cls(model, info, **kwargs)

    def inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """Resized uint8 pixels (N, 3, S, S) -> the network's float32 input on its device (the input contract)."""
        contract = self.info.input
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        return normalize(batch, tuple(contract["mean"]), tuple(contract["std"]))

    @torch.no_grad()
    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The network's logits (N, classes) of resized uint8 pixels, in batches of ``batch_size``."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            inputs = self.inputs(pixels[start : start + self.batch_size])
            with autocast(self.device):  # as training's evaluation ran it: the thresholds' scores
                out.append(self.model(inputs).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.info.classes)), dtype=np.float32)

    def labels(self, logits: np.ndarray) -> list[list[str]]:
        """The classes whose score is at or above their calibrated thresholds, per row of logits:
        compared as training's metrics compare (logit >= logit(threshold), in float64), so a
        served label is the one calibration counted, saturated sigmoids included."""
        chosen = apply_thresholds(logits, self.thresholds).numpy()
        return [[self.info.classes[i] for i in np.flatnonzero(row)] for row in chosen]

    def decode(
        self, items: Iterable[tuple[str, bytes | str | None, str | None]]
    ) -> tuple[np.ndarray, list[str | None]]:
        """:func:`decode_rows` by this model's input contract."""
        return decode_rows(items, self.info.input)

    def predict_pixels(
        self, pixels: np.ndarray, errors: Sequence[str | None] | None = None
    ) -> list[dict[str, Any]]:
        """Resized uint8 pixels (N, 3, S, S) -> ``{"labels", "scores", "error"}`` per row; rows with
        an error are not run through the network."""
        errors = list(errors) if errors is not None else [None] * len(pixels)
        good = [i for i, error in enumerate(errors) if error is None]
        rows: list[dict[str, Any]] = [{"labels": [], "scores": [], "error": error} for error in errors]
        if good:
            logits = self.logits(pixels[good]).astype(np.float64)
            scores = 1.0 / (1.0 + np.exp(-logits))
            for i, row_scores, row_labels in zip(good, scores, self.labels(logits), strict=True):
                rows[i] = {"labels": row_labels, "scores": [float(v) for v in row_scores], "error": None}
        return rows

    def predict_encoded(
        self, items: Iterable[tuple[str, bytes | str | None, str | None]]
    ) -> list[dict[str, Any]]:
        """``(name, data, path)`` rows -> ``{"labels", "scores", "error"}`` per row, in order.

        ``data`` (bytes or base64 text) wins; else the image is read from ``path``. A row that
        cannot be read or decoded gets its ``error`` and no labels; the others are scored. Rows
        are decoded a batch at a time: a large request holds one batch of pixels, not all of them.
        """
        rows: list[dict[str, Any]] = []
        items = iter(items)
        while chunk := list(itertools.islice(items, max(1, self.batch_size))):
            rows += self.predict_pixels(*self.decode(chunk))
        return rows
