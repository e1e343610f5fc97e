"""Generic config schema: dataclasses built from YAML mappings, with every error naming its dotted key.

`from_dict(cls, mapping, prefix)` builds a (nested) dataclass, checking each value against the field's type hint
(`coerce`). Its errors are `ConfigKeyError`s, which carry the key as data (`path`) apart from the problem: a
validator of an enclosing section names its own key with `under`, so `objective.beta: must be > 0` and
`reference.of.kind: ...` are built from parts, never by editing a message. Everything that validates a section uses
it: recipes (`align.config`), objectives, reference kinds, targets, reward-model recipes, best-of-n studies. It imports
nothing of align but the errors, so every one of them can import it at the top.
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


class ConfigKeyError(ConfigError):
    """A `ConfigError` about one key: `path` (the dotted key's parts) and `problem`, shown as "a.b: problem".

    `joiner` is what stands between key and problem: ": " for a statement about the key ("model.dtype: expected a
    string"), " " where the problem continues a sentence whose subject is the key ("objective.beta must be > 0")."""

    def __init__(self, path: str | tuple[str, ...], problem: str, joiner: str = ": "):
        self.path = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
        self.problem, self.joiner = problem, joiner
        super().__init__(f"{'.'.join(self.path)}{joiner}{problem}")

    def __reduce__(self):  # pickled by its parts (the default would call __init__ with the message alone)
        return type(self), (self.path, self.problem, self.joiner)

    def under(self, *outer: str) -> ConfigKeyError:
        """The same error one or more sections further out: `ConfigKeyError("beta", ...).under("objective")` names
        `objective.beta`."""
        return ConfigKeyError((*outer, *self.path), self.problem, self.joiner)


def key_path(prefix: str) -> tuple[str, ...]:
    """A dotted prefix ("reference.of." or "") as path parts."""
    return tuple(part for part in prefix.split(".") if part)


# --- generic dataclass validation --------------------------------------------------------------------------------


@functools.cache
def type_hints(cls) -> dict[str, Any]:
    """The resolved type hints of `cls`, cached; {} when a forward reference cannot be resolved (no type checks)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {}


def from_dict(cls, data: Any, prefix: str = "", owner: str | None = None):
    """Builds dataclass `cls` from a mapping, naming the dotted key of any unknown key or wrongly typed value.

    `prefix` is the dotted key of the mapping ("objective."), `owner` names what the keys belong to in the
    unknown-key message (e.g. "reference kind 'frozen'")."""
    return _from_dict(cls, data, key_path(prefix), owner)


def _from_dict(cls, data: Any, path: tuple[str, ...], owner: str | None = None):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem = f"expected a mapping, got {type(data).__name__}"
        raise ConfigKeyError(path, problem) if path else ConfigError(f"config: {problem}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            of = f" of {owner}" if owner else ""
            raise ConfigKeyError((*path, key), f"unknown key{of} (known: {', '.join(fields) or 'none'})")
        kwargs[key] = coerce(value, hints.get(key, Any), (*path, key))
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigKeyError((*path, missing[0]), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigKeyError as e:
        # A __post_init__ names its keys relative to its own mapping (`beta`), or in full where the dataclass knows
        # where it lives (DataConfig is always `data`; a section it validates itself under a full prefix, like
        # precomputed's `reference.of.`): a key already under this mapping's is complete.
        if e.path[:len(path)] == path:
            raise
        raise e.under(*path) from None
    except ConfigError as e:
        raise _post_init_error(str(e), fields, path) from None


def _post_init_error(message: str, fields, path: tuple[str, ...]) -> ConfigError:
    """A plain `ConfigError` from a `__post_init__` (one that does not carry its key as a ConfigKeyError), whose
    message starts with the field it is about ("beta must be > 0", "num_samples: must be >= 1"), as a ConfigKeyError
    under `path`; one that names no field is about the mapping as a whole ("objective: ...")."""
    if path and message.startswith(".".join(path) + "."):
        return ConfigError(message)  # names its key in full already ("data.train: ...", "reference.of.kind: ...")
    field_name, joiner, problem = re.match(r"([^\s:'\"]*)(:?\s?)(.*)", message, re.S).groups()
    if field_name in fields:
        return ConfigKeyError((*path, field_name), problem, joiner)
    return ConfigKeyError(path, message) if path else ConfigError(f"config: {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: tuple[str, ...]) -> Any:
    """`value` checked against type hint `tp` (and converted where the hint says: enums, nested dataclasses); a
    ConfigKeyError names `path` when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigKeyError(path, "must not be null")
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the real problem (e.g. model.lora.rank)
            return coerce(value, options[0], path)
        for arg in options:
            try:
                return coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigKeyError(path, f"expected {' or '.join(_type_name(a) for a in args if a is not type(None))}, "
                                   f"got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigKeyError(path, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigKeyError(path, f"expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigKeyError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigKeyError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return value  # an int stays an int: some fields (warmup_steps) read 5 and 0.1 differently
    if tp is str:
        if not isinstance(value, str):
            raise ConfigKeyError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigKeyError(path, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args and origin is list else Any
        return [coerce(v, item_tp, (*path[:-1], f"{path[-1]}[{i}]")) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigKeyError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigKeyError(path, f"must be one of {[m.value for m in tp]}, got {value!r}") from None
    return value


