"""Typed configs: frozen dataclasses are the schema, YAML files are the instances.

Every stage config is a frozen dataclass whose fields are scalars, tuples or nested frozen
dataclasses. `from_dict` builds one from plain data (a parsed YAML file, or `to_dict` output
sent across a Ray boundary), rejecting unknown keys with the list of valid ones and naming
the dotted key of every bad value. `apply_overrides` applies `--set a.b=v` strings with the
same rules, so the CLI, Tune search spaces and tests all go through one path.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from lofi.errors import LofiError

C = TypeVar("C")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(LofiError, ValueError):
    """A config value or key is wrong; the message names the dotted key and the fix."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check and convert one value to the annotated type; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors: list[tuple[Any, ConfigError]] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append((option, err))
        # A mapping was meant as a section: its own error (an unknown key, a bad value) is the
        # useful one, not "matches none of".
        sections = [err for option, err in errors if dataclasses.is_dataclass(option)]
        if isinstance(value, dict) and len(sections) == 1:
            raise sections[0]
        if len(errors) == 1:
            raise errors[0][1]
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping) for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build the dataclass `cls` from plain data, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            value = data[name]
            default = _default(field)
            if isinstance(value, dict) and dataclasses.is_dataclass(default):
                # A section given in part keeps the rest of its default (which may differ
                # from the section class's own defaults, e.g. pretrain's learning rate).
                value = _merge(to_dict(default), value)
            kwargs[name] = _coerce(value, hints[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing; add it to the config or --set {prefix}{name}=...")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (lists for tuples), safe for YAML, JSON and Ray object transfer."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: the form used for MLflow params and Tune keys."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of `data` with the dotted key set, creating sections as needed."""
    out = dict(data)
    head, _, rest = dotted.partition(".")
    if not head:
        raise ConfigError(f"empty key in override {dotted!r}; write --set section.key=value")
    if rest:
        child = out.get(head, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{head} is a value, not a section; cannot set {dotted}")
        out[head] = set_path(child, rest, value)
    else:
        out[head] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str | tuple[str, Any]]) -> dict[str, Any]:
    """Apply `key.path=value` strings (value parsed as YAML) or `(key, value)` pairs."""
    for item in overrides:
        if isinstance(item, str):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} has no '='; write --set {item}=VALUE")
            value = yaml.safe_load(raw) if raw.strip() else ""
        else:
            key, value = item
        data = set_path(data, key.strip(), value)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Iterable = ()) -> C:
    """Defaults of `cls`, then the YAML file (if any), then the overrides, validated once."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{err}") from None


def replace(cfg: C, overrides: typing.Iterable = ()) -> C:
    """A validated copy of `cfg` with overrides applied (used by Tune trials and tests)."""
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), overrides))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
