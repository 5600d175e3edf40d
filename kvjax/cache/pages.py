"""Pages: the free list of each tier and the page record whose status comes from its users.

A page is the storage of one block on one tier. Users of a page are the caches that need it: each
*holds* it (it must not be dropped) and, while active, also *locks* it (it must stay on the device).
The status is derived from those counts, never stored: LOCKED, HELD or DROPPABLE.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Protocol

import numpy as np

__all__ = [
    "NULL_PAGE",
    "Page",
    "PageAllocator",
    "PageStatus",
    "StoredBlock",
    "Tier",
    "fill_rows",
]

NULL_PAGE = 0  # device page id never handed out; page tables are padded with it


class Tier(enum.IntEnum):
    """Storage tiers, warm to cold."""

    DEVICE = 0
    HOST = 1
    DISK = 2


class PageStatus(enum.Enum):
    """What may happen to a page: LOCKED stays on the device, HELD may move, DROPPABLE may go."""

    LOCKED = "locked"
    HELD = "held"
    DROPPABLE = "droppable"


class PageAllocator:
    """Free list of one tier's page ids.

    Ids start free in ascending order; freed ids join the back of the queue, so the id freed first
    is handed out first. Page 0 of the device tier (`NULL_PAGE`) is never handed out.
    """

    def __init__(self, num_pages: int, *, reserve_null_page: bool) -> None:
        first = NULL_PAGE + 1 if reserve_null_page else 0
        if num_pages < first:
            raise ValueError(f"num_pages={num_pages} must be >= {first}")
        self.num_pages = num_pages
        self.first_page = first
        self._free: deque[int] = deque(range(first, num_pages))
        self._is_free = bytearray(num_pages)
        self._is_free[first:] = b"\x01" * (num_pages - first)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Pages that can ever be handed out."""
        return self.num_pages - self.first_page

    def is_free(self, page_id: int) -> bool:
        return bool(self._is_free[page_id])

    def allocate(self, count: int) -> list[int] | None:
        """Takes `count` free pages, or returns None and changes nothing when fewer are free."""
        if count < 0:
            raise ValueError(f"count={count} must be >= 0")
        if count > len(self._free):
            return None
        page_ids = [self._free.popleft() for _ in range(count)]
        for page_id in page_ids:
            self._is_free[page_id] = 0
        return page_ids

    def allocate_below(self, limit: int, count: int) -> list[int] | None:
        """Takes `count` free pages with ids below `limit` (for relocation before a shrink), or
        returns None and changes nothing when fewer are free there."""
        page_ids = [page_id for page_id in self._free if page_id < limit][:count]
        if len(page_ids) < count:
            return None
        taken = set(page_ids)
        self._free = deque(page_id for page_id in self._free if page_id not in taken)
        for page_id in page_ids:
            self._is_free[page_id] = 0
        return page_ids

    def resize(self, num_pages: int) -> None:
        """Grows (new ids join the free queue) or shrinks (every id past the end must be free)."""
        if num_pages < self.first_page:
            raise ValueError(f"num_pages={num_pages} must be >= {self.first_page}")
        busy = [i for i in range(num_pages, self.num_pages) if not self._is_free[i]]
        if busy:
            raise ValueError(f"pages {busy} are in use past the new end {num_pages}")
        if num_pages < self.num_pages:
            self._free = deque(page_id for page_id in self._free if page_id < num_pages)
            del self._is_free[num_pages:]
        else:
            self._free.extend(range(self.num_pages, num_pages))
            self._is_free.extend(b"\x01" * (num_pages - self.num_pages))
        self.num_pages = num_pages

    def free(self, page_ids: Iterable[int]) -> None:
        """Returns pages to the back of the free queue; checks them all before changing anything."""
        page_ids = list(page_ids)
        seen = set()
        for page_id in page_ids:
            if not self.first_page <= page_id < self.num_pages:
                raise ValueError(f"page {page_id} is outside [{self.first_page}, {self.num_pages})")
            if self._is_free[page_id] or page_id in seen:
                raise ValueError(f"page {page_id} is already free")
            seen.add(page_id)
        for page_id in page_ids:
            self._is_free[page_id] = 1
        self._free.extend(page_ids)

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless the queue and the free flags name the same pages once."""
        assert len(set(self._free)) == len(self._free), "a page is queued twice"
        flagged = {page_id for page_id in range(self.num_pages) if self._is_free[page_id]}
        assert flagged == set(self._free), "free flags disagree with the free queue"
        assert NULL_PAGE not in flagged or self.first_page == NULL_PAGE, "NULL_PAGE is free"


class StoredBlock(Protocol):
    """What a page sees of the tree block it stores (a `kvjax.cache.blocks.Block`)."""

    page: Page | None

    @property
    def is_attached(self) -> bool:
        """Whether the block is still in the tree."""
        ...


class Page:
    """One allocated page: where it is, who uses it, and the tree block it stores (if committed).

    Only the tier bookkeeping (`TieredPages` and its `TierPages`) changes these fields. `block`
    is None while the page is private to one cache (uncommitted); a committed page whose block
    left the tree (an orphan) is freed by its last holder instead of being cached.
    """

    __slots__ = ("block", "num_holders", "num_locks", "page_id", "priority", "queued_at", "tier")

    def __init__(self, tier: Tier, page_id: int, priority: int) -> None:
        self.tier = tier
        self.page_id = page_id
        self.priority = priority
        self.block: StoredBlock | None = None
        self.num_holders = 0
        self.num_locks = 0
        self.queued_at = 0  # eviction order stamp, set when queued

    @property
    def status(self) -> PageStatus:
        if self.num_locks:
            return PageStatus.LOCKED
        if self.num_holders:
            return PageStatus.HELD
        return PageStatus.DROPPABLE

    @property
    def is_committed(self) -> bool:
        return self.block is not None

    @property
    def is_cached(self) -> bool:
        """Committed to a block that is still in the tree, so it stays useful without holders."""
        return self.block is not None and self.block.is_attached

    def __repr__(self) -> str:
        return (
            f"Page({self.tier.name}:{self.page_id}, {self.status.name}, "
            f"holders={self.num_holders}, locks={self.num_locks}, priority={self.priority})"
        )


def fill_rows(table: np.ndarray, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Writes `rows[i]` at the start of `table[i]` (int32[>= len(rows), width]); returns it.

    Raises:
        ValueError: a row is longer than the table is wide.
    """
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    if lengths.size and lengths.max() > table.shape[1]:
        raise ValueError(f"a cache of {lengths.max()} blocks exceeds {table.shape[1]} columns")
    # One scatter for the whole table: a slice assignment per row costs ~2 us each.
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = np.arange(starts.size) - starts
    table[np.repeat(np.arange(len(rows)), lengths), columns] = list(chain.from_iterable(rows))
    return table
