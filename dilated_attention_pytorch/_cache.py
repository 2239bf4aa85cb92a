"""One bounded cache for everything the package keeps between calls."""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from torch import Tensor

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


class TensorMemo(Generic[V]):
    """What was read from a tensor's contents (a device sync each time), kept for
    the same tensor object: the backward of a call, the layers of one forward
    and the steps of a fixed packing pass the same object. Known by identity
    and version counter (an in-place change is a miss); at most ``size``
    tensors, held weakly."""

    def __init__(self, size: int) -> None:
        self._entries: BoundedCache[tuple[weakref.ref[Tensor], int, V]] = BoundedCache(size)

    def lookup(self, tensor: Tensor) -> V | None:
        found = self._entries.lookup(id(tensor))
        if found is not None and found[0]() is tensor and found[1] == tensor._version:
            return found[2]
        return None

    def put(self, tensor: Tensor, value: V) -> None:
        self._entries.put(id(tensor), (weakref.ref(tensor), tensor._version, value))

    def get(self, tensor: Tensor, build: Callable[[], V]) -> V:
        """The value read from ``tensor`` before, or ``build()`` (then kept)."""
        found = self.lookup(tensor)
        if found is None:
            found = build()
            self.put(tensor, found)
        return found
