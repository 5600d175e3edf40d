"""Eviction order of one tier: a least-recently-used queue per priority, lowest priority first.

`PrioritizedLRU` is the generic queue; `EvictionQueue` keeps a tier's HELD and DROPPABLE pages in
two of them, merged in one eviction order, so that victims of either kind are found in O(1).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

from kvjax.cache.checks import check_int

__all__ = [
    "PRIORITY_DEFAULT",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "EvictionQueue",
    "PrioritizedLRU",
    "check_priority",
]

PRIORITY_MIN = 0
PRIORITY_MAX = 100
PRIORITY_DEFAULT = 35


def check_priority(priority: int) -> int:
    """Returns `priority` when it is an int in `[PRIORITY_MIN, PRIORITY_MAX]`; raises otherwise."""
    return check_int("priority", priority, minimum=PRIORITY_MIN, maximum=PRIORITY_MAX)


class Prioritized(Protocol):
    """An item with a fixed eviction priority (it must not change while the item is queued)."""

    priority: int


_ABSENT = object()  # a sentinel: no queued item maps to it


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
        priority = item.priority
        if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            check_priority(priority)  # raises, naming the value and the range
        queue = self._queues[priority]
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

    def discard(self, item: T) -> bool:
        """Takes `item` out if it is queued; returns whether it was (one lookup)."""
        queue = self._queues[item.priority]
        if queue.pop(item, _ABSENT) is _ABSENT:
            return False
        if not queue:
            self._nonempty &= ~(1 << item.priority)
        self._size -= 1
        return True

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

    def _lowest_priority(self) -> int:
        return (self._nonempty & -self._nonempty).bit_length() - 1

    def check_invariants(self) -> None:
        """Raises `AssertionError` when the mask, sizes or priorities disagree with the queues."""
        assert self._size == sum(len(queue) for queue in self._queues), "size drifted"
        for priority, queue in enumerate(self._queues):
            assert bool(queue) == bool(self._nonempty >> priority & 1), f"mask wrong at {priority}"
            for item in queue:
                assert item.priority == priority, f"{item!r} queued under priority {priority}"


class Queued(Prioritized, Protocol):
    """A page as `EvictionQueue` sees it: a priority, and when it was queued (set by the queue)."""

    queued_at: int


class EvictionQueue[T: Queued]:
    """Evictable pages of one tier, next victim first: lowest priority, then least recent.

    HELD pages (which may only move to a colder tier) and DROPPABLE ones (which may also be
    dropped) wait in separate LRUs, so a tier whose colder tiers are full can skip to its next
    DROPPABLE victim in O(1). `queued_at` stamps give the merged order: pushes to the back count
    up, pushes to the front (`evict_first`) count down.
    """

    def __init__(self) -> None:
        self.held: PrioritizedLRU[T] = PrioritizedLRU()
        self.droppable: PrioritizedLRU[T] = PrioritizedLRU()
        self._back = 0
        self._front = 0

    def __len__(self) -> int:
        return len(self.held) + len(self.droppable)

    def __contains__(self, item: T) -> bool:
        return item in self.held or item in self.droppable

    def __iter__(self) -> Iterator[T]:
        """Both kinds in one eviction order."""
        return heapq.merge(self.held, self.droppable, key=_eviction_rank)

    def push(self, item: T, *, held: bool, evict_first: bool = False) -> None:
        """Queues `item` as the most recent of its priority, or as the next victim of it."""
        if evict_first:
            self._front -= 1
            stamp = self._front
        else:
            self._back += 1
            stamp = self._back
        (self.held if held else self.droppable).push(item, evict_first=evict_first)
        item.queued_at = stamp

    def remove(self, item: T) -> None:
        """Takes `item` out; raises `KeyError` when it is not queued."""
        if not self.discard(item):
            raise KeyError(item)

    def discard(self, item: T) -> bool:
        """Takes `item` out if it is queued; returns whether it was."""
        return self.held.discard(item) or self.droppable.discard(item)

    def pop_victims(self, count: int, *, max_held: int) -> list[T] | None:
        """Removes the next `count` victims in eviction order, taking at most `max_held` HELD
        ones (skipping the rest); None, with nothing changed, when fewer qualify."""
        if count > len(self.droppable) + min(len(self.held), max_held):
            return None
        victims = []
        num_held = 0
        for _ in range(count):
            held_next = self.held.peek() if self.held and num_held < max_held else None
            droppable_next = self.droppable.peek() if self.droppable else None
            if droppable_next is None or (
                held_next is not None and _eviction_rank(held_next) < _eviction_rank(droppable_next)
            ):
                victims.append(self.held.pop())
                num_held += 1
            else:
                victims.append(self.droppable.pop())
        return victims

    def check_invariants(self) -> None:
        """Raises `AssertionError` when a queue is broken or its order disagrees with the stamps."""
        for lru in (self.held, self.droppable):
            lru.check_invariants()
            ranks = [_eviction_rank(item) for item in lru]
            assert ranks == sorted(ranks), "queue order disagrees with the stamps"
        assert not any(item in self.droppable for item in self.held), "queued twice"


def _eviction_rank(item: Queued) -> tuple[int, int]:
    return item.priority, item.queued_at
