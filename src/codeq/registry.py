"""The one registry pattern: a name -> builder dict, with a ``register`` decorator and an interface check.

Every extensible part (quantizers, models, loss terms, data sets, optimizers, LR schedulers) has one
``Registry`` defined beside what it registers. Entries added by ``register`` or by plain item
assignment (``REGISTRY["name"] = fn``) are checked against the part's interface at once, so a
plugin that does not fit fails when it is imported, with one line naming what is wrong. Everything
that lists choices (config validation, ``--dry-run``, error messages, the README's YAML reference)
reads them from the registry when it runs, so a plugin's entries are valid choices everywhere.

A registry may also hold *families*: every name ``prefix.rest`` is resolved by the family's resolver
(``torchvision.resnet18`` and ``timm.<name>`` for models), which checks ``rest`` against the library's own list.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from codeq.errors import ConfigError

T = TypeVar("T")


class Registry(dict[str, T]):
    """``name -> builder`` for one kind of part.

    Args:
        kind: what the entries are, as error messages name them (``"quantizer"``).
        check: called as ``check(name, entry)`` before an entry is added; raises RegistrationError
            when the entry does not fit the interface.
    """

    def __init__(self, kind: str, entries: dict[str, T] | None = None,
                 check: Callable[[str, Any], None] | None = None) -> None:
        super().__init__()
        self.kind, self.check = kind, check
        self.families: dict[str, Callable[[str, str], T]] = {}
        for name, entry in (entries or {}).items():
            self[name] = entry

    def __setitem__(self, name: str, entry: T) -> None:
        if self.check is not None:
            self.check(name, entry)
        super().__setitem__(name, entry)

    def register(self, name: str | None = None, **attributes: Any) -> Callable[[T], T]:
        """Decorator adding the decorated builder under ``name`` (default: its ``__name__``); ``attributes``
        are set on it first (e.g. ``num_classes`` of a data set).

        Raises:
            RegistrationError: the builder does not fit this registry's interface.
        """
        def add(entry: T) -> T:
            for attribute, value in attributes.items():
                setattr(entry, attribute, value)
            self[name or entry.__name__] = entry
            return entry

        return add

    def add_family(self, prefix: str, resolve: Callable[[str, str], T]) -> None:
        """Names ``prefix.rest`` resolve to ``resolve(key, rest)``, which raises ConfigError (naming ``key``) for a
        ``rest`` it does not know."""
        self.families[prefix] = resolve

    def choices(self) -> list[str]:
        """The registered names, then one ``prefix.<name>`` per family."""
        return [*self, *(f"{prefix}.<name>" for prefix in self.families)]

    def choose(self, key: str, name: str) -> T:
        """The entry called ``name``, or what a family resolves it to; ``key`` is the config key it was read from.

        Raises:
            ConfigError: no such entry (the message lists the valid names and a close match), or a family's own
                error for a name it does not know.
        """
        if name in self:
            return self[name]
        prefix, dot, rest = name.partition(".")
        if dot and prefix in self.families:
            return self.families[prefix](key, rest)
        close = difflib.get_close_matches(name, list(self), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(key, f"unknown {self.kind} {name!r}",
                          f"{hint}choose one of: {', '.join(self.choices())} (or register your own in a plugin)")
