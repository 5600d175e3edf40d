"""Eviction order of one tier: a least-recently-used queue per priority, lowest priority first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

__all__ = ["PRIORITY_DEFAULT", "PRIORITY_MAX", "PRIORITY_MIN", "PrioritizedLRU", "check_priority"]

PRIORITY_MIN = 0
PRIORITY_MAX = 100
PRIORITY_DEFAULT = 35


def check_priority(priority: int) -> int:
    """Returns `priority` when it is an int in `[PRIORITY_MIN, PRIORITY_MAX]`; raises otherwise."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority={priority!r} must be an int")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority={priority} must be in [{PRIORITY_MIN}, {PRIORITY_MAX}]")
    return priority


class Prioritized(Protocol):
    """An item with a fixed eviction priority (it must not change while the item is queued)."""

    priority: int


class PrioritizedLRU[T: Prioritized]:
    """Evictable items of one tier in eviction order, with O(1) push, remove and pop.

    One `OrderedDict` per priority is the LRU of that priority (its C linked list gives O(1)
    move-to-front, delete and pop); a bit mask of the non-empty priorities finds the lowest one in
    O(1). Items are ordered by the time they were pushed, i.e. became evictable.
    """

    def __init__(self) -> None:
        self._queues: list[OrderedDict[T, None]] = [OrderedDict() for _ in range(PRIORITY_MAX + 1)]
        self._nonempty = 0  # bit p set <=> priority p has items
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __contains__(self, item: T) -> bool:
        return item in self._queues[item.priority]

    def __iter__(self) -> Iterator[T]:
        """Items in eviction order (lowest priority first, least recent first within one)."""
        for queue in self._queues:
            yield from queue

    def push(self, item: T, *, evict_first: bool = False) -> None:
        """Queues `item` as the most recent of its priority, or as the next victim of it."""
        queue = self._queues[item.priority]
        if item in queue:
            raise ValueError(f"{item!r} is already queued for eviction")
        queue[item] = None
        if evict_first:
            queue.move_to_end(item, last=False)
        self._nonempty |= 1 << item.priority
        self._size += 1

    def remove(self, item: T) -> None:
        """Takes `item` out of the queue; raises `KeyError` when it is not queued."""
        queue = self._queues[item.priority]
        del queue[item]
        if not queue:
            self._nonempty &= ~(1 << item.priority)
        self._size -= 1

    def peek(self) -> T:
        """The next victim, left in place; raises `IndexError` when empty."""
        if not self._nonempty:
            raise IndexError("no evictable item")
        return next(iter(self._queues[self._lowest_priority()]))

    def pop(self) -> T:
        """Removes and returns the next victim; raises `IndexError` when empty."""
        if not self._nonempty:
            raise IndexError("no evictable item")
        priority = self._lowest_priority()
        queue = self._queues[priority]
        item, _ = queue.popitem(last=False)
        if not queue:
            self._nonempty &= ~(1 << priority)
        self._size -= 1
        return item

    def pop_many(self, count: int) -> list[T] | None:
        """The next `count` victims, or None and nothing changed when fewer are queued."""
        if count > self._size:
            return None
        return [self.pop() for _ in range(count)]

    def _lowest_priority(self) -> int:
        return (self._nonempty & -self._nonempty).bit_length() - 1

    def check_invariants(self) -> None:
        """Raises `AssertionError` when the mask, sizes or priorities disagree with the queues."""
        assert self._size == sum(len(queue) for queue in self._queues), "size drifted"
        for priority, queue in enumerate(self._queues):
            assert bool(queue) == bool(self._nonempty >> priority & 1), f"mask wrong at {priority}"
            for item in queue:
                assert item.priority == priority, f"{item!r} queued under priority {priority}"
