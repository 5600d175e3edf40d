"""kvjax: a paged KV cache for JAX with TensorRT-LLM KVCacheManagerV2 semantics.

The host side (config, keys, radix tree, pages, eviction, tiers, KVCache, KVCacheManager) is plain
Python and numpy; the device pool and its transfers live in `kvjax.storage` (JAX), which the manager
loads when it builds its storage.
"""

from kvjax.config import KV_DTYPES, CacheConfig
from kvjax.eviction import PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN, PrioritizedLRU
from kvjax.keys import DIGEST_SIZE, MAX_TOKEN_ID, ReuseScope, Token, block_keys
from kvjax.kv_cache import CacheStatus, CommitState, KVCache, OutOfPagesError
from kvjax.manager import KVCacheManager
from kvjax.multimodal import MultimodalItem, multimodal_key_tokens, splice_multimodal_tokens
from kvjax.pages import NULL_PAGE, Page, PageAllocator, PageStatus, Tier
from kvjax.radix_tree import Block, BlockRadixTree, InsertOutcome, InsertResult, MatchResult
from kvjax.stats import BlockRemoved, BlockStored, CacheStats, KVEvent
from kvjax.tiers import PageMove, TieredPages

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
