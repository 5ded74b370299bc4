"""Named registries (teacher kinds, loss families): one decorator, duplicates refused, and
an unknown name answered with the closest known one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distill.core.schema import closest

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> object`` with registration by decorator.

    Args:
        what: what the entries are, for messages ("loss", "teacher kind").
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.what} '{name}' is already registered by "
                             f"{getattr(self._entries[name], '__name__', self._entries[name])}")
        self._entries[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        return lambda obj: self.register(name, obj)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry; ValueError naming the closest known name otherwise."""
        if name not in self._entries:
            hint = closest(name, list(self._entries))
            extra = f"; did you mean '{hint}'?" if hint else ""
            raise ValueError(f"unknown {self.what} '{name}'{extra} (known: "
                             f"{', '.join(sorted(self._entries))})")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name]
