"""The eviction cascade over the tiers' page states: queries, making room, relocation, quotas.

Making room on a tier evicts its least valuable pages (lowest priority, least recent) to the
colder tiers. A page pushed into a full tier makes room there in turn, or, when that tier cannot
shed a page itself, passes on to the next one; so a tier's HELD pages never limit what flows
through it. When the colder tiers cannot take every victim (they are full of HELD pages), the
HELD victims get the room and the least valuable DROPPABLE victims are dropped (`_drop`, which
the subclass `TieredPages` carries out by removing the block and its subtree from the radix tree).
Pages rising to the device free their slots for the pages they displace. Every move is recorded
as a `PageMove` for the storage layer to carry out in order. Each operation checks feasibility
first, so it either succeeds or changes nothing; it succeeds whenever the tiers together can hold
its result, except a swap between tiers with no free or droppable page anywhere to stage it.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvjax.cache.checks import check_int
from kvjax.cache.pages import Page, Tier
from kvjax.cache.tier import PageMove, TierPages

__all__ = ["TierCascade"]


class TierCascade:
    """The device tier and the optional host and disk tiers, and page moves between them.

    Args:
        num_device_pages: device pool size, `NULL_PAGE` included.
        num_host_pages, num_disk_pages: sizes of the colder tiers; 0 leaves a tier out.
    """

    def __init__(
        self, num_device_pages: int, num_host_pages: int = 0, num_disk_pages: int = 0
    ) -> None:
        sizes = {
            Tier.DEVICE: check_int("num_device_pages", num_device_pages, minimum=0),
            Tier.HOST: check_int("num_host_pages", num_host_pages, minimum=0),
            Tier.DISK: check_int("num_disk_pages", num_disk_pages, minimum=0),
        }
        if sizes[Tier.DEVICE] < 2:
            raise ValueError(f"num_device_pages={num_device_pages} must be >= 2 (NULL_PAGE + 1)")
        self.tiers: tuple[Tier, ...] = tuple(tier for tier, size in sizes.items() if size > 0)
        self._next = dict(zip(self.tiers, self.tiers[1:], strict=False))
        self._tier = {tier: TierPages(tier, sizes[tier]) for tier in self.tiers}
        self._moves: list[PageMove] = []

    # -- queries ------------------------------------------------------------------------------

    def num_pages(self, tier: Tier) -> int:
        """Pages of `tier`, `NULL_PAGE` included: the length of its storage array."""
        return self._of(tier).num_pages

    def num_usable(self, tier: Tier) -> int:
        """Pages of `tier` that can be handed out (`NULL_PAGE` excluded)."""
        return self._of(tier).num_usable

    def num_free(self, tier: Tier) -> int:
        return self._of(tier).num_free

    def num_evictable(self, tier: Tier) -> int:
        return len(self._of(tier).queue)

    def utilization(self, tier: Tier = Tier.DEVICE) -> float:
        """Fraction of the usable pages of `tier` that are neither free nor evictable."""
        available = self.num_free(tier) + self.num_evictable(tier)
        return 1.0 - available / self.num_usable(tier)

    def page(self, tier: Tier, page_id: int) -> Page | None:
        """The live page at `page_id` of `tier`, or None when that page is free."""
        return self._of(tier).page_map[page_id]

    def live_pages(self, tier: Tier) -> Iterator[Page]:
        return self._of(tier).live_pages()

    def is_evictable(self, page: Page) -> bool:
        """Whether eviction may move or drop `page` to make room (it waits in a queue)."""
        self._check_live(page)
        return page in self._tier[page.tier].queue

    def eviction_order(self, tier: Tier) -> list[Page]:
        """Evictable pages of `tier`, next victim first."""
        return list(self._of(tier).queue)

    def take_moves(self) -> list[PageMove]:
        """The page moves recorded since the last call, in the order they must run."""
        moves, self._moves = self._moves, []
        return moves

    # -- eviction -----------------------------------------------------------------------------

    def make_room(self, tier: Tier, count: int) -> bool:
        """Makes `count` pages of `tier` free by evicting, or returns False and changes nothing."""
        self._of(tier)
        check_int("count", count, minimum=0)
        if count > self.num_free(tier) + self._num_freeable(tier):
            return False
        self._make_room(tier, count)
        return True

    def _num_acceptable(self, tier: Tier | None) -> int:
        """Pages `tier` and the tiers below it could take in from above: their free pages and
        their DROPPABLE ones. Pages pushed into a full tier continue down (its HELD pages, or the
        newcomers themselves), so a tier's HELD pages never limit what it passes on."""
        if tier is None:
            return 0
        below = self._num_acceptable(self._next.get(tier))
        return self.num_free(tier) + len(self._tier[tier].queue.droppable) + below

    def _num_freeable(self, tier: Tier) -> int:
        """Pages of `tier` that eviction can free."""
        # DROPPABLE pages can always go (moved or dropped); HELD ones only to a colder tier.
        queue = self._tier[tier].queue
        return len(queue.droppable) + min(
            len(queue.held), self._num_acceptable(self._next.get(tier))
        )

    def _make_room(self, tier: Tier, count: int) -> None:
        shortfall = count - self.num_free(tier)
        if shortfall <= 0:
            return
        colder = self._next.get(tier)
        room_below = self._num_acceptable(colder)
        victims = self._tier[tier].queue.pop_victims(shortfall, max_held=room_below)
        assert victims is not None, "feasibility was checked by the caller"
        # The room below goes to the HELD victims (they cannot be dropped), then to the most
        # recent DROPPABLE ones; the least valuable DROPPABLE victims are dropped.
        droppable = [page for page in victims if not page.num_holders]
        to_drop = droppable[: max(len(victims) - room_below, 0)]
        dropping = set(map(id, to_drop))
        # Open a slot below one page at a time, taking its id at once: a drop down there may
        # prune pages of this tier (victims included), so each step counts again what is still
        # needed. Moves go before drops, since a move keeps the data.
        moving: list[Page] = []
        slots: list[tuple[TierPages, int]] = []
        for page in victims:
            if id(page) in dropping or count - self.num_free(tier) - len(moving) <= 0:
                continue
            if not self._is_live(page):
                continue
            free_before = self.num_free(tier)
            slots.append(self._open_slot(colder))
            if self.num_free(tier) != free_before:  # pruned here: chosen victims may be gone
                moving = [chosen for chosen in moving if self._is_live(chosen)]
            if self._is_live(page):
                moving.append(page)
            self._free_slots(slots, len(slots) - len(moving))
        self._move_down(moving, slots)
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

    def _open_slot(self, tier: Tier) -> tuple[TierPages, int]:
        """Takes a free id on `tier`, evicting there when needed, or else on a colder tier (the
        page passes through); `_num_acceptable(tier)` must be positive."""
        state = self._tier[tier]
        if state.num_free + self._num_freeable(tier) == 0:
            return self._open_slot(self._next[tier])
        self._make_room(tier, 1)
        (page_id,) = state.allocator.allocate(1)
        return state, page_id

    def _move_down(self, victims: list[Page], slots: list[tuple[TierPages, int]]) -> None:
        """Moves dequeued victims (least valuable first) into as many ids opened for them on
        colder tiers, in order: the most valuable take the warmest tier."""
        slots.sort(key=lambda slot: -slot[0].tier)  # stable: each tier's ids in opened order
        for page, (target, target_id) in zip(victims, slots, strict=True):
            self._relocate([page], target, [target_id])
            self._enqueue(page)

    @staticmethod
    def _free_slots(slots: list[tuple[TierPages, int]], count: int) -> None:
        """Gives back the `count` coldest opened ids (their victims were pruned)."""
        for _ in range(count):
            coldest = max(range(len(slots)), key=lambda index: slots[index][0].tier)
            target, target_id = slots.pop(coldest)
            target.allocator.free([target_id])

    def _acquire_room(self, rising: list[Page], num_new: int) -> None:
        """Moves the dequeued `rising` pages to the device and leaves `num_new` device pages
        free, evicting others; the slots rising pages vacate take later victims. Feasible when
        `_can_acquire` says so."""
        rising = sorted(rising, key=lambda page: page.tier)
        while rising:
            room = self.num_free(Tier.DEVICE) + self._num_freeable(Tier.DEVICE)
            self._make_room(Tier.DEVICE, min(len(rising) + num_new, room))
            count = min(len(rising), self.num_free(Tier.DEVICE))
            assert count > 0, "feasibility was checked by _can_acquire"
            self._move_up(rising[:count])
            rising = rising[count:]
        self._make_room(Tier.DEVICE, num_new)

    def _can_acquire(self, targets: list[Page], num_new: int) -> bool:
        """Whether the device can take the rising `targets` and `num_new` new pages, the queued
        targets staying out of eviction: the slots rising pages vacate count, but only once the
        first one has risen (a swap of full tiers needs one page of room somewhere)."""
        device = Tier.DEVICE
        num_rising = sum(page.tier is not device for page in targets)
        needed = num_rising + num_new
        free = self.num_free(device)
        if needed <= free:
            return True
        # Targets hold their pages (HELD, never DROPPABLE): the device's queued ones must not
        # become victims, and those below take no room there.
        queue = self._tier[device].queue
        room_below = self._num_acceptable(self._next.get(device))
        num_held = len(queue.held) - sum(page in queue.held for page in targets)
        cheap = free + len(queue.droppable)
        if num_rising and cheap + min(num_held, room_below) == 0:
            return False
        return needed <= cheap + min(num_held, room_below + num_rising)

    def _move_up(self, pages: list[Page]) -> None:
        """Moves dequeued pages of colder tiers to the device, which has room for them."""
        device = self._tier[Tier.DEVICE]
        self._relocate(pages, device, device.allocator.allocate(len(pages)))

    def _relocate(self, pages: list[Page], target: TierPages, target_ids: list[int] | None) -> None:
        """Moves pages to `target_ids` of `target` (handed out for them), recording each move
        and freeing the ids they leave. Across tiers the pages must be dequeued; within a tier
        a queued page keeps its place (queues do not depend on ids)."""
        assert target_ids is not None, "make room on the target tier first"
        for page, target_id in zip(pages, target_ids, strict=True):
            self._moves.append(PageMove(page.tier, page.page_id, target.tier, target_id))
            self._tier[page.tier].vacate(page)
            target.place(page, target_id)

    def resize_tier(self, tier: Tier, num_pages: int) -> bool:
        """Changes the number of pages of `tier` (`NULL_PAGE` included on the device).

        Shrinking evicts the least valuable pages down the cascade until the survivors fit, then
        relocates survivors with ids past the new end into free ids below it (recorded as moves
        within the tier, which the storage must run before it shrinks its array). No page may be
        locked: suspend every cache first.

        Returns:
            False, with nothing changed, when the pages that must stay do not fit.
        """
        self._of(tier)
        check_int("num_pages", num_pages, minimum=2 if tier is Tier.DEVICE else 1)
        locked = next((page for page in self.live_pages(tier) if page.num_locks), None)
        if locked is not None:
            raise RuntimeError(f"cannot resize {tier.name} while {locked!r} is locked")
        state = self._tier[tier]
        old_num_pages = state.num_pages
        if num_pages < old_num_pages:
            if not self.make_room(tier, old_num_pages - num_pages):
                return False
            survivors = [page for page in state.page_map[num_pages:] if page is not None]
            # Queued survivors keep their place: relocation changes only their id.
            self._relocate(
                survivors, state, state.allocator.allocate_below(num_pages, len(survivors))
            )
        state.resize(num_pages)
        return True

    def _drop(self, page: Page) -> None:
        """Drops a dequeued DROPPABLE cached page (its block leaves the tree)."""
        raise NotImplementedError

    # -- filing -------------------------------------------------------------------------------

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
            queue = self._tier[page.tier].queue
            queue.push(page, held=page.num_holders > 0, evict_first=evict_first)

    def _dequeue(self, page: Page) -> None:
        self._tier[page.tier].queue.discard(page)

    def _free(self, page: Page) -> None:
        self._dequeue(page)
        self._tier[page.tier].vacate(page)
        if page.block is not None:
            page.block.page = None
            page.block = None

    def _is_live(self, page: Page) -> bool:
        state = self._tier.get(page.tier)
        return state is not None and state.holds(page)

    def _check_live(self, page: Page) -> None:
        if not isinstance(page, Page) or not self._is_live(page):
            raise ValueError(f"{page!r} is not a live page of this pool")

    def _of(self, tier: Tier) -> TierPages:
        state = self._tier.get(tier)
        if state is None:
            names = ", ".join(t.name for t in self.tiers)
            name = getattr(tier, "name", repr(tier))
            raise ValueError(f"tier {name} is not configured here; tiers are {names}")
        return state
