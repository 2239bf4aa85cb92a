"""One bounded cache for everything the package keeps between calls."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """A least-recently-used map of at most ``size`` entries: caches keyed by a
    sequence length, a device or a layout must not grow with every new one seen
    (generation with growing prompts, 30 lengths -> 30 layouts before)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._entries: collections.OrderedDict[Hashable, V] = collections.OrderedDict()

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        """The value cached under ``key``, built (and cached) if missing."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = build()
        self.put(key, value)
        return value

    def lookup(self, key: Hashable) -> V | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return None

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def keys(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
