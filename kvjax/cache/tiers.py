"""Page bookkeeping of every tier: allocation, users, eviction order and the eviction cascade.

Making room on a tier evicts its least valuable pages (lowest priority, least recent) to the next
colder tier, recursively making room there. When the colder tiers cannot take every victim (they
are full of HELD pages), the HELD victims get the room and the least valuable DROPPABLE victims are
dropped, which removes their block and its subtree from the radix tree. Every move is recorded as
a `PageMove` for the storage layer to carry out in order. `make_room` checks feasibility first, so
it either succeeds or changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from kvjax.cache.checks import check_int
from kvjax.cache.eviction import PRIORITY_DEFAULT, EvictionQueue, check_priority
from kvjax.cache.keys import ReuseScope, Token
from kvjax.cache.pages import NULL_PAGE, Page, PageAllocator, Tier
from kvjax.cache.radix_tree import Block, BlockRadixTree, InsertOutcome, InsertResult

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
        sizes = {
            Tier.DEVICE: check_int("num_device_pages", num_device_pages, minimum=0),
            Tier.HOST: check_int("num_host_pages", num_host_pages, minimum=0),
            Tier.DISK: check_int("num_disk_pages", num_disk_pages, minimum=0),
        }
        if sizes[Tier.DEVICE] < 2:
            raise ValueError(f"num_device_pages={num_device_pages} must be >= 2 (NULL_PAGE + 1)")
        if not isinstance(tree, BlockRadixTree):
            raise ValueError(f"tree={tree!r} is not a BlockRadixTree")
        self.tree = tree
        self.tiers: tuple[Tier, ...] = tuple(tier for tier, size in sizes.items() if size > 0)
        self._next = dict(zip(self.tiers, self.tiers[1:], strict=False))
        self._allocators = {
            tier: PageAllocator(sizes[tier], reserve_null_page=tier is Tier.DEVICE)
            for tier in self.tiers
        }
        self._pages: dict[Tier, list[Page | None]] = {t: [None] * sizes[t] for t in self.tiers}
        self._queues: dict[Tier, EvictionQueue[Page]] = {t: EvictionQueue() for t in self.tiers}
        self._moves: list[PageMove] = []
        self.num_dropped_blocks = 0  # blocks removed from the tree to make room
        # Called with the blocks that left the tree (dropped, replaced or cleared), for KV events.
        self.on_blocks_removed: Callable[[Sequence[Block]], None] | None = None

    # -- queries ------------------------------------------------------------------------------

    def num_pages(self, tier: Tier) -> int:
        """Pages of `tier` that can be handed out (`NULL_PAGE` excluded)."""
        return self._allocators[self._check_tier(tier)].num_usable

    def size(self, tier: Tier) -> int:
        """Pages of `tier`, `NULL_PAGE` included: the length of its storage array."""
        return self._allocators[self._check_tier(tier)].num_pages

    def num_free(self, tier: Tier) -> int:
        return self._allocators[self._check_tier(tier)].num_free

    def num_evictable(self, tier: Tier) -> int:
        return len(self._queues[self._check_tier(tier)])

    def utilization(self, tier: Tier = Tier.DEVICE) -> float:
        """Fraction of `tier` that is neither free nor evictable."""
        available = self.num_free(tier) + self.num_evictable(tier)
        return 1.0 - available / self.num_pages(tier)

    def page(self, tier: Tier, page_id: int) -> Page | None:
        """The live page at `page_id` of `tier`, or None when that page is free."""
        return self._pages[self._check_tier(tier)][page_id]

    def live_pages(self, tier: Tier) -> Iterator[Page]:
        return (page for page in self._pages[self._check_tier(tier)] if page is not None)

    def is_evictable(self, page: Page) -> bool:
        """Whether eviction may move or drop `page` to make room (it waits in a queue)."""
        self._check_live(page)
        return page in self._queues[page.tier]

    def eviction_order(self, tier: Tier) -> list[Page]:
        """Evictable pages of `tier`, next victim first."""
        return list(self._queues[self._check_tier(tier)])

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
        check_int("count", count, minimum=0)
        if count > self._allocators[Tier.DEVICE].num_free:
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
        rising = [page for page in pages if page.tier is not Tier.DEVICE]
        needed = num_new + len(rising)
        if needed > self.num_free(Tier.DEVICE):
            # The targets must not be chosen as victims: count the room without them.
            excluded = Counter(page.tier for page in pages if page in self._queues[page.tier])
            if needed > self.num_free(Tier.DEVICE) + self._num_freeable(Tier.DEVICE, excluded):
                return None
        for page in pages:
            self._dequeue(page)
        self._make_room(Tier.DEVICE, needed)
        if rising:
            self._move_up(sorted(rising, key=lambda page: page.tier))
        for page in pages:
            page.num_locks += 1
        return self._new_pages(num_new, priority)

    def _new_pages(self, count: int, priority: int) -> list[Page]:
        """`count` private device pages, held and locked once; the device has them free."""
        new_pages = []
        device_pages = self._pages[Tier.DEVICE]
        for page_id in self._allocators[Tier.DEVICE].allocate(count):
            page = Page(Tier.DEVICE, page_id, priority)
            page.num_holders = page.num_locks = 1
            device_pages[page_id] = page
            new_pages.append(page)
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

    def drop_block(self, block: Block) -> list[Block]:
        """Removes `block` and its subtree from the tree; frees their unheld pages.

        Held pages stay with their holders (as orphans) and are freed by the last release.
        """
        if not isinstance(block, Block):
            raise ValueError(f"{block!r} is not a block; roots leave with their last child")
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
        self._check_tier(tier)
        check_int("count", count, minimum=0)
        if count > self.num_free(tier) + self._num_freeable(tier):
            return False
        self._make_room(tier, count)
        return True

    def _num_acceptable(self, tier: Tier | None, excluded: Counter[Tier] | None = None) -> int:
        """Pages `tier` could take in from above: free ones plus those it can shed."""
        if tier is None:
            return 0
        return self.num_free(tier) + self._num_freeable(tier, excluded)

    def _num_freeable(self, tier: Tier, excluded: Counter[Tier] | None = None) -> int:
        """Pages of `tier` that eviction can free, not counting `excluded[tier]` HELD ones."""
        # DROPPABLE pages can always go (moved or dropped); HELD ones only to a colder tier.
        queue = self._queues[tier]
        num_held = len(queue.held) - (excluded[tier] if excluded else 0)
        return len(queue.droppable) + min(
            num_held, self._num_acceptable(self._next.get(tier), excluded)
        )

    def _make_room(self, tier: Tier, count: int) -> None:
        shortfall = count - self.num_free(tier)
        if shortfall <= 0:
            return
        colder = self._next.get(tier)
        room_below = self._num_acceptable(colder)
        victims = self._queues[tier].pop_victims(shortfall, max_held=room_below)
        assert victims is not None, "feasibility was checked by make_room"
        # The room below goes to the HELD victims (they cannot be dropped), then to the most
        # recent DROPPABLE ones; the least valuable DROPPABLE victims are dropped.
        droppable = [page for page in victims if not page.num_holders]
        to_drop = droppable[: max(len(victims) - room_below, 0)]
        dropping = set(map(id, to_drop))
        # Make room below one page at a time: a drop down there may prune pages of this tier
        # (victims included), so each step counts again what is still needed. Moves go before
        # drops, since a move keeps the data.
        moving: list[Page] = []
        for page in victims:
            if id(page) in dropping or count - self.num_free(tier) - len(moving) <= 0:
                continue
            if not self._is_live(page):
                continue
            free_before = self.num_free(tier)
            self._make_room(colder, len(moving) + 1)
            if self.num_free(tier) != free_before:  # pruned here: chosen victims may be gone
                moving = [chosen for chosen in moving if self._is_live(chosen)]
            if self._is_live(page):
                moving.append(page)
        self._move_down(moving)
        for page in to_drop:
            if self.num_free(tier) >= count:
                break
            if self._is_live(page):  # an earlier drop may have pruned it
                self._drop(page)
        # Victims no longer needed go back to the front of their queues, in their order.
        moved = set(map(id, moving))
        unused = [page for page in victims if id(page) not in moved and self._is_live(page)]
        for page in reversed(unused):
            self._enqueue(page, evict_first=True)

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

    def _move_up(self, pages: list[Page]) -> None:
        """Moves dequeued pages of colder tiers to the device, which has room for them."""
        device_ids = self._allocators[Tier.DEVICE].allocate(len(pages))
        assert device_ids is not None, "make room on the device first"
        for page, device_id in zip(pages, device_ids, strict=True):
            self._moves.append(PageMove(page.tier, page.page_id, Tier.DEVICE, device_id))
            self._allocators[page.tier].free([page.page_id])
            self._pages[page.tier][page.page_id] = None
            page.tier, page.page_id = Tier.DEVICE, device_id
            self._pages[Tier.DEVICE][device_id] = page

    def _drop(self, page: Page) -> None:
        """Drops a dequeued DROPPABLE cached page: its block and subtree leave the tree."""
        self.num_dropped_blocks += len(self.drop_block(page.block))

    # -- quotas -------------------------------------------------------------------------------

    def resize_tier(self, tier: Tier, num_pages: int) -> bool:
        """Changes the number of pages of `tier` (`NULL_PAGE` included on the device).

        Shrinking evicts the least valuable pages down the cascade until the survivors fit, then
        relocates survivors with ids past the new end into free ids below it (recorded as moves
        within the tier, which the storage must run before it shrinks its array). No page may be
        locked: suspend every cache first.

        Returns:
            False, with nothing changed, when the pages that must stay do not fit.
        """
        self._check_tier(tier)
        check_int("num_pages", num_pages, minimum=2 if tier is Tier.DEVICE else 1)
        locked = next((page for page in self.live_pages(tier) if page.num_locks), None)
        if locked is not None:
            raise RuntimeError(f"cannot resize {tier.name} while {locked!r} is locked")
        allocator = self._allocators[tier]
        old_num_pages = allocator.num_pages
        if num_pages < old_num_pages:
            if not self.make_room(tier, old_num_pages - num_pages):
                return False
            survivors = [page for page in self._pages[tier][num_pages:] if page is not None]
            new_ids = allocator.allocate_below(num_pages, len(survivors))
            assert new_ids is not None, "make_room left enough free pages below the new end"
            for page, new_id in zip(survivors, new_ids, strict=True):
                self._moves.append(PageMove(tier, page.page_id, tier, new_id))
                allocator.free([page.page_id])
                self._pages[tier][page.page_id] = None
                page.page_id = new_id
                self._pages[tier][new_id] = page
        allocator.resize(num_pages)
        pages = self._pages[tier]
        del pages[num_pages:]
        pages.extend([None] * (num_pages - len(pages)))
        return True

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
            self._queues[page.tier].push(page, held=page.num_holders > 0, evict_first=evict_first)

    def _dequeue(self, page: Page) -> None:
        queue = self._queues[page.tier]
        if page in queue:
            queue.remove(page)

    def _free(self, page: Page) -> None:
        self._dequeue(page)
        self._pages[page.tier][page.page_id] = None
        self._allocators[page.tier].free([page.page_id])
        if page.block is not None:
            page.block.page = None
            page.block = None

    def _forget_pages(self, blocks: Sequence[Block]) -> None:
        """Frees the unheld pages of blocks that left the tree; held ones become orphans."""
        if blocks and self.on_blocks_removed is not None:
            self.on_blocks_removed(blocks)
        for block in blocks:
            page = block.page
            if page is not None and not page.num_holders:
                self._free(page)

    def _is_live(self, page: Page) -> bool:
        pages = self._pages.get(page.tier)
        return pages is not None and 0 <= page.page_id < len(pages) and pages[page.page_id] is page

    def _check_live(self, page: Page) -> None:
        if not isinstance(page, Page) or not self._is_live(page):
            raise ValueError(f"{page!r} is not a live page of this pool")

    def _check_tier(self, tier: Tier) -> Tier:
        if tier not in self._allocators:
            names = ", ".join(t.name for t in self.tiers)
            name = getattr(tier, "name", repr(tier))
            raise ValueError(f"tier {name} is not configured here; tiers are {names}")
        return tier

    def check_invariants(self) -> None:
        """Raises `AssertionError` unless every page is in exactly one place, counts and queues
        agree with the statuses, and every tree block has its page."""
        self.tree.check_invariants()
        seen: set[int] = set()
        for tier in self.tiers:
            allocator, queue = self._allocators[tier], self._queues[tier]
            allocator.check_invariants()
            queue.check_invariants()
            queued = 0
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
                in_queue = page in queue
                assert in_queue == self._is_evictable(page), f"{page!r} queued={in_queue}"
                if in_queue:
                    kind = queue.held if page.num_holders else queue.droppable
                    assert page in kind, f"{page!r} is queued as the wrong kind"
                queued += in_queue
            assert queued == len(queue), f"{tier.name} queue holds pages that are not live"
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
