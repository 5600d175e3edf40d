"""One tier's page state: its free list, the live page at each id, and its eviction queue.

The eviction cascade (`TierCascade`, the base of `TieredPages`) keeps one `TierPages` per
configured tier and moves pages between them; a page is live on a tier when the tier's page map
holds it at its id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from kvjax.cache.eviction import EvictionQueue
from kvjax.cache.pages import NULL_PAGE, Page, PageAllocator, Tier

__all__ = ["PageMove", "PageMoveError", "TierPages"]


@dataclasses.dataclass(frozen=True)
class PageMove:
    """Copy of one page's bytes between tiers. Moves must run in the order they were recorded: a
    later move may reuse a page an earlier one vacated."""

    src_tier: Tier
    src_page: int
    dst_tier: Tier
    dst_page: int


class PageMoveError(OSError):
    """Some page moves did not land (a failed disk read or write): their targets hold bytes
    that were never written. Every other move of the call ran.

    Attributes:
        failed: positions, in the list of moves the storage was given, of those that failed.
    """

    def __init__(self, failed: list[int], cause: str) -> None:
        super().__init__(f"{len(failed)} page moves failed (positions {failed[:8]}): {cause}")
        self.failed = failed


class TierPages:
    """The pages of one tier: `allocator` (free ids), `page_map` (id -> live `Page` or None) and
    `queue` (its evictable pages, next victim first).

    Args:
        tier: which tier.
        num_pages: its size, `NULL_PAGE` included on the device (never handed out there).
    """

    def __init__(self, tier: Tier, num_pages: int) -> None:
        self.tier = tier
        self.allocator = PageAllocator(num_pages, reserve_null_page=tier is Tier.DEVICE)
        self.page_map: list[Page | None] = [None] * num_pages
        self.queue: EvictionQueue[Page] = EvictionQueue()

    @property
    def num_pages(self) -> int:
        """Pages of the tier, `NULL_PAGE` included: the length of its storage array."""
        return self.allocator.num_pages

    @property
    def num_usable(self) -> int:
        """Pages that can be handed out (`NULL_PAGE` excluded)."""
        return self.allocator.num_usable

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def holds(self, page: Page) -> bool:
        """Whether `page` is live on this tier."""
        return (
            page.tier is self.tier
            and 0 <= page.page_id < len(self.page_map)
            and self.page_map[page.page_id] is page
        )

    def live_pages(self) -> Iterator[Page]:
        return (page for page in self.page_map if page is not None)

    def new_pages(self, count: int, priority: int) -> list[Page]:
        """`count` fresh pages on free ids (the caller checked there are that many)."""
        page_ids = self.allocator.allocate(count)
        assert page_ids is not None, "make room first"
        pages = [Page(self.tier, page_id, priority) for page_id in page_ids]
        for page in pages:
            self.page_map[page.page_id] = page
        return pages

    def place(self, page: Page, page_id: int) -> None:
        """Files `page` at `page_id`, an id this tier's allocator handed out for it."""
        page.tier, page.page_id = self.tier, page_id
        self.page_map[page_id] = page

    def vacate(self, page: Page) -> None:
        """Unfiles a live page and frees its id (the caller dequeues it first when it leaves
        the tier)."""
        self.page_map[page.page_id] = None
        self.allocator.free([page.page_id])

    def resize(self, num_pages: int) -> None:
        """Grows or shrinks the tier; every id past a new end must already be free."""
        self.allocator.resize(num_pages)
        del self.page_map[num_pages:]
        self.page_map.extend([None] * (num_pages - len(self.page_map)))

    def check_invariants(self) -> list[Page]:
        """Raises `AssertionError` unless every id is free or filed once with its own page;
        returns the live pages."""
        self.allocator.check_invariants()
        self.queue.check_invariants()
        live = []
        for page_id, page in enumerate(self.page_map):
            if page is None:
                reserved = self.tier is Tier.DEVICE and page_id == NULL_PAGE
                assert reserved or self.allocator.is_free(page_id), (
                    f"{self.tier.name}:{page_id} leaked"
                )
                continue
            assert page.tier is self.tier and page.page_id == page_id, f"{page!r} misfiled"
            assert not self.allocator.is_free(page_id), f"{page!r} is also free"
            live.append(page)
        return live
