"""The cache layer (no JAX): geometry and quotas, block keys, the radix tree, pages on tiers with
prioritized eviction, the per-sequence `KVCache` and the `KVCacheManager` that owns them.

Imports nothing above it; the bytes live in a storage the manager is given (`kvjax.runtime`).
"""

from kvjax.cache.blocks import Block, InsertOutcome, InsertResult, MatchResult
from kvjax.cache.config import KV_DTYPES, CacheConfig
from kvjax.cache.eviction import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, PrioritizedLRU
from kvjax.cache.keys import DIGEST_SIZE, MAX_TOKEN_ID, ReuseScope, Token, block_keys
from kvjax.cache.kv_cache import CacheStatus, CommitState, KVCache, OutOfPagesError
from kvjax.cache.manager import KVCacheManager
from kvjax.cache.multimodal import MultimodalItem, multimodal_key_tokens, splice_multimodal_tokens
from kvjax.cache.pages import NULL_PAGE, Page, PageAllocator, PageStatus, Tier
from kvjax.cache.radix_tree import BlockRadixTree
from kvjax.cache.stats import BlockRemoved, BlockStored, CacheStats, KVEvent
from kvjax.cache.tier import PageMove, PageMoveError
from kvjax.cache.tiers import TieredPages

__all__ = [
    "DIGEST_SIZE",
    "KV_DTYPES",
    "MAX_TOKEN_ID",
    "NULL_PAGE",
    "PRIORITY_DEFAULT",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "Block",
    "BlockRadixTree",
    "BlockRemoved",
    "BlockStored",
    "CacheConfig",
    "CacheStats",
    "CacheStatus",
    "CommitState",
    "InsertOutcome",
    "InsertResult",
    "KVCache",
    "KVCacheManager",
    "KVEvent",
    "MatchResult",
    "MultimodalItem",
    "OutOfPagesError",
    "Page",
    "PageAllocator",
    "PageMove",
    "PageMoveError",
    "PageStatus",
    "PrioritizedLRU",
    "ReuseScope",
    "Tier",
    "TieredPages",
    "Token",
    "block_keys",
    "multimodal_key_tokens",
    "splice_multimodal_tokens",
]
