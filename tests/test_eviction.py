import dataclasses

import pytest

from kvjax.cache.eviction import PRIORITY_DEFAULT, EvictionQueue, PrioritizedLRU, check_priority


@dataclasses.dataclass(eq=False)
class Item:
    name: str
    priority: int = PRIORITY_DEFAULT


def test_lowest_priority_goes_first_then_least_recent():
    lru = PrioritizedLRU()
    a, b, c, d = Item("a"), Item("b", 10), Item("c"), Item("d", 90)
    for item in (a, b, c, d):
        lru.push(item)
    lru.check_invariants()
    assert [item.name for item in lru] == ["b", "a", "c", "d"]
    assert lru.peek() is b
    assert [lru.pop().name for _ in range(4)] == ["b", "a", "c", "d"]
    assert len(lru) == 0
    with pytest.raises(IndexError):
        lru.pop()


def test_evict_first_pushes_to_the_front_of_its_priority():
    lru = PrioritizedLRU()
    a, b, c = Item("a"), Item("b"), Item("c", 0)
    lru.push(a)
    lru.push(b, evict_first=True)
    lru.push(c)
    assert [item.name for item in lru] == ["c", "b", "a"]


def test_remove_keeps_order_of_the_rest_and_membership():
    lru = PrioritizedLRU()
    items = [Item(str(i), priority=i % 3) for i in range(9)]
    for item in items:
        lru.push(item)
    lru.remove(items[3])
    lru.remove(items[0])
    lru.remove(items[6])  # priority 0 is now empty
    lru.check_invariants()
    assert items[3] not in lru and items[4] in lru
    assert [item.name for item in lru] == ["1", "4", "7", "2", "5", "8"]
    with pytest.raises(KeyError):
        lru.remove(items[3])
    with pytest.raises(ValueError, match="already queued"):
        lru.push(items[4])


@pytest.mark.parametrize("priority", [-1, 101, 1.5, True])
def test_priorities_outside_range_are_rejected(priority):
    with pytest.raises(ValueError, match="priority"):
        check_priority(priority)


@dataclasses.dataclass(eq=False)
class Page:
    name: str
    priority: int = PRIORITY_DEFAULT
    queued_at: int = 0


def test_eviction_queue_merges_held_and_droppable_in_one_order():
    queue = EvictionQueue()
    a, b, c, d = Page("a"), Page("b"), Page("c", 10), Page("d")
    queue.push(a, held=True)
    queue.push(b, held=False)
    queue.push(c, held=True)
    queue.push(d, held=False, evict_first=True)
    queue.check_invariants()
    assert [page.name for page in queue] == ["c", "d", "a", "b"]
    assert len(queue) == 4 and a in queue and len(queue.held) == 2


def test_pop_victims_skips_held_pages_beyond_the_room_below():
    queue = EvictionQueue()
    pages = [Page(str(i)) for i in range(5)]
    for i, page in enumerate(pages):
        queue.push(page, held=i < 3)  # 0, 1, 2 held; 3, 4 droppable
    assert queue.pop_victims(4, max_held=1) is None  # only 1 held + 2 droppable qualify
    assert len(queue) == 5
    assert [page.name for page in queue.pop_victims(3, max_held=1)] == ["0", "3", "4"]
    assert [page.name for page in queue] == ["1", "2"]
    queue.check_invariants()
