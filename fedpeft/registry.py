"""Name -> class tables for extension points (codecs, aggregators, ...).

A new implementation is one file plus ``@REGISTRY.register("name")``; nothing else is
edited. Options come from the config and are checked against the constructor's
signature so that a typo fails at start, naming the key.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from fedpeft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Implementations of one extension point, looked up by name.

    Args:
        kind: What the table holds ("codec", "aggregator"), used in error messages.
        config_key: The config key that selects an entry, used in error messages.

    """

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator adding an implementation under ``name``."""

        def add(cls: type[T]) -> type[T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``; a ConfigError lists the choices."""
        try:
            return self._entries[name]
        except KeyError:
            choices = ", ".join(self.names())
            raise ConfigError(
                f"{self.config_key}: unknown {self.kind} {name!r} (choose one of: {choices})"
            ) from None

    def build(self, name: str, options: Mapping[str, Any], options_key: str) -> T:
        """Instantiate ``name`` with ``options``; unknown or bad options name their key."""
        cls = self.get(name)
        accepted = inspect.signature(cls).parameters
        try:
            hints = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):  # an annotation that cannot be resolved: no type check
            hints = {}
        for key, value in options.items():
            if key not in accepted:
                allowed = ", ".join(accepted) or "none"
                raise ConfigError(
                    f"{options_key}.{key}: not an option of {self.kind} {name!r} (options: {allowed})"
                )
            expected = _scalar_types(hints.get(key))
            if expected and not any(_is_a(value, t) for t in expected):
                names = " or ".join("none" if t is type(None) else t.__name__ for t in expected)
                raise ConfigError(f"{options_key}.{key}: expected {names}, got {value!r}")
        try:
            return cls(**options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{options_key}: {err}") from err


_SCALARS = (bool, int, float, str, type(None))


def _scalar_types(hint: Any) -> tuple[type, ...]:
    """The plain types a constructor annotation allows, or () when it is anything richer."""
    if hint in _SCALARS:
        return (hint,)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if all(arg in _SCALARS for arg in args):
            return args
    return ()


def _is_a(value: Any, expected: type) -> bool:
    """Whether a config value has the type: an int is a float, a bool is not a number."""
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
