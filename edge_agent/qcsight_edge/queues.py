"""The bounded queue between the agent's threads: drop-oldest for cameras, wait-for-room for lossless sources."""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedQueue(Generic[T]):
    """A bounded FIFO between two threads.

    put() on a full queue drops the OLDEST item (a camera's newest picture is the one worth
    judging) and returns it so its source can be told; put_wait() instead waits for room, for
    lossless sources whose frames must all be judged.
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: T) -> T | None:
        with self._cond:
            dropped = None
            if len(self._items) >= self.maxsize:
                dropped = self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def put_wait(self, item: T, timeout_s: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._items) < self.maxsize, timeout_s):
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float) -> T | None:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._items), timeout_s):
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
