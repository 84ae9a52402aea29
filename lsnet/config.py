"""Strict construction of (nested) config dataclasses from plain dicts / YAML.

A config is validated on load: an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the dotted key, e.g. ``model.head.num_convs: expected int, got 'three'``.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lsnet.errors import LsnetError

T = TypeVar("T")


class ConfigError(LsnetError, ValueError):
    """A config key is unknown, missing, has the wrong type or a value out of range.

    ``key``: the dotted key at fault when known (lets :func:`pipelines.config.load_config` name the
    ``_base_`` file that set it).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def check_range(value: float | None, name: str, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """Raise ``ValueError("NAME must be >= 1, got 0")`` when ``value`` (not None) is out of range.

    For dataclass ``__post_init__`` checks: :func:`from_dict` turns the error into a
    :class:`ConfigError` naming the dotted key (``train.epochs must be >= 1, got 0``).
    """
    if value is None:
        return
    bounds = [(ge, ">=", value >= ge if ge is not None else True), (gt, ">", value > gt if gt is not None else True),
              (le, "<=", value <= le if le is not None else True), (lt, "<", value < lt if lt is not None else True)]
    if not all(ok for _, _, ok in bounds):
        want = " and ".join(f"{op} {bound:g}" for bound, op, _ in bounds if bound is not None)
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_value(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}", key=key)
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}", key=key)
        return None
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}", key=key)
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}", key=key)
            return tuple(_check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        kt, vt = args if args else (Any, Any)
        return {_check_value(k, kt, key): _check_value(v, vt, f"{key}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}", key=key)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}", key=key)
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}", key=key)
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}", key=key)
    return value


def from_dict(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclass fields.

    Missing keys take the dataclass defaults; unknown keys and wrong types raise :class:`ConfigError`.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(known))})",
                          key=f"{where}{unknown[0]}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_value(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a required field is missing, or __post_init__ rejected a value
        if isinstance(err, ConfigError):
            raise
        message = str(err)
        field_name = re.split(r"[ .:\[]", message, maxsplit=1)[0]
        if prefix and field_name in known:  # "epochs must be >= 1" -> "train.epochs must be >= 1"
            raise ConfigError(f"{prefix}.{message}", key=f"{prefix}.{message.split(' ', 1)[0].rstrip(':')}") from None
        if prefix and message.startswith(f"{prefix}."):  # already names the dotted key
            raise ConfigError(message, key=message.split(" ", 1)[0].rstrip(":")) from None
        raise ConfigError(f"{prefix or cls.__name__}: {message}") from None


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists, for YAML)."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_yaml_mapping(path: str | Path, error_type: type[Exception] | None = None, kind: str = "YAML file",
                      missing_hint: str = "") -> dict:
    """The mapping at the top of a YAML file (an empty file is ``{}``), or ``error_type`` with one line
    naming the file and what is wrong. Shared by configs, search spaces, job and ablation specs.

    ``kind`` names the file in messages (``config file``, ``job spec``...); ``missing_hint`` is appended
    to the not-found message (e.g. the tables that do exist).
    """
    error_type = error_type or ConfigError
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error_type(f"{kind} not found: {path}{missing_hint}") from None
    except IsADirectoryError:
        raise error_type(f"{path}: is a directory, not a {kind}") from None
    except yaml.YAMLError as err:
        raise error_type(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error_type(f"{path}: a {kind} must be a mapping (its top level is a {type(data).__name__})")
    return data


def load_yaml(path: str | Path, origins: dict[str, Path] | None = None, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, with ``_base_: other.yaml`` (relative path) merged underneath.

    ``origins``, when given, is filled with dotted key -> the file that set it last (so an error
    about a key can name the ``_base_`` file that holds the typo).
    """
    path = Path(path)
    data = read_yaml_mapping(path, ConfigError, "config file",
                             missing_hint=f" (the _base_ of {_chain[-1]})" if _chain else "")
    base = data.pop("_base_", None)
    if origins is not None:  # this file's own keys override its bases': recorded after them below
        own_keys = _dotted_keys(data)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: _base_ must be one file name (a string), got {base!r}", key="_base_")
        base_path = path.parent / base
        resolved = [p.resolve() for p in (*_chain, path)]
        if base_path.resolve() in resolved:
            raise ConfigError(f"{path}: _base_ {base} includes itself (chain: "
                              f"{' -> '.join(str(p) for p in (*_chain, path, base_path))})", key="_base_")
        data = deep_merge(load_yaml(base_path, origins, (*_chain, path)), data)
    if origins is not None:
        origins.update(dict.fromkeys(own_keys, path))
    return data


def _dotted_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, dict):
            keys += _dotted_keys(value, name + ".")
    return keys


def origin_of(key: str | None, origins: dict[str, Path]) -> Path | None:
    """The file that set ``key`` or its nearest parent section (None when no file did)."""
    parts = (key or "").split(".")
    for n in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
