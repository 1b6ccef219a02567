"""One dataclass per command: its defaults are the shipped recipe, wherever a command runs.

A command's configuration is those defaults, then an optional TOML file of overrides (`--config`; its tables
are only for reading, keys are flat), then `--set key=value`. `config_toml` writes a resolved configuration
back as TOML (`--print-config`), grouped into the tables a dataclass names in its `SECTIONS`, and a file it
writes loads back to the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from toolrl_analysis.errors import ConfigError

T = TypeVar("T")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a TOML or command-line value to the field's declared type, or raise naming the key."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or value == "none":
            return None
        return _coerce(key, value, args[0])
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        if isinstance(value, str):
            value = _list_text(key, value)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' must be {annotation.__name__}, got {value!r}") from None
    return value


def _list_text(key: str, text: str) -> list[Any]:
    """A list given on the command line: `a,b,c` or TOML's `[a, b, c]` (strings in brackets need quotes)."""
    text = text.strip()
    if text.startswith("["):
        try:
            return list(tomllib.loads(f"value = {text}")["value"])
        except tomllib.TOMLDecodeError:
            raise ConfigError(
                f"config key '{key}': {text!r} is not a list; write a,b,c or [a, b, c] (quote strings in brackets)"
            ) from None
    return [v.strip() for v in text.split(",") if v.strip() != ""]


def build_config(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Instantiate `cls` from a flat dict, rejecting unknown keys and running its `validate()`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{unknown[0]}' in {source} (known: {', '.join(sorted(names))})"
        )
    config = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `path` (TOML; tables are flattened with their keys kept as-is) then apply `key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (TOML files are UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        for key, value in data.items():
            if isinstance(value, dict):
                values.update(value)
            else:
                values[key] = value
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value")
        values[key.strip()] = value.strip()
    return build_config(cls, values, source=str(path) if path else "overrides")


def config_toml(config: Any, table: str | None = None) -> str:
    """`config` as TOML: one table per entry of its class's `SECTIONS` (or `[table]` with the sections as
    comments, for one stage of a larger document). Loading the text with `load_config` gives `config` back."""
    values = dataclasses.asdict(config)
    sections: dict[str, tuple[str, ...]] = getattr(type(config), "SECTIONS", {"": tuple(values)})
    lines = [f"[{table}]"] if table else []
    for section, keys in sections.items():
        if section:
            lines.append(f"# -- {section}" if table else f"[{section}]")
        lines += [f"{key} = {toml_value(values[key])}" for key in keys]
        if not table:
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def toml_value(value: Any) -> str:
    """One TOML value; None (an unset optional key) is written as "none", which the loader reads back."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def require(condition: bool, key: str, message: str) -> None:
    """Validation helper for `validate()` methods: raise a ConfigError naming `key`."""
    if not condition:
        raise ConfigError(f"config key '{key}' {message}")
