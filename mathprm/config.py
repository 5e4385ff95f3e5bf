"""Stage configs: one dataclass per stage, a YAML file that mirrors it, `key=value` overrides.

Every stage (data check, tree search, PRM training, PPO, serving) declares a dataclass and
validates itself in `__post_init__`. This module is the one place that turns YAML files and
command-line overrides into those dataclasses, with errors that name the offending field
instead of a TypeError from deep inside. It never touches the network and never exits.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass; the message names the field."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file, then `key=value` overrides (dotted keys for nested configs)."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(values, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return from_dict(cls, values)


def parse_args(cls: type[T], argv: list[str]) -> T:
    """The jobs' command line: `[--config FILE.yaml] [key=value ...]`.

    Every field can also be given GNU-style, `--field value` or `--field=value` (dashes in the
    name read as underscores: `--max-steps 10` sets `max_steps`). Later settings win.
    """
    path: str | None = None
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise ConfigError(describe(cls))
        elif arg.startswith("--") and len(arg) > 2:
            key, sep, value = arg[2:].partition("=")
            if not sep:
                value = next(it, None)
                if value is None or value.startswith("--"):
                    raise ConfigError(f"{arg} needs a value")
            overrides.append(f"{key.replace('-', '_')}={value}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE and key=value overrides")
    return load_config(cls, path, overrides)


def from_dict(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """Construct a dataclass from a plain dict, checking names and types field by field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config field {prefix + unknown[0]!r} for {cls.__name__}; known fields: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{cls.__name__}: {e}") from None
    except ValueError as e:  # raised by the dataclass's own __post_init__ validation
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{cls.__name__}: {prefix}{e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (what Ray Train's `train_loop_config` and Serve app `args` carry)."""
    return dataclasses.asdict(cfg)


def describe(cls: type) -> str:
    """A help text listing each field, its type and default."""
    hints = typing.get_type_hints(cls)
    lines = [f"{cls.__name__} fields (set with key=value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {default!r}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a nested config")
    node[last] = value


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check `value` against annotation `tp`, with the few conversions YAML needs (int -> float, scalar -> str)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"field {name!r}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"field {name!r}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, prefix=name + ".")
    if origin in (list, tuple):
        if isinstance(value, str):  # --strategies greedy,pass@16 (or one item: --strategies greedy)
            value = [yaml.safe_load(v) if v.strip() else "" for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"field {name!r}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"field {name!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"field {name!r}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"field {name!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 reads 2e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"field {name!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # YAML turns `seed_name=123` or `x=1e3` into numbers; a str field takes the text back.
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"field {name!r}: expected a string, got {value!r}")
        return value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")
