import pytest

from kvjax.cache.pages import Page, PageAllocator, PageStatus, Tier


def test_device_allocator_never_hands_out_null_page():
    allocator = PageAllocator(5, reserve_null_page=True)
    assert allocator.num_free == allocator.num_usable == 4
    assert allocator.allocate(4) == [1, 2, 3, 4]
    assert allocator.allocate(0) == []
    assert allocator.allocate(1) is None
    allocator.check_invariants()


def test_host_allocator_uses_page_zero():
    assert PageAllocator(3, reserve_null_page=False).allocate(3) == [0, 1, 2]


def test_allocate_is_all_or_nothing_and_free_order_is_fifo():
    allocator = PageAllocator(6, reserve_null_page=True)
    assert allocator.allocate(3) == [1, 2, 3]
    assert allocator.allocate(3) is None
    assert allocator.num_free == 2  # nothing taken by the failed call
    allocator.free([3])
    allocator.free([1])
    assert allocator.allocate(4) == [4, 5, 3, 1]
    allocator.check_invariants()


@pytest.mark.parametrize("bad", [[0], [6], [2, 2], [4]])
def test_bad_free_raises_and_changes_nothing(bad):
    allocator = PageAllocator(6, reserve_null_page=True)
    allocator.allocate(3)
    with pytest.raises(ValueError, match="page"):
        allocator.free(bad)
    assert allocator.num_free == 2
    allocator.check_invariants()


def test_negative_count_raises():
    with pytest.raises(ValueError, match="count=-1"):
        PageAllocator(4, reserve_null_page=True).allocate(-1)


def test_status_is_derived_from_holders_and_locks():
    page = Page(Tier.DEVICE, 3, priority=35)
    assert page.status is PageStatus.DROPPABLE and not page.is_committed
    page.num_holders = 2
    assert page.status is PageStatus.HELD
    page.num_locks = 1
    assert page.status is PageStatus.LOCKED


def test_allocate_below_and_resize():
    allocator = PageAllocator(6, reserve_null_page=True)
    assert allocator.allocate(5) == [1, 2, 3, 4, 5]
    allocator.free([5, 2, 1])
    assert allocator.allocate_below(3, 3) is None  # only 2 and 1 lie below 3
    assert allocator.allocate_below(3, 2) == [2, 1]
    with pytest.raises(ValueError, match=r"pages \[3, 4\] are in use"):
        allocator.resize(3)
    allocator.free([3, 4])
    allocator.resize(5)  # page 5 was free: it goes
    assert allocator.num_pages == 5 and allocator.allocate(3) is None
    assert allocator.allocate(2) == [3, 4]
    allocator.resize(7)
    assert allocator.allocate(2) == [5, 6]
    allocator.check_invariants()
