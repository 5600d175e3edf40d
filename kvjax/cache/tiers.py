"""Page bookkeeping of every tier, linked to the radix tree: allocation, users and commits.

A page's users hold it and, while active, lock it on the device; the eviction cascade underneath
(`kvjax.cache.cascade`) moves and drops the pages nobody locks to make room.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvjax.cache.blocks import Block, InsertOutcome, InsertResult
from kvjax.cache.cascade import TierCascade
from kvjax.cache.checks import check_int
from kvjax.cache.eviction import PRIORITY_DEFAULT, check_priority
from kvjax.cache.keys import ReuseScope, Token
from kvjax.cache.life_cycles import LifeCycle
from kvjax.cache.pages import Page, Tier
from kvjax.cache.radix_tree import BlockRadixTree
from kvjax.cache.tier import PageMove

__all__ = ["TieredPages"]


class TieredPages(TierCascade):
    """Pages of the device tier and the optional host and disk tiers, linked to the radix tree.

    A user of a page holds it (`hold`) and, while active, locks it on the device (`acquire`).
    Pages nobody holds stay cached when committed to a block in the tree and are freed otherwise.
    Evictable pages (DROPPABLE committed ones, and HELD ones above the coldest tier) wait in their
    tier's `EvictionQueue`.

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
        super().__init__(num_device_pages, num_host_pages, num_disk_pages)
        if not isinstance(tree, BlockRadixTree):
            raise ValueError(f"tree={tree!r} is not a BlockRadixTree")
        self.tree = tree
        self.num_dropped_blocks = 0  # blocks removed from the tree to make room
        # When a block's page stops being needed (set by the manager). Under a window, an
        # evicted page may leave its block in the tree without a page: later blocks stay
        # reusable by matches that no longer read it.
        self.life_cycle = LifeCycle(None, 0)
        # Called with the blocks that left the tree (dropped, replaced or cleared), for KV events.
        self.on_blocks_removed: Callable[[Sequence[Block]], None] | None = None

    # -- users --------------------------------------------------------------------------------

    def allocate(self, count: int, *, priority: int = PRIORITY_DEFAULT) -> list[Page] | None:
        """Takes `count` device pages, each locked by the caller, evicting others to make room.

        Returns:
            The new private (uncommitted) pages, or None, with nothing changed, when even eviction
            cannot free enough.
        """
        check_int("count", count, minimum=0)
        if count > self.num_free(Tier.DEVICE):
            return self.acquire((), count, priority=priority)
        return self._new_pages(count, check_priority(priority))

    def acquire(
        self, pages: Sequence[Page], num_new: int = 0, *, priority: int = PRIORITY_DEFAULT
    ) -> list[Page] | None:
        """Locks held `pages` on the device and takes `num_new` fresh locked pages, all or nothing.

        Pages on colder tiers move up (recorded as moves); room is made by evicting pages other
        than `pages`. Each page must have a holder that is not locked yet (the caller's).

        Returns:
            The `num_new` new private pages, or None, with nothing changed, when the device cannot
            take them all.
        """
        check_priority(priority)
        check_int("num_new", num_new, minimum=0)
        if len({id(page) for page in pages}) != len(pages):
            raise ValueError("pages names a page twice")
        for page in pages:
            self._check_live(page)
            if page.num_locks >= page.num_holders:
                raise ValueError(f"{page!r} has no unlocked holder to lock; hold it first")
        if not self._can_acquire(list(pages), num_new):
            return None
        for page in pages:
            self._dequeue(page)
        self._acquire_room([page for page in pages if page.tier is not Tier.DEVICE], num_new)
        for page in pages:
            page.num_locks += 1
        return self._new_pages(num_new, priority)

    def _new_pages(self, count: int, priority: int) -> list[Page]:
        """`count` private device pages, held and locked once; the device has them free."""
        new_pages = self._tier[Tier.DEVICE].new_pages(count, priority)
        for page in new_pages:
            page.num_holders = page.num_locks = 1
        return new_pages

    def record_copy(self, source: Page, target: Page) -> None:
        """Records a device-to-device copy of `source`'s bytes into `target` (copy-on-write)."""
        for page in (source, target):
            self._check_live(page)
            if page.tier is not Tier.DEVICE or not page.num_locks:
                raise ValueError(f"{page!r} must be locked on the device to be copied")
        self._moves.append(PageMove(Tier.DEVICE, source.page_id, Tier.DEVICE, target.page_id))

    def hold(self, page: Page) -> None:
        """Adds a user that needs the page kept but not on the device (e.g. a suspended cache).

        A new user counts as a use: the page becomes the most recent of its queue.
        """
        self._check_live(page)
        self._dequeue(page)
        page.num_holders += 1
        self._enqueue(page)

    def hold_all(self, pages: Sequence[Page]) -> None:
        """`hold` of each of `pages` (distinct), in order: the hot path of a prefix hit. Every
        page is checked first, so a bad one changes nothing."""
        tiers = self._tier
        for page in pages:  # `_check_live`, inlined
            state = tiers.get(page.tier) if isinstance(page, Page) else None
            if state is None or not state.holds(page):
                raise ValueError(f"{page!r} is not a live page of this pool")
        may_move = self._next
        for page in pages:
            if page.num_holders and (page.num_locks or page.tier not in may_move):
                page.num_holders += 1  # neither evictable before nor after: never queued
                continue
            queue = tiers[page.tier].queue
            queue.discard(page)
            page.num_holders += 1
            if not page.num_locks and page.tier in may_move:  # `_enqueue` of a held page
                queue.push(page, held=True)

    def unlock(self, page: Page, *, evict_first: bool = False) -> None:
        """One active user of the page becomes inactive (it still holds the page)."""
        self._check_live(page)
        if not page.num_locks:
            raise ValueError(f"{page!r} is not locked")
        page.num_locks -= 1
        if not page.num_locks:
            self._enqueue(page, evict_first=evict_first)

    def release(self, page: Page, *, evict_first: bool = False) -> None:
        """Removes an unlocked holder; an unheld page is then cached if committed, else freed.

        `evict_first` queues the page as the next victim of its priority once nobody holds it.
        """
        self._check_live(page)
        if page.num_holders <= page.num_locks:
            raise ValueError(f"{page!r} has no unlocked holder to release; unlock it first")
        if page.num_holders > 1:  # other users still hold it: its place in the queue stays
            page.num_holders -= 1
            return
        self._dequeue(page)
        page.num_holders = 0
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

    def adopt(self, page: Page, block: Block) -> None:
        """Makes the private `page` the storage of `block`, a tree block whose page was evicted
        (its tokens are the page's)."""
        self._check_live(page)
        if page.is_committed or block.page is not None or not block.is_attached:
            raise ValueError(f"{page!r} cannot become the page of {block!r}")
        page.block, block.page = block, page

    def drop_block(self, block: Block) -> list[Block]:
        """Removes `block` and its subtree from the tree; frees their unheld pages.

        Held pages stay with their holders (as orphans) and are freed by the last release.
        """
        if not isinstance(block, Block):
            raise ValueError(f"{block!r} is not a block; roots leave with their last child")
        parent = block.parent
        removed = self.tree.remove(block)
        # A windowed parent left without its page and now without children serves no match.
        while isinstance(parent, Block) and parent.page is None and not parent.children:
            grandparent = parent.parent
            removed += self.tree.remove(parent)
            parent = grandparent
        self._forget_pages(removed)
        return removed

    def drop_blocks_on(self, tier: Tier) -> list[Block]:
        """Drops every block whose page is on `tier`, with its subtree (e.g. the device's,
        when the device pool was lost)."""
        removed: list[Block] = []
        for page in list(self.live_pages(tier)):
            if page.block is not None and page.block.is_attached:  # an earlier drop may prune it
                removed += self.drop_block(page.block)
        return removed

    def clear(self) -> list[Block]:
        """Empties the tree; cached pages are freed, held ones stay with their holders."""
        removed = self.tree.clear()
        self._forget_pages(removed)
        return removed

    # -- internals ----------------------------------------------------------------------------

    def _drop(self, page: Page) -> None:
        """Drops a dequeued DROPPABLE cached page: its block and subtree leave the tree, unless
        a window makes the block one that later blocks can do without (not a sink block, and
        with children): then only its page goes."""
        block = page.block
        if self._outlives_page(block):
            self._free(page)  # unlinks the block from its page
            return
        self.num_dropped_blocks += len(self.drop_block(block))

    def _outlives_page(self, block: Block) -> bool:
        cycle = self.life_cycle
        return cycle.is_windowed and block.ordinal >= cycle.num_sink_blocks and bool(block.children)

    def _forget_pages(self, blocks: Sequence[Block]) -> None:
        """Frees the unheld pages of blocks that left the tree; held ones become orphans."""
        if blocks and self.on_blocks_removed is not None:
            self.on_blocks_removed(blocks)
        for block in blocks:
            page = block.page
            if page is not None and not page.num_holders:
                self._free(page)

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless every page is in exactly one place, counts and queues
        agree with the statuses, and every tree block has its page."""
        self.tree.check_invariants()
        seen: set[int] = set()
        for tier in self.tiers:
            queue = self._tier[tier].queue
            queued = 0
            for page in self._tier[tier].check_invariants():
                assert id(page) not in seen, f"{page!r} is filed twice"
                seen.add(id(page))
                self._check_page(page)
                in_queue = page in queue
                assert in_queue == self._is_evictable(page), f"{page!r} queued={in_queue}"
                if in_queue:
                    kind = queue.held if page.num_holders else queue.droppable
                    assert page in kind, f"{page!r} is queued as the wrong kind"
                queued += in_queue
            assert queued == len(queue), f"{tier.name} queue holds pages that are not live"
        for block in self.tree.iter_blocks():
            page = block.page
            if page is None:
                assert self._outlives_page(block), f"{block!r} lost its page"
                continue
            assert page.block is block, f"{block!r} and its page disagree"
            assert self._is_live(page), f"{block!r} has a dead page"

    @staticmethod
    def _check_page(page: Page) -> None:
        assert 0 <= page.num_locks <= page.num_holders, f"{page!r} counts are inconsistent"
        assert not page.num_locks or page.tier is Tier.DEVICE, f"{page!r} locked off the device"
        assert page.num_holders or page.is_cached, f"{page!r} should have been freed"
        assert page.block is None or page.block.page is page, f"{page!r} block link is one-way"
