"""Typed job configs and the command line generated from them.

Every job declares one dataclass; :func:`parse_config` builds the argparse parser from its
fields (help text from ``field(metadata={"help": ...})``), applies an optional YAML preset
(``--config``) and lets every flag override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

PRESETS_DIR = Path(__file__).parent / "presets"


def opt(default: Any, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text for the generated CLI."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    """Return (argparse type callable, choices) for a field type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices
    if origin in (tuple, list):
        (item, *_rest) = typing.get_args(tp) or (str,)
        item_type, _ = _converter(item)

        def parse_list(text: str):
            return tuple(item_type(part.strip()) for part in text.split(",") if part.strip())

        return parse_list, None
    if tp in (str, int, float):
        return tp, None
    raise TypeError(f"unsupported config field type: {tp!r}")


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert a YAML value to the field's type (lists become tuples)."""
    tp, _ = _unwrap_optional(typing.get_type_hints(cls)[name])
    if value is None:
        return None
    if typing.get_origin(tp) in (tuple, list):
        if isinstance(value, str):
            return _converter(tp)[0](value)
        return tuple(value)
    return value


def build_parser(
    cls: type, prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().splitlines()[0],
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML preset: a path, or the name of a file in {PRESETS_DIR.name}/ (flags override it)",
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # Defaults stay with the dataclass (SUPPRESS keeps unset flags out of the namespace, so a
        # preset can fill them); the help text still shows them.
        shown = f" (default: {default})" if default not in (None, "", ()) else ""
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": f.metadata.get("help", "") + shown,
            "default": argparse.SUPPRESS,
        }
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            conv, choices = _converter(tp)
            kwargs["type"] = conv
            if choices:
                kwargs["choices"] = choices
            if optional:
                kwargs["metavar"] = f.name.upper()
            parser.add_argument(flag, **kwargs)
    return parser


def _load_preset(spec: str, job: str | None) -> dict[str, Any]:
    path = Path(spec)
    if not path.exists():
        folder = PRESETS_DIR / job if job else PRESETS_DIR
        candidate = folder / (spec if spec.endswith((".yaml", ".yml")) else f"{spec}.yaml")
        if not candidate.exists():
            raise SystemExit(f"error: config preset {spec!r} not found (looked for {path} and {candidate})")
        path = candidate
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: a preset must be a mapping of field names to values")
    return data


def parse_config(
    cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None, job: str | None = None
) -> T:
    """Parse ``argv`` into an instance of the dataclass ``cls``: defaults < ``--config`` preset < flags.

    ``--config NAME`` finds ``presets/<job>/NAME.yaml`` beside the jobs; a path works too.
    """
    parser = build_parser(cls, prog=prog)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    preset = args.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if preset:
        for key, value in _load_preset(preset, job).items():
            name = key.replace("-", "_")
            if name not in names:
                parser.error(f"preset {preset!r}: unknown field {key!r} (known: {', '.join(sorted(names))})")
            values[name] = _coerce(cls, name, value)
    values.update(args)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def to_dict(config: Any) -> dict[str, Any]:
    """A flat JSON-able dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
