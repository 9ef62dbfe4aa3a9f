"""Typed configs: YAML files loaded into frozen dataclasses that fail loudly.

One loader for every config in the project (stage configs, pipeline presets, model sizes). An unknown or
misspelled key, a wrong type or a missing required value raises `ConfigError` naming the file, the dotted
key and what was expected (torchtitan's `training.stpes` lesson). Dotted overrides (`capfilt.threshold=0.6`)
are the only other input. The resolved config and its hash are stored with every output (`config_hash`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value that cannot be accepted; the message names file, key and expectation.

    `key` (dotted) and `detail` (the message without its origin) let `load_config` blame a `--set` override
    instead of the file when the bad value came from the command line.
    """

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.detail = detail if detail is not None else message


class RangeError(ValueError):
    """A value out of range in `__post_init__` (`check_range`); `key` lets `build` name the dotted key."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _config_error(origin: str, key: str | None, detail: str) -> ConfigError:
    return ConfigError(f"{origin}: {detail}", key=key, detail=detail)


def load_config(cls: type[T], source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                origin: str | None = None) -> T:  # fmt: skip
    """Load `source` (a YAML path or a plain dict) into the frozen dataclass `cls`.

    `overrides` are `dotted.key=value` strings; values are parsed as YAML scalars (`0.5`, `true`, `[1,2]`).
    `origin` names a dict's file in messages (a salesforce/BLIP config read as ours).
    """
    if isinstance(source, dict):
        origin, raw = origin or "<dict>", copy.deepcopy(source)
    else:
        origin = str(source)
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{origin}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{origin}: not valid YAML: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, origin)
    try:
        return build(cls, raw, origin=origin)
    except ConfigError as error:
        override = _override_for(error.key, overrides)
        if override is None:
            raise
        # The bad value was typed on the command line: naming only the file would send the user to the wrong place.
        raise ConfigError(f"--set {override} (applied to {origin}): {error.detail}", key=error.key,
                          detail=error.detail) from None


def build(cls: type[T], raw: dict[str, Any], *, origin: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise _config_error(origin, prefix or None,
                            f"'{prefix or '<root>'}' expected a mapping for {cls.__name__}, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = get_type_hints(cls)
    unknown = [key for key in raw if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{_join(prefix, close[0])}'?" if close else ""
        raise _config_error(origin, _join(prefix, str(key)),
                            f"unknown key '{_join(prefix, str(key))}'{hint} (valid keys: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = _join(prefix, name)
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], origin, dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise _config_error(origin, dotted, f"missing required key '{dotted}' ({_describe(hints[name])})")
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        key = _join(prefix, error.key) if isinstance(error, RangeError) else None
        raise _config_error(origin, key, f"{prefix or cls.__name__}: {error}") from error


def _default(field: dataclasses.Field) -> Any:
    if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def to_dict(config: Any, hashing: bool = False) -> Any:
    """Plain JSON-able form of a config (dataclasses -> dicts, tuples -> lists, Paths -> str). `hashing`: the form
    `config_hash` hashes, without the fields a config class lists in `ADDED_LATER` while they hold their default."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        added_later = getattr(type(config), "ADDED_LATER", ()) if hashing else ()
        return {f.name: to_dict(getattr(config, f.name), hashing) for f in dataclasses.fields(config)
                if not (f.name in added_later and getattr(config, f.name) == _default(f))}  # fmt: skip
    if isinstance(config, (list, tuple)):
        return [to_dict(item, hashing) for item in config]
    if isinstance(config, dict):
        return {str(key): to_dict(value, hashing) for key, value in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def config_hash(config: Any, leave_out: tuple[str, ...] = ()) -> str:
    """sha256 of the canonical JSON form of a config (first 16 hex digits), without the `leave_out` keys
    (dotted: "data.shard_cache_dir"). A config class's `ADDED_LATER` fields (settings added after versions were
    published with it) are left out while at their default: those versions' hashes, so their cache keys, stay."""
    plain = to_dict(config, hashing=True)
    for dotted in leave_out:
        *parents, name = dotted.split(".")
        owner = plain
        for parent in parents:
            owner = owner.get(parent, {}) if isinstance(owner, dict) else {}
        if isinstance(owner, dict):
            owner.pop(name, None)
    canonical = json.dumps(plain, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_range(owner: str, name: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """Range check for __post_init__: raises ValueError (RangeError) naming the key."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise RangeError(f"'{name}' = {value!r} is out of range {bounds}", name)


# ---------------------------------------------------------------------------------------------- internals


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (tuple, list):
        args = get_args(tp)
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        return f"a mapping of {_describe(key_tp)} to {_describe(value_tp)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, origin: str, dotted: str) -> Any:
    def fail() -> typing.NoReturn:
        raise _config_error(origin, dotted, f"key '{dotted}' expected {_describe(tp)}, got {value!r}")

    if tp is Any:
        return value
    kind = get_origin(tp)
    if kind in (Union, types.UnionType):
        errors = []
        for option in get_args(tp):
            try:
                return _coerce(option, value, origin, dotted)
            except ConfigError as error:
                errors.append(error)
        fail()
    if tp is type(None):
        if value is None:
            return None
        fail()
    if kind is Literal:
        if value in get_args(tp):
            return value
        fail()
    if dataclasses.is_dataclass(tp):
        return build(tp, value, origin=origin, prefix=dotted)
    if kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail()
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, item, origin, f"{dotted}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if kind is tuple else items
    if kind is dict:
        if not isinstance(value, dict):
            fail()
        key_tp, value_tp = get_args(tp)
        return {
            _coerce(key_tp, key, origin, f"{dotted}.{key}"): _coerce(value_tp, item, origin, f"{dotted}.{key}")
            for key, item in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_WITHOUT_DOT.fullmatch(value.strip()):
            return float(value)  # `lr: 1e-4` / `--set optim.lr=1e-4`: YAML 1.1 reads a float without a dot as text
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        fail()
    if isinstance(value, tp):
        return value
    fail()


# A number in exponent notation without a decimal point ("1e-4", "5E3"), which YAML 1.1 (PyYAML) leaves a string.
_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _override_for(key: str | None, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The `--set` override that gave `key` its value (the last one wins, as when applied), if any."""
    if key is None:
        return None
    for override in reversed(overrides):
        dotted = override.split("=", 1)[0].strip()
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
            return override
    return None


def _apply_override(raw: dict[str, Any], override: str, origin: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r} (applied to {origin}): must look like key.path=value")
    dotted, text = override.split("=", 1)
    node = raw
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override} (applied to {origin}): '{part}' is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(text)
