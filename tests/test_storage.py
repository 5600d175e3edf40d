"""KVStorage and the page ops: byte-exact copies on every tier, in-order moves, no recompiles,
donated pools."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernels.page_copy import copy_pages, gather_pages, scatter_pages
from kvjax.cache.pages import NULL_PAGE, Tier
from kvjax.cache.tier import PageMove, PageMoveError
from kvjax.runtime import page_ops as page_ops_module
from kvjax.runtime.page_ops import page_bucket
from kvjax.runtime.storage import KVStorage
from tests.bits import assert_same_bytes, random_bits

PAGE_SHAPE = (2, 2, 2, 4, 8)  # num_layers, K/V, num_kv_heads, tokens_per_block, head_dim
DTYPES = [np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)]
D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK  # K: the disk tier


def random_pages(rng, num_pages, dtype):
    return random_bits(rng, (num_pages, *PAGE_SHAPE), dtype)


@pytest.mark.parametrize(("count", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16)])
def test_page_bucket(count, bucket):
    assert page_bucket(count) == bucket


# -- KVStorage ---------------------------------------------------------------------------------


def make_storage(tmp_path, dtype=DTYPES[0], seed=0, impl="xla"):
    """Storage of 8 device, 6 host and 5 disk pages, each page a distinct random pattern."""
    storage = KVStorage(PAGE_SHAPE, dtype, 8, 6, 5, disk_dir=tmp_path, impl=impl)
    rng = np.random.default_rng(seed)
    storage.pool = jnp.asarray(random_pages(rng, 8, dtype))
    storage.host[:] = random_pages(rng, 6, dtype)
    storage.disk[:] = random_pages(rng, 5, dtype)
    return storage


def snapshot(storage):
    """Host copies of every tier, the model that reference moves run on."""
    return {
        D: np.array(storage.pool),
        H: storage.host.copy(),
        K: np.array(storage.disk),
    }


def run_one_by_one(model, moves):
    for move in moves:
        model[move.dst_tier][move.dst_page] = model[move.src_tier][move.src_page]


def assert_matches(storage, model):
    assert_same_bytes(storage.pool, model[D])
    assert_same_bytes(storage.host, model[H])
    assert_same_bytes(storage.disk, model[K])


def moves_of(*specs):
    return [PageMove(*spec) for spec in specs]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_runs_moves_in_order_across_every_tier_pair(tmp_path, dtype, impl):
    storage = make_storage(tmp_path, dtype, impl=impl)
    model = snapshot(storage)
    steps = [
        # Offload, then onload into another page; the second D->H writes host 0 again.
        moves_of((D, 5, H, 0), (D, 6, H, 1), (D, 7, H, 0), (H, 0, D, 4)),
        # A chain: page 3 must end as the old page 1; then a swap that must not swap.
        moves_of((D, 1, D, 2), (D, 2, D, 3), (D, 2, D, 5), (D, 5, D, 2)),
        moves_of((H, 2, K, 0), (H, 3, K, 1), (K, 0, H, 4), (K, 1, D, 6), (K, 2, D, 7)),
        moves_of((D, 3, K, 3), (D, 0, K, 4), (K, 3, K, 2), (H, 5, H, 0), (D, 6, H, 5)),
    ]
    counts = {}
    for moves in steps:
        for kind, count in storage.apply(moves).items():
            counts[kind] = counts.get(kind, 0) + count
        run_one_by_one(model, moves)
        assert_matches(storage, model)
    assert counts == {
        (D, H): 4,
        (H, D): 1,
        (D, D): 4,
        (H, K): 2,
        (K, H): 1,
        (K, D): 2,
        (D, K): 2,
        (K, K): 1,
        (H, H): 1,
    }


def test_apply_chain_copies_the_old_page(tmp_path):
    storage = make_storage(tmp_path)
    old_page_1 = storage.read_pages(D, [1])
    storage.apply(moves_of((D, 1, D, 2), (D, 2, D, 3)))
    assert_same_bytes(storage.read_pages(D, [2, 3]), np.concatenate([old_page_1, old_page_1]))


def test_apply_random_moves_match_one_by_one(tmp_path):
    rng = np.random.default_rng(7)
    storage = make_storage(tmp_path, DTYPES[1])
    model = snapshot(storage)
    sizes = {D: 8, H: 6, K: 5}
    for _ in range(12):
        moves = []
        while len(moves) < 16:  # runs of one kind, so batches form and get cut
            src_tier, dst_tier = rng.choice(list(Tier), 2)
            for _ in range(rng.integers(1, 6)):
                dst_first = 1 if dst_tier == D else 0
                moves.append(
                    PageMove(
                        Tier(src_tier),
                        int(rng.integers(sizes[Tier(src_tier)])),
                        Tier(dst_tier),
                        int(rng.integers(dst_first, sizes[Tier(dst_tier)])),
                    )
                )
        storage.apply(moves)
        run_one_by_one(model, moves)
        assert_matches(storage, model)


def test_device_batches_never_read_a_page_they_write(tmp_path, monkeypatch):
    calls = []

    def spy(op):
        def checked(pool, *args, **kwargs):
            *_, dst, num_valid = args
            src = args[0][:num_valid] if op is copy_pages else []
            dst = list(dst[:num_valid])
            assert len(set(dst)) == len(dst) and not set(src) & set(dst)
            calls.append(op.__name__)
            return op(pool, *args, **kwargs)

        return checked

    monkeypatch.setattr(page_ops_module, "copy_pages", spy(copy_pages))
    monkeypatch.setattr(page_ops_module, "scatter_pages", spy(scatter_pages))
    storage = make_storage(tmp_path)
    model = snapshot(storage)
    moves = moves_of(
        (D, 1, D, 2), (D, 2, D, 3),  # reads a page the batch wrote: cut
        (D, 4, D, 5), (D, 6, D, 4),  # writes a page the batch read: cut
        (D, 7, D, 1), (D, 3, D, 1),  # writes a page the batch wrote: cut
        (H, 0, D, 1), (H, 1, D, 2), (H, 2, D, 1),  # the same for scatter_pages
    )  # fmt: skip
    storage.apply(moves)
    run_one_by_one(model, moves)
    assert_matches(storage, model)
    assert calls == ["copy_pages"] * 4 + ["scatter_pages"] * 2


@pytest.mark.parametrize(
    ("op", "kind"), [("gather_pages", (D, H)), ("scatter_pages", (H, D)), ("copy_pages", (D, D))]
)
def test_counts_in_one_bucket_reuse_one_compilation(tmp_path, op, kind):
    storage = make_storage(tmp_path)
    fn = {"gather_pages": gather_pages, "scatter_pages": scatter_pages, "copy_pages": copy_pages}
    src, dst = kind
    storage.apply([PageMove(src, page, dst, page + 1) for page in range(3)])
    compiled = fn[op]._cache_size()
    assert storage.apply([PageMove(src, page, dst, page + 1) for page in range(4)]) == {kind: 4}
    assert fn[op]._cache_size() == compiled


@pytest.mark.parametrize(
    "bad",
    [
        PageMove(D, 1, K, 0),  # no disk tier
        PageMove(D, 8, H, 0),
        PageMove(D, 1, H, 6),
        PageMove(H, -1, D, 1),
        PageMove(D, 2, D, NULL_PAGE),
        PageMove(H, 0, D, NULL_PAGE),
        PageMove(1, 0, D, 1),
    ],
    ids=str,
)
def test_bad_move_raises_and_changes_nothing(bad):
    storage = KVStorage(PAGE_SHAPE, np.float32, 8, 6)
    storage.pool = jnp.asarray(random_pages(np.random.default_rng(0), 8, np.dtype(np.float32)))
    pool, host = np.array(storage.pool), storage.host.copy()
    with pytest.raises(ValueError, match="PageMove"):
        storage.apply([PageMove(D, 1, H, 2), PageMove(D, 3, D, 4), bad])
    assert_same_bytes(storage.pool, pool)
    assert_same_bytes(storage.host, host)


@pytest.mark.parametrize(
    "value",
    [
        jnp.zeros((7, *PAGE_SHAPE), jnp.float32),
        jnp.zeros((8, *PAGE_SHAPE), jnp.bfloat16),
        np.zeros((8, *PAGE_SHAPE), np.float32),
    ],
    ids=["shape", "dtype", "numpy"],
)
def test_pool_setter_refuses_another_shape_or_dtype(value):
    storage = KVStorage(PAGE_SHAPE, np.float32, 8)
    pool = storage.pool
    with pytest.raises(ValueError, match=r"float32\[8, 2, 2, 2, 4, 8\]"):
        storage.pool = value
    assert storage.pool is pool


def test_construction_errors_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="disk_dir"):
        KVStorage(PAGE_SHAPE, np.float32, 8, num_disk_pages=2)
    with pytest.raises(ValueError, match="float64"):
        KVStorage(PAGE_SHAPE, np.float64, 8)
    with pytest.raises(ValueError, match="num_device_pages"):
        KVStorage(PAGE_SHAPE, np.float32, 1)
    storage = KVStorage(PAGE_SHAPE, ml_dtypes.bfloat16, 8, 0, 3, disk_dir=tmp_path)
    assert storage.page_bytes == 2 * 2 * 2 * 4 * 8 * 2
    assert [storage.num_pages(tier) for tier in Tier] == [8, 0, 3]
    assert [storage.nbytes(tier) for tier in Tier] == [8 * 512, 0, 3 * 512]
    assert storage.host is None
    assert list(tmp_path.iterdir()) == []  # the disk file is anonymous


@pytest.mark.parametrize("tier", list(Tier), ids=str)
def test_resize_keeps_the_kept_pages(tmp_path, tier):
    storage = make_storage(tmp_path)
    size = storage.num_pages(tier)
    before = storage.read_pages(tier, range(size))
    storage.resize(tier, size + 3)
    after = storage.read_pages(tier, range(size + 3))
    assert_same_bytes(after[:size], before)
    assert not after[size:].any()
    storage.resize(tier, 2)
    assert storage.num_pages(tier) == 2
    assert_same_bytes(storage.read_pages(tier, [0, 1]), before[:2])
    storage.apply([PageMove(tier, 1, D, 1)])  # the resized tier still works
    assert_same_bytes(storage.read_pages(D, [1]), before[1:2])
    assert list(tmp_path.iterdir()) == []


def test_resize_errors(tmp_path):
    storage = KVStorage(PAGE_SHAPE, np.float32, 8, 4)
    with pytest.raises(ValueError, match="tier"):
        storage.resize(K, 4)
    with pytest.raises(ValueError, match="num_pages"):
        storage.resize(D, 1)
    with pytest.raises(ValueError, match="num_pages"):
        storage.resize(H, 0)
    assert [storage.num_pages(tier) for tier in Tier] == [8, 4, 0]


def test_close_is_idempotent_and_later_use_raises(tmp_path):
    storage = make_storage(tmp_path)
    storage.close()
    storage.close()
    for use in (
        lambda: storage.pool,
        lambda: storage.host,
        lambda: storage.num_pages(D),
        lambda: storage.apply([PageMove(D, 1, H, 0)]),
        lambda: storage.read_pages(H, [0]),
        lambda: storage.resize(H, 2),
    ):
        with pytest.raises(RuntimeError, match="closed"):
            use()


def test_the_disk_tier_is_reserved_up_front_or_refused_clearly(tmp_path, monkeypatch):
    import errno
    import os

    storage = KVStorage(PAGE_SHAPE, DTYPES[0], 4, 0, 3, disk_dir=tmp_path, impl="xla")
    num_bytes = storage.nbytes(Tier.DISK)
    assert os.fstat(storage.disk.fileno()).st_blocks * 512 >= num_bytes  # not sparse
    storage.close()

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(
        OSError, match=rf"the disk tier needs {num_bytes} bytes in .*; \d+ are free"
    ):
        KVStorage(PAGE_SHAPE, DTYPES[0], 4, 0, 3, disk_dir=tmp_path, impl="xla")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_failed_disk_io_is_reported_per_move_and_the_other_moves_land(tmp_path, monkeypatch):
    import errno
    import os

    storage = make_storage(tmp_path)
    before = {tier: storage.read_pages(tier, range(storage.num_pages(tier))) for tier in (D, H)}
    real_pwrite = os.pwrite
    bad_offset = 3 * storage.page_bytes  # disk page 3

    def pwrite(fd, data, offset):
        if offset == bad_offset:
            raise OSError(errno.EIO, "Input/output error")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    moves = [PageMove(D, 1, K, 2), PageMove(H, 0, K, 3), PageMove(D, 2, K, 4), PageMove(H, 1, D, 5)]
    with pytest.raises(PageMoveError, match=r"1 page moves failed \(positions \[1\]\)") as error:
        storage.apply(moves)
    assert error.value.failed == [1]
    assert_same_bytes(storage.read_pages(K, [2, 4]), before[D][[1, 2]])
    assert_same_bytes(storage.read_pages(D, [5]), before[H][[1]])
