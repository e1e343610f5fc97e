"""Generic config schema: dataclasses built from YAML mappings, with every error naming its dotted key.

`from_dict(cls, mapping, prefix)` builds a (nested) dataclass, checking each value against the field's type hint
(`_coerce`) and turning a `ConfigError` raised by a `__post_init__` into one that names the dotted key
(`objective.beta: must be > 0`). Everything that validates a section uses it: recipes (`align.config`), reference
kinds, targets, reward-model recipes, best-of-n studies. It imports nothing of align but the errors.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import types
import typing
from typing import Any

from align.errors import ConfigError


# --- generic dataclass validation --------------------------------------------------------------------------------


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: fall back to no type checks for that class
        return {}


def from_dict(cls, data: Any, prefix: str = "", owner: str | None = None):
    """Builds dataclass `cls` from a mapping, naming the dotted key of any unknown key or wrongly typed value.

    `owner` names what the keys belong to in the unknown-key message (e.g. "reference kind 'frozen'")."""
    section = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            of = f" of {owner}" if owner else ""
            raise ConfigError(f"{prefix}{key}: unknown key{of} (known: {', '.join(fields) or 'none'})")
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{prefix}{key}")
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        message = str(e)
        if prefix and message.startswith(prefix):
            raise
        # "beta must be > 0" from a __post_init__ names its field: make that the dotted key (objective.beta ...).
        first_word = re.split(r"[\s:'\"]", message, maxsplit=1)[0]
        raise ConfigError(f"{prefix}{message}" if first_word in fields else f"{section}: {message}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the real problem (e.g. model.lora.rank)
            return _coerce(value, options[0], key)
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, "
                          f"got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return value  # an int stays an int: some fields (warmup_steps) read 5 and 0.1 differently
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args and origin is list else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}: must be one of {[m.value for m in tp]}, got {value!r}") from None
    return value


