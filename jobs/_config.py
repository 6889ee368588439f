"""Typed job configs and the command line generated from them.

Every job declares one dataclass; :func:`parse_config` builds the argparse parser from its
fields (help text from ``field(metadata={"help": ...})``), applies an optional YAML preset
(``--config``) and lets every flag override it.

A job config may be composed of component dataclasses (the training job: model, optimisation,
augmentation, data, scaling, run), the way torchtitan composes its job config. A field whose type
is a dataclass is a component: its fields become flags of their own, flat (``--lr``, not
``--optim.lr``), named after the field or its ``metadata["flag"]``; presets use the same flat
names. Flag names are unique across a job's components.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

PRESETS_DIR = Path(__file__).parent / "presets"


def check_at_least(config: Any, minimum: float, *fields: str) -> None:
    """Refuse a config whose numeric ``fields`` (their flags: ``_`` is ``-``) are below ``minimum``;
    ``None`` (unset) passes. Call it from a config's ``__post_init__``."""
    from mltr.errors import ConfigError

    for name in fields:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value:g}")


def opt(
    default: Any, help: str = "", flag: str | None = None, positional: bool = False, **kwargs: Any
) -> Any:
    """A dataclass field with help text (and optionally another flag name) for the generated CLI.

    ``positional``: a tuple field filled by the command line's positional arguments (``INPUTS...``).
    """
    metadata = {
        "help": help,
        **({"flag": flag} if flag else {}),
        **({"positional": True} if positional else {}),
    }
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def component(cls: type) -> Any:
    """A field holding a component config (its fields become the job's flags); defaults to ``cls()``."""
    return dataclasses.field(default_factory=cls)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One flag: a non-component field of the job config or of one of its components."""

    flag: str  # its name with underscores: "--crop-min-scale" is "crop_min_scale"
    field: dataclasses.Field
    type: Any  # the field's resolved type


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", f.name)


def _leaves(cls: type) -> list[_Leaf]:
    hints = typing.get_type_hints(cls)
    out: list[_Leaf] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp)
        else:
            out.append(_Leaf(_flag(f), f, tp))
    seen: dict[str, int] = {}
    for leaf in out:
        seen[leaf.flag] = seen.get(leaf.flag, 0) + 1
    clashes = sorted(name for name, n in seen.items() if n > 1)
    if clashes:
        raise TypeError(f"{cls.__name__}: flag names used by more than one field: {', '.join(clashes)}")
    return out


def from_flat(cls: type[T], values: dict[str, Any]) -> T:
    """Build ``cls`` (components included) from flat flag-named values; missing ones keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = from_flat(hints[f.name], values)
        elif _flag(f) in values:
            kwargs[f.name] = values[_flag(f)]
    return cls(**kwargs)


def _flat(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value))
        else:
            out[_flag(f)] = value
    return out


def replace_flat(config: T, **values: Any) -> T:
    """A copy of ``config`` with some flat flag-named values changed: ``replace_flat(cfg, epochs=3)``."""
    unknown = sorted(set(values) - {leaf.flag for leaf in _leaves(type(config))})
    if unknown:
        raise TypeError(f"{type(config).__name__} has no flag(s) {', '.join(unknown)}")
    return from_flat(type(config), {**_flat(config), **values})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def finite_float(text: Any) -> float:
    """A float flag's value: any number but NaN and the infinities, which no flag means (a NaN
    compares false with every bound, so it would pass the range checks and poison the run)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


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
    if tp is float:
        return finite_float, None
    if tp in (str, int):
        return tp, None
    raise TypeError(f"unsupported config field type: {tp!r}")


def _coerce(leaf: _Leaf, value: Any) -> Any:
    """Convert a YAML value to the field's type as its flag would (lists become tuples; YAML 1.1
    reads ``1e-4`` as a string, which a float field takes as the number); ``ValueError`` says why not."""
    tp, _ = _unwrap_optional(leaf.type)
    if value is None:
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if isinstance(value, (bool, dict, set)):
        raise ValueError(f"{value!r} is not a {getattr(tp, '__name__', tp)}")
    convert, choices = _converter(tp)
    if typing.get_origin(tp) in (tuple, list):
        items = value if isinstance(value, list) else [value]  # a lone value: a list of one
        text = value if isinstance(value, str) else ",".join(str(item) for item in items)
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:  # an item's own converter (finite_float) said no
            raise ValueError(str(exc)) from None
    if convert is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    try:
        converted = convert(value)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a {convert.__name__}") from None
    if choices and converted not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
    return converted


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
        help=f"YAML preset: a path, or a name: {PRESETS_DIR.name}/<job>/NAME.yaml (flags override it)",
    )
    for leaf in _leaves(cls):
        f = leaf.field
        tp, optional = _unwrap_optional(leaf.type)
        flag = "--" + leaf.flag.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # Defaults stay with the dataclass (SUPPRESS keeps unset flags out of the namespace, so a
        # preset can fill them); the help text still shows them.
        shown = f" (default: {default})" if default not in (None, "", ()) else ""
        kwargs: dict[str, Any] = {
            "dest": leaf.flag,
            "help": f.metadata.get("help", "") + shown,
            "default": argparse.SUPPRESS,
        }
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            parser.add_argument(leaf.flag, nargs="*", metavar=leaf.flag.upper(), **kwargs)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            conv, choices = _converter(tp)
            kwargs["type"] = conv
            if choices:
                kwargs["choices"] = choices
            if optional:
                kwargs["metavar"] = leaf.flag.upper()
            parser.add_argument(flag, **kwargs)
    return parser


class PresetError(ValueError):
    """A preset that cannot be found or read; the message names it."""


def _load_preset(spec: str, job: str | None, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(spec)
    if not path.is_file():
        folder = PRESETS_DIR / job if job else PRESETS_DIR
        candidate = folder / (spec if spec.endswith((".yaml", ".yml")) else f"{spec}.yaml")
        if not candidate.is_file():
            raise PresetError(f"config preset {spec!r} not found (looked for {path} and {candidate})")
        path = candidate
    if str(path.resolve()) in seen:
        raise PresetError(f"{path}: extends itself (through {' -> '.join(seen)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)  # YAML's own message spans lines and draws a caret
        detail = f"{getattr(exc, 'problem', None) or exc}" + (f" at line {where.line + 1}" if where else "")
        raise PresetError(f"{path}: not a readable YAML preset: {' '.join(detail.split())}") from None
    if not isinstance(data, dict):
        raise PresetError(f"{path}: a preset must be a mapping of field names to values")
    base = data.pop("extends", None)  # another preset, "<job>/<name>": its values, these on top
    if base is not None:
        job_name, _, name = str(base).partition("/")
        if not (job_name and name):
            raise PresetError(f"{path}: extends: {base!r} must name a preset as <job>/<name> (train/coco)")
        data = {**_load_preset(name, job_name, (*seen, str(path.resolve()))), **data}
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
    leaves = {leaf.flag: leaf for leaf in _leaves(cls)}
    if preset:
        try:
            loaded = _load_preset(preset, job)
        except PresetError as exc:
            parser.error(str(exc))
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in leaves:
                parser.error(f"preset {preset!r}: unknown field {key!r} (known: {', '.join(sorted(leaves))})")
            try:
                values[name] = _coerce(leaves[name], value)
            except ValueError as exc:
                parser.error(f"preset {preset!r}: {key}: {exc}")
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    try:
        return from_flat(cls, values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def to_dict(config: Any) -> dict[str, Any]:
    """A flat JSON-able dict of a config, keyed by flag name (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _flat(config).items()}
