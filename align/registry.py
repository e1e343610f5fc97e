"""One registry helper for every pluggable kind of thing: objectives, divergences, references, rollout backends,
reward aggregations (and, next, f-DPG targets). A new method is one new file plus one `@REGISTRY.register(...)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from align.errors import ConfigError
from align.schema import ConfigKeyError


def normalise_name(name: str) -> str:
    """A user's spelling of a method name as registered: "Forward-KL " → "forward_kl"."""
    return name.strip().lower().replace("-", "_")


class Registry(dict):
    """name → entry (a class or a function), with aliases.

    Args:
        what: what an entry is, for messages ("objective", "divergence", "kind", "backend", "aggregation").
        normalise: maps a user's spelling to a registered name before lookup (e.g. "Forward-KL" → "forward_kl").
    """

    def __init__(self, what: str, normalise: Callable[[str], str] | None = None):
        super().__init__()
        self.what, self.normalise = what, normalise or (lambda name: name)

    def register(self, name: str, *aliases: str):
        """Decorator: registers the decorated entry under `name` and `aliases` and returns it unchanged. A name
        taken by another entry is a `ValueError` (two plug-ins claiming one name is a programming error)."""

        def decorator(entry):
            for key in (name, *aliases):
                if key in self and self[key] is not entry:
                    raise ValueError(f"{self.what} name {key!r} is already registered to "
                                     f"{getattr(self[key], '__name__', self[key])!r}")
                self[key] = entry
            return entry

        return decorator

    def lookup(self, name: Any, key: str | None = None, *, also_known: Iterable[str] = ()):
        """The entry registered as `name` (normalised), or a `ConfigError` naming the config `key` and the known
        names (`also_known` adds names the caller handles itself, such as reference kind `auto`)."""
        found = self.get(self.normalise(name)) if isinstance(name, str) else None
        if found is None:
            problem = f"unknown {self.what} {name!r}; known: {', '.join([*also_known, *sorted(self)])}"
            raise ConfigKeyError(key, problem) if key else ConfigError(problem)
        return found
