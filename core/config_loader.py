"""Typed config from YAML: load a recipe into dataclasses, apply `--set a.b=c` overrides, and
report every mistake as one `ConfigError` that names the key, the value and the fix.

The loader is generic: it walks the dataclass fields, so adding a config field means adding one
line to `core/config.py` and nothing here. YAML is read with `yaml.safe_load` (no object tags).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A recipe mistake. `str(err)` is a complete message for the user (no traceback needed)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error at '{key}': {message}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where lossless (int -> float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, f"got {value!r}; expected {' or '.join(_type_name(o) for o in options)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"got {value!r}; choose one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"got {value!r}; expected a list")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}; expected a mapping of {tp.__name__} fields")
        return build(tp, value, prefix=key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(key, f"got {value!r} ({type(value).__name__}); expected {tp.__name__}")
    return value


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the nearest valid name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"valid keys: {', '.join(names)}"
            raise ConfigError(prefix + str(key), f"unknown key; {hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    path, raw = text.split("=", 1)
    return path.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_path(data: dict, dotted: str, value: Any) -> dict:
    """data["a"]["b"] = value for dotted "a.b", creating sections as needed."""
    path = dotted.strip().split(".")
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
    node[path[-1]] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        set_path(data, ".".join(path), value)
    return data


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError("recipe", f"file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError("recipe", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("recipe", f"{path} must be a mapping of sections")
    return data


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
