"""A bounded, thread-safe set of the keys seen most recently."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class RecentKeys:
    """At most *limit* keys; the one seen least recently goes first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, key: Hashable) -> bool:
        """Whether *key* was added (and not pushed out since); it becomes the most recent."""
        with self._lock:
            if key not in self._keys:
                return False
            self._keys.move_to_end(key)
            return True

    def add(self, key: Hashable) -> None:
        """Remember *key*, forgetting the least recent beyond the limit."""
        with self._lock:
            self._keys[key] = None
            self._keys.move_to_end(key)
            while len(self._keys) > self.limit:
                self._keys.popitem(last=False)
