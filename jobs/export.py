"""Export a model's network to ONNX, checked against PyTorch on real decoded images.

    mltr export --model models:/mltr-coco@champion --format onnx --out mltr-coco.onnx --data ./datasets/coco
    mltr export --model runs:/0123.../model --out model.onnx photo1.jpg photo2.png

The ONNX graph is the network: input ``images`` float32 (batch, 3, S, S) preprocessed by the
model's input contract (decode to RGB, resize, ``(x / 255 - mean) / std``), output ``logits``
(batch, classes), batch size dynamic. It is exported with torch's dynamo exporter, then run with
onnxruntime on real images (``--data``'s split, or the images given) beside PyTorch: the largest
absolute difference of the logits is printed and must be at most ``--atol``. The classes,
thresholds and input contract go into the ONNX metadata and into ``<out>.json``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs._config import check_at_least, component, opt, parse_config
from jobs._models import (
    MODEL_URI_SCHEMES,
    TrackingArgs,
    check_class_names,
    checkpoint_data,
    load_predictor,
)
from jobs._runtime import run_job, setup_logging
from mltr.errors import ConfigError, MltrError
from mltr.paths import check_out_file, replace_durably
from mltr.serving import ImageError, decode_image, read_image_bytes, resize_image

log = logging.getLogger("jobs.export")


class ExportMismatch(MltrError):
    """The exported graph does not compute what the PyTorch network computes."""


@dataclass(frozen=True)
class ExportConfig:
    """Which model, to which format and file, checked on which images."""

    model: str | None = opt(
        None, "models:/NAME@alias, models:/NAME/N, runs:/ID/model, or a checkpoint folder"
    )
    format: str = opt("onnx", "export format (onnx)")
    out: str | None = opt(None, "the file to write")
    data: str | None = opt(None, "a converted dataset: check on images of its --split (and its classes)")
    split: str = opt("val", "the split of --data to check on")
    images: tuple[str, ...] = opt((), "image files to check on (instead of --data)", positional=True)
    check_images: int = opt(16, "at most this many images in the check")
    atol: float = opt(1e-4, "the largest absolute difference of the logits accepted")
    opset: int | None = opt(None, "ONNX opset (default: the exporter's)")
    tracking: TrackingArgs = component(TrackingArgs)

    def __post_init__(self):
        check_at_least(self, 1, "check_images", "opset")
        check_at_least(self, 0, "atol")


def check_images(config: ExportConfig, classes: Sequence[str]) -> list:
    """Decoded RGB uint8 images to check the export on: ``--data``'s split (the model must
    predict its ``classes``), or the files given."""
    images = []
    if config.data:
        from pipeline.dataset import load_manifest

        manifest = load_manifest(config.data)
        check_class_names(classes, manifest, config.model)
        for batch in manifest.iter_batches(config.split, ["image_id", "image"], config.check_images):
            rows = batch.to_pydict()
            images += [decode_image(d, str(i)) for i, d in zip(rows["image_id"], rows["image"], strict=True)]
            if len(images) >= config.check_images:
                break
        images = images[: config.check_images]
    for path in config.images[: config.check_images]:
        try:
            images.append(decode_image(read_image_bytes(path), path))
        except ImageError as exc:
            print(f"export: skipped {exc}", file=sys.stderr)
    if len(images) < 2:
        raise ConfigError(
            "the export is checked on real images: give --data DATASET or at least two image files"
        )
    return images


def export_onnx(network, example, out: Path, opset: int | None = None) -> float:
    """Export ``network`` with a dynamic batch dimension; returns the seconds it took."""
    import torch

    started = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=4096)
    kwargs = {"opset_version": opset} if opset else {}
    torch.onnx.export(
        network,
        (example,),
        str(out),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        external_data=False,  # one file: the weights of every variant fit in ONNX's 2 GB
        verbose=False,
        **kwargs,
    )
    return time.perf_counter() - started


def run(config: ExportConfig) -> dict:
    if config.format != "onnx":
        raise ConfigError(f"--format {config.format!r}: only onnx is supported")
    if not config.model or not config.out:
        raise ConfigError("--model and --out are required")
    # Checked before the export, not at its rename.
    out = check_out_file(config.out, "--out", "the ONNX file is written to a local path; copy it from there")
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the export extra: pip install 'mltr[export]' ({exc})") from None
    import torch

    data = checkpoint_data(config.model, config.data, "--data")
    client = config.tracking.client() if config.model.startswith(MODEL_URI_SCHEMES) else None
    predictor = load_predictor(config.model, client, data)
    predictor.model.to("cpu")
    predictor.device = torch.device("cpu")
    images = check_images(config, predictor.info.classes)
    pixels = np.stack([resize_image(image, predictor.info.input).numpy() for image in images])
    inputs = predictor.inputs(pixels)  # float32 (N, 3, S, S): the input contract
    out.parent.mkdir(parents=True, exist_ok=True)
    # Exported and checked beside --out, then moved over it: an export that fails its check leaves
    # an earlier one (and its .json) as they were.
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    seconds = export_onnx(predictor.model.eval(), inputs[:2], partial, config.opset)

    info = predictor.info.to_json()
    model_proto = onnx.load(str(partial))
    for key, value in (("mltr.model_info", json.dumps(info)), ("mltr.source", config.model)):
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model_proto, str(partial))

    # The check: all the images in one batch (not the traced batch size), PyTorch vs onnxruntime.
    with torch.no_grad():
        expected = predictor.model(inputs).numpy()
    session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": inputs.numpy()})[0]
    diff = float(np.abs(got - expected).max())
    print(
        f"exported {config.model} ({partial.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s); "
        f"onnxruntime vs PyTorch on {len(images)} images: max abs difference of the logits {diff:.2e}",
        flush=True,
    )
    if not diff <= config.atol:
        raise ExportMismatch(
            f"{partial}: onnxruntime's logits differ from PyTorch's by {diff:.3g} > --atol {config.atol:g}; "
            f"{out} is as it was"
        )
    Path(f"{partial}.json").write_text(json.dumps(info, indent=1))
    replace_durably(partial, out)
    replace_durably(f"{partial}.json", f"{out}.json")
    print(f"wrote {out} and {out}.json", flush=True)
    return {
        "model": config.model,
        "out": str(out),
        "format": "onnx",
        "check_images": len(images),
        "max_abs_diff": diff,
        "atol": config.atol,
        "export_s": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for noisy in ("onnx_ir", "onnxscript"):  # a line per graph pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config = parse_config(ExportConfig, argv, prog="mltr export", job="export")
    return run_job("export", lambda: run(config))


if __name__ == "__main__":
    sys.exit(main())
