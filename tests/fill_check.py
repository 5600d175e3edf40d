"""Fill-and-check test engine (after the reference's FakeEngine).

For every token it "computes", it writes a pattern into the token's slot of the device pool: a
function of layer, K/V, head, dim and a hash of the token ids up to and including it. Before every
write it checks the history of the cache it writes to; `check_all` checks every history token of
every live cache on whichever tier its page is, and every token of every tree block: so a page
that moved, was copied, rebased or reused must still carry exactly the bytes its tokens produced.
Patterns are integers below 2**24, exact in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.cache import KVCacheManager
from kvjax.cache.keys import Token
from kvjax.cache.kv_cache import KVCache
from kvjax.cache.pages import Tier
from kvjax.cache.radix_tree import Block


def _token_hash(previous: int, token: Token) -> int:
    value = int.from_bytes(token[:8], "little") if isinstance(token, bytes) else int(token)
    return (previous * 1_000_003 + value + 1) % (2**61 - 1)


class FillCheckEngine:
    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        config = manager.config
        assert config.dtype == np.float32, "patterns are exact in float32 only"
        self.tpb = config.tokens_per_block
        layers, _, heads, _, dim = config.page_shape
        self.token_shape = (layers, 2, heads, dim)
        self.num_values = layers * 2 * heads * dim
        self._prefix_hashes: dict[int, list[int]] = {}  # by id(cache): one per written position
        self._tokens: dict[int, list[Token]] = {}

    def register(self, cache: KVCache) -> None:
        """Starts tracking a new cache; its reused prefix counts as written."""
        self._tokens[id(cache)] = []
        self._prefix_hashes[id(cache)] = []
        self._record(cache, 0, cache.committed_tokens)

    def tokens(self, cache: KVCache) -> list[Token]:
        """Tokens written so far (history and beyond)."""
        return self._tokens[id(cache)]

    def pattern(self, prefix_hash: int) -> np.ndarray:
        base = (prefix_hash % 4093) * self.num_values
        values = (base + np.arange(self.num_values)) % 2**24
        return values.astype(np.float32).reshape(self.token_shape)

    def _record(self, cache: KVCache, start: int, tokens) -> None:
        written, hashes = self._tokens[id(cache)], self._prefix_hashes[id(cache)]
        del written[start:], hashes[start:]
        previous = hashes[-1] if hashes else 0
        for token in tokens:
            previous = _token_hash(previous, token)
            written.append(token)
            hashes.append(previous)

    def write(self, cache: KVCache, tokens, start: int | None = None) -> None:
        """Computes `tokens` at positions `start...` (default: the history length)."""
        self.check(cache)
        start = cache.history_length if start is None else start
        assert start + len(tokens) <= cache.capacity, "writing past capacity"
        assert start <= len(self._tokens[id(cache)]), "writing past a gap"
        self._record(cache, start, tokens)
        pool = np.array(self.manager.pool)
        page_ids = cache.page_ids()
        hashes = self._prefix_hashes[id(cache)]
        for position in range(start, start + len(tokens)):
            page = page_ids[position // self.tpb]
            assert page != 0, "a cache wrote into NULL_PAGE"
            pool[page, :, :, :, position % self.tpb, :] = self.pattern(hashes[position])
        self.manager.pool = jnp.asarray(pool)

    def check(self, cache: KVCache, pool: np.ndarray | None = None) -> None:
        """Asserts the bytes of every history token of an ACTIVE `cache`."""
        if not cache.is_active:
            return
        pool = np.asarray(self.manager.pool) if pool is None else pool
        page_ids = cache.page_ids()
        hashes = self._prefix_hashes[id(cache)]
        assert len(hashes) >= cache.history_length, "history the engine never wrote"
        released = cache.released_blocks
        for position in range(cache.history_length):
            page = page_ids[position // self.tpb]
            if position // self.tpb in released:
                assert page == 0, f"{cache!r}: stale block {position // self.tpb} kept page {page}"
                continue
            got = pool[page, :, :, :, position % self.tpb, :]
            expected = self.pattern(hashes[position])
            assert np.array_equal(got, expected), (
                f"{cache!r}: position {position} in page {page} holds wrong bytes"
            )

    def check_all(self) -> None:
        """Checks every history token of every live cache (on whichever tier its page is, so
        suspended caches too), the tokens of every tree block, and the manager's invariants."""
        storage = self.manager.storage
        tiers = {Tier.DEVICE: np.asarray(storage.pool), Tier.HOST: storage.host}
        tiers[Tier.DISK] = storage.disk
        for cache in self.manager.live_caches:
            if id(cache) not in self._tokens or cache.kv_lost:  # lost bytes are never read
                continue
            hashes, pages = self._prefix_hashes[id(cache)], cache.pages()
            self._check_released(cache)
            for position in range(cache.history_length):
                page = pages[position // self.tpb]
                if page is None:  # stale: no later token reads it
                    continue
                got = tiers[page.tier][page.page_id, :, :, :, position % self.tpb, :]
                assert np.array_equal(got, self.pattern(hashes[position])), (
                    f"{cache!r}: position {position} in {page!r} holds wrong bytes"
                )
        for block in self.manager.pages.tree.iter_blocks():
            self._check_block(block, tiers)
        self.manager.check_invariants()

    def _check_released(self, cache: KVCache) -> None:
        """Once every stale block may go (committed, or no longer committable), exactly the
        stale range has gone; the sinks and the live window keep their pages."""
        cycle = self.manager.pages.life_cycle
        start, end = cycle.stale_range(cache.history_length, self.tpb)
        settled = cache.commit_state.name != "ALLOWED" or (
            cache.num_committed_tokens // self.tpb >= end
        )
        if settled and end > start:
            assert cache.released_blocks == range(start, end), (
                f"{cache!r} released {cache.released_blocks}, stale {range(start, end)}"
            )
        elif end <= start:
            assert not cache.released_blocks, f"{cache!r} released {cache.released_blocks}"

    def _check_block(self, block, tiers) -> None:
        if block.page is None:  # a window's block whose page was evicted: nothing to read
            return
        chain = []
        node = block
        while isinstance(node, Block):
            chain.append(node)
            node = node.parent
        prefix_hash = 0
        for ancestor in reversed(chain[1:]):
            for token in ancestor.tokens:
                prefix_hash = _token_hash(prefix_hash, token)
        page = block.page
        for offset, token in enumerate(block.tokens):
            prefix_hash = _token_hash(prefix_hash, token)
            got = tiers[page.tier][page.page_id, :, :, :, offset, :]
            assert np.array_equal(got, self.pattern(prefix_hash)), (
                f"tree {block!r} offset {offset} in {page!r} holds wrong bytes"
            )

    def run_step(self, cache: KVCache, tokens, *, commit: bool = True) -> bool:
        """Grows capacity for `tokens`, writes them and commits them; False when out of pages."""
        if not cache.resize(max(cache.capacity, cache.history_length + len(tokens))):
            return False
        self.write(cache, tokens)
        if commit:
            cache.commit(tokens)
        else:
            cache.resize(history_length=cache.history_length + len(tokens))
        return True
