"""Page bookkeeping of every tier: allocation, users, eviction order and the eviction cascade.

Making room on a tier evicts its least valuable pages to the next colder tier (recursively making
room there); pages that nothing colder can take are dropped when DROPPABLE, which removes their
block and its subtree from the radix tree. Every such decision is recorded as a `PageMove` for the
storage layer to carry out in order. `make_room` checks feasibility first, so it either succeeds or
changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from kvjax.eviction import PRIORITY_DEFAULT, PrioritizedLRU, check_priority
from kvjax.keys import ReuseScope, Token
from kvjax.pages import NULL_PAGE, Page, PageAllocator, Tier
from kvjax.radix_tree import Block, BlockRadixTree, InsertOutcome, InsertResult

__all__ = ["PageMove", "TieredPages"]


@dataclasses.dataclass(frozen=True)
class PageMove:
    """Copy of one page's bytes between tiers. Moves must run in the order they were recorded: a
    later move may reuse a page an earlier one vacated."""

    src_tier: Tier
    src_page: int
    dst_tier: Tier
    dst_page: int


class TieredPages:
    """Pages of the device tier and the optional host and disk tiers, linked to the radix tree.

    A user of a page holds it (`hold`) and, while active, locks it on the device (`lock`). Pages
    nobody holds stay cached when committed to a block in the tree and are freed otherwise.
    Evictable pages (DROPPABLE committed ones, and HELD ones above the coldest tier) wait in their
    tier's prioritized LRU.

    Args:
        tree: the radix tree whose blocks these pages store.
        num_device_pages: device pool size, `NULL_PAGE` included.
        num_host_pages, num_disk_pages: sizes of the colder tiers; 0 leaves a tier out.
    """

    def __init__(
        self,
        tree: BlockRadixTree,
        num_device_pages: int,
        num_host_pages: int = 0,
        num_disk_pages: int = 0,
    ) -> None:
        if num_device_pages < 2:
            raise ValueError(f"num_device_pages={num_device_pages} must be >= 2 (NULL_PAGE + 1)")
        sizes = {
            Tier.DEVICE: num_device_pages,
            Tier.HOST: num_host_pages,
            Tier.DISK: num_disk_pages,
        }
        for tier, size in sizes.items():
            if size < 0:
                raise ValueError(f"{tier.name.lower()} tier size {size} must be >= 0")
        self.tree = tree
        self.tiers: tuple[Tier, ...] = tuple(tier for tier, size in sizes.items() if size > 0)
        self._next = dict(zip(self.tiers, self.tiers[1:], strict=False))
        self._allocators = {
            tier: PageAllocator(sizes[tier], reserve_null_page=tier is Tier.DEVICE)
            for tier in self.tiers
        }
        self._pages: dict[Tier, list[Page | None]] = {t: [None] * sizes[t] for t in self.tiers}
        self._lru: dict[Tier, PrioritizedLRU[Page]] = {t: PrioritizedLRU() for t in self.tiers}
        self._num_queued_droppable = dict.fromkeys(self.tiers, 0)
        self._moves: list[PageMove] = []
        self.num_dropped_blocks = 0  # blocks removed from the tree to make room

    # -- queries ------------------------------------------------------------------------------

    def num_pages(self, tier: Tier) -> int:
        """Pages of `tier` that can be handed out (`NULL_PAGE` excluded)."""
        return self._allocators[tier].num_usable

    def num_free(self, tier: Tier) -> int:
        return self._allocators[tier].num_free

    def num_evictable(self, tier: Tier) -> int:
        return len(self._lru[tier])

    def utilization(self, tier: Tier = Tier.DEVICE) -> float:
        """Fraction of `tier` that is neither free nor evictable."""
        available = self.num_free(tier) + self.num_evictable(tier)
        return 1.0 - available / self.num_pages(tier)

    def page(self, tier: Tier, page_id: int) -> Page | None:
        """The live page at `page_id` of `tier`, or None when that page is free."""
        return self._pages[tier][page_id]

    def live_pages(self, tier: Tier) -> Iterator[Page]:
        return (page for page in self._pages[tier] if page is not None)

    def eviction_order(self, tier: Tier) -> list[Page]:
        """Evictable pages of `tier`, next victim first."""
        return list(self._lru[tier])

    def take_moves(self) -> list[PageMove]:
        """The page moves recorded since the last call, in the order they must run."""
        moves, self._moves = self._moves, []
        return moves

    # -- users --------------------------------------------------------------------------------

    def allocate(self, count: int, *, priority: int = PRIORITY_DEFAULT) -> list[Page] | None:
        """Takes `count` device pages, each locked by the caller, evicting others to make room.

        Returns:
            The new private (uncommitted) pages, or None, with nothing changed, when even eviction
            cannot free enough.
        """
        check_priority(priority)
        if count < 0:
            raise ValueError(f"count={count} must be >= 0")
        if not self.make_room(Tier.DEVICE, count):
            return None
        pages = []
        for page_id in self._allocators[Tier.DEVICE].allocate(count):
            page = Page(Tier.DEVICE, page_id, priority)
            page.num_holders = page.num_locks = 1
            self._pages[Tier.DEVICE][page_id] = page
            pages.append(page)
        return pages

    def hold(self, page: Page) -> None:
        """Adds a user that needs the page kept but not on the device (e.g. a suspended cache)."""
        self._check_live(page)
        self._dequeue(page)
        page.num_holders += 1
        self._enqueue(page)

    def lock(self, page: Page) -> None:
        """Makes one of the page's holders active: the page must stay on the device."""
        self._check_live(page)
        if page.tier is not Tier.DEVICE:
            raise ValueError(f"{page!r} must be on the device to be locked")
        if page.num_locks >= page.num_holders:
            raise ValueError(f"{page!r} has no unlocked holder to lock; hold it first")
        self._dequeue(page)
        page.num_locks += 1

    def unlock(self, page: Page, *, evict_first: bool = False) -> None:
        """One active user of the page becomes inactive (it still holds the page)."""
        self._check_live(page)
        if not page.num_locks:
            raise ValueError(f"{page!r} is not locked")
        page.num_locks -= 1
        self._enqueue(page, evict_first=evict_first)

    def release(self, page: Page, *, evict_first: bool = False) -> None:
        """Removes an unlocked holder; an unheld page is then cached if committed, else freed."""
        self._check_live(page)
        if page.num_holders <= page.num_locks:
            raise ValueError(f"{page!r} has no unlocked holder to release; unlock it first")
        self._dequeue(page)
        page.num_holders -= 1
        self._enqueue(page, evict_first=evict_first)

    def commit(
        self, page: Page, parent: Block | ReuseScope, tokens: Sequence[Token]
    ) -> InsertResult:
        """Offers the block of `tokens` to the tree with `page` as its storage.

        When the block is new, the page becomes the tree's (committed); otherwise it stays private
        and the caller decides (reuse the existing block, or keep its page and stop committing).
        Partial siblings the new block replaces leave the tree and their unheld pages are freed.
        """
        self._check_live(page)
        if page.is_committed:
            raise ValueError(f"{page!r} is already committed")
        if not page.num_holders:
            raise ValueError(f"{page!r} has no holder")
        result = self.tree.insert(parent, tokens)
        if result.outcome is InsertOutcome.NEW:
            page.block = result.block
            result.block.page = page
            self._forget_pages(result.replaced)
        return result

    def drop_block(self, block: Block) -> list[Block]:
        """Removes `block` and its subtree from the tree; frees their unheld pages.

        Held pages stay with their holders (as orphans) and are freed by the last release.
        """
        removed = self.tree.remove(block)
        self._forget_pages(removed)
        return removed

    def clear(self) -> list[Block]:
        """Empties the tree; cached pages are freed, held ones stay with their holders."""
        removed = self.tree.clear()
        self._forget_pages(removed)
        return removed

    # -- eviction -----------------------------------------------------------------------------

    def make_room(self, tier: Tier, count: int) -> bool:
        """Makes `count` pages of `tier` free by evicting, or returns False and changes nothing."""
        if count > self.num_free(tier) + self._num_freeable(tier):
            return False
        self._make_room(tier, count)
        return True

    def _num_acceptable(self, tier: Tier | None) -> int:
        """Pages `tier` could take in from above: free ones plus those it can shed."""
        if tier is None:
            return 0
        return self.num_free(tier) + self._num_freeable(tier)

    def _num_freeable(self, tier: Tier) -> int:
        # DROPPABLE pages can always go (dropped or moved); HELD ones only to a colder tier.
        droppable = self._num_queued_droppable[tier]
        held = len(self._lru[tier]) - droppable
        return droppable + min(held, self._num_acceptable(self._next.get(tier)))

    def _make_room(self, tier: Tier, count: int) -> None:
        shortfall = count - self.num_free(tier)
        if shortfall <= 0:
            return
        colder = self._next.get(tier)
        if shortfall <= self._num_acceptable(colder):
            self._make_room(colder, shortfall)
            # Drops below may have pruned pages of this tier, so count again.
            shortfall = count - self.num_free(tier)
            self._move_down(self._pop(tier, shortfall))
            return
        # Colder tiers cannot take every victim: move HELD ones while they can, drop DROPPABLE ones.
        room_below = self._num_acceptable(colder)
        to_move, to_drop = [], []
        for page in self._lru[tier]:
            if len(to_move) + len(to_drop) == shortfall:
                break
            if page.num_holders:
                if len(to_move) < room_below:
                    to_move.append(page)
            else:
                to_drop.append(page)
        if to_move:
            self._make_room(colder, len(to_move))
        for page in to_drop:
            if self._pages[page.tier][page.page_id] is page:  # not pruned by an earlier drop
                self._dequeue(page)
                self._drop(page)
        for page in to_move:
            self._dequeue(page)
        self._move_down(to_move)

    def _pop(self, tier: Tier, count: int) -> list[Page]:
        victims = []
        for _ in range(count):
            page = self._lru[tier].peek()
            self._dequeue(page)
            victims.append(page)
        return victims

    def _move_down(self, victims: list[Page]) -> None:
        """Moves dequeued victims of one tier to the next colder one, which has room for them."""
        if not victims:
            return
        source = victims[0].tier
        target = self._next[source]
        target_ids = self._allocators[target].allocate(len(victims))
        assert target_ids is not None, "make room on the colder tier first"
        self._allocators[source].free(page.page_id for page in victims)
        for page, target_id in zip(victims, target_ids, strict=True):
            self._moves.append(PageMove(source, page.page_id, target, target_id))
            self._pages[source][page.page_id] = None
            page.tier, page.page_id = target, target_id
            self._pages[target][target_id] = page
            self._enqueue(page)

    def _drop(self, page: Page) -> None:
        """Drops a dequeued DROPPABLE cached page: its block and subtree leave the tree."""
        self.num_dropped_blocks += len(self.drop_block(page.block))

    # -- internals ----------------------------------------------------------------------------

    def _is_evictable(self, page: Page) -> bool:
        if page.num_locks:
            return False
        if page.num_holders:
            return page.tier in self._next  # HELD pages may only move to a colder tier
        return page.is_cached

    def _enqueue(self, page: Page, *, evict_first: bool = False) -> None:
        """Files a page whose users changed: queued when evictable, freed when useless."""
        if not page.num_holders and not page.is_cached:
            self._free(page)
        elif self._is_evictable(page):
            self._lru[page.tier].push(page, evict_first=evict_first)
            if not page.num_holders:
                self._num_queued_droppable[page.tier] += 1

    def _dequeue(self, page: Page) -> None:
        lru = self._lru[page.tier]
        if page in lru:
            lru.remove(page)
            if not page.num_holders:
                self._num_queued_droppable[page.tier] -= 1

    def _free(self, page: Page) -> None:
        self._dequeue(page)
        self._pages[page.tier][page.page_id] = None
        self._allocators[page.tier].free([page.page_id])
        if page.block is not None:
            page.block.page = None
            page.block = None

    def _forget_pages(self, blocks: Sequence[Block]) -> None:
        """Frees the unheld pages of blocks that left the tree; held ones become orphans."""
        for block in blocks:
            page = block.page
            if page is not None and not page.num_holders:
                self._free(page)

    def _check_live(self, page: Page) -> None:
        pages = self._pages.get(page.tier)
        if pages is None or pages[page.page_id] is not page:
            raise ValueError(f"{page!r} is not a live page of this pool")

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless every page is in exactly one place, counts and queues
        agree with the statuses, and every tree block has its page."""
        self.tree.check_invariants()
        seen: set[int] = set()
        for tier in self.tiers:
            allocator, lru = self._allocators[tier], self._lru[tier]
            allocator.check_invariants()
            lru.check_invariants()
            queued = droppable = 0
            for page_id, page in enumerate(self._pages[tier]):
                if page is None:
                    reserved = tier is Tier.DEVICE and page_id == NULL_PAGE
                    assert reserved or allocator.is_free(page_id), f"{tier.name}:{page_id} leaked"
                    continue
                assert id(page) not in seen, f"{page!r} is filed twice"
                seen.add(id(page))
                assert page.tier is tier and page.page_id == page_id, f"{page!r} misfiled"
                assert not allocator.is_free(page_id), f"{page!r} is also free"
                self._check_page(page)
                in_queue = page in lru
                assert in_queue == self._is_evictable(page), f"{page!r} queued={in_queue}"
                queued += in_queue
                droppable += in_queue and not page.num_holders
            assert queued == len(lru), f"{tier.name} queue holds pages that are not live"
            assert droppable == self._num_queued_droppable[tier], "droppable count drifted"
        for block in self.tree.iter_blocks():
            page = block.page
            assert page is not None and page.block is block, f"{block!r} lost its page"
            assert self._pages[page.tier][page.page_id] is page, f"{block!r} has a dead page"

    @staticmethod
    def _check_page(page: Page) -> None:
        assert 0 <= page.num_locks <= page.num_holders, f"{page!r} counts are inconsistent"
        assert not page.num_locks or page.tier is Tier.DEVICE, f"{page!r} locked off the device"
        assert page.num_holders or page.is_cached, f"{page!r} should have been freed"
        assert page.block is None or page.block.page is page, f"{page!r} block link is one-way"
