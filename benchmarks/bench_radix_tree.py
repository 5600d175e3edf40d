"""Host-side costs of prefix reuse: key hashing, radix-tree match and insert, eviction per block.

Each figure is measured at trees of several sizes to show it stays flat. Key hashing is compared
with a vLLM-style SHA-256 block hash (pickle of parent hash and token tuple) timed in the same run.

    python -m benchmarks.bench_radix_tree [--sizes 1000 100000 1000000] [--out results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from kvjax.cache import BlockRadixTree, ReuseScope, Tier, TieredPages, block_keys

SCOPE = ReuseScope()
BLOCKS_PER_SEQUENCE = 64
VOCAB = 128_000


def random_tokens(rng: np.random.Generator, count: int) -> list[int]:
    return rng.integers(0, VOCAB, size=count).tolist()


def median_time(fn, repeats: int) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sha256_block_keys(tokens: list[int], tokens_per_block: int) -> list[bytes]:
    """The vLLM default: SHA-256 over a pickle of (parent hash, block token tuple, extra keys)."""
    keys, parent = [], b"\0" * 32
    for start in range(0, len(tokens), tokens_per_block):
        block = tuple(tokens[start : start + tokens_per_block])
        parent = hashlib.sha256(pickle.dumps((parent, block, None), protocol=5)).digest()
        keys.append(parent)
    return keys


def bench_hashing(rng, tokens_per_block: int, repeats: int) -> dict:
    tokens = random_tokens(rng, 1 << 16)
    ours = median_time(lambda: block_keys(SCOPE, tokens, tokens_per_block), repeats)
    sha = median_time(lambda: sha256_block_keys(tokens, tokens_per_block), repeats)
    return {
        "tokens": len(tokens),
        "blake3_ns_per_token": ours / len(tokens) * 1e9,
        "sha256_pickle_ns_per_token": sha / len(tokens) * 1e9,
    }


def commit_sequence(pages: TieredPages, tokens: list[int]) -> bool:
    """Commits `tokens` as a cache would and closes it; False when no pages were left."""
    tpb = pages.tree.tokens_per_block
    new_pages = pages.allocate(-(-len(tokens) // tpb))
    if new_pages is None:
        return False
    parent = SCOPE
    for page, start in zip(new_pages, range(0, len(tokens), tpb), strict=True):
        parent = pages.commit(page, parent, tokens[start : start + tpb]).block
    for page in reversed(new_pages):
        pages.unlock(page)
        pages.release(page)
    return True


def build(rng, num_blocks: int, tokens_per_block: int, num_host_pages: int):
    """A device pool exactly full of cached blocks: sequences of 64 blocks under one scope."""
    pages = TieredPages(BlockRadixTree(tokens_per_block), num_blocks + 1, num_host_pages)
    sequences = []
    while len(pages.tree) < num_blocks:
        blocks = min(BLOCKS_PER_SEQUENCE, num_blocks - len(pages.tree))
        tokens = random_tokens(rng, blocks * tokens_per_block)
        assert commit_sequence(pages, tokens)
        sequences.append(tokens)
    return pages, sequences


def bench_tree(rng, num_blocks: int, tokens_per_block: int, repeats: int) -> dict:
    start = time.perf_counter()
    pages, sequences = build(rng, num_blocks, tokens_per_block, num_host_pages=0)
    build_s = time.perf_counter() - start
    tree = pages.tree
    full = [s for s in sequences if len(s) == BLOCKS_PER_SEQUENCE * tokens_per_block]
    queries = [full[i] for i in rng.integers(0, len(full), size=repeats)]
    match_us = statistics.median(median_time(lambda q=q: tree.match(SCOPE, q), 1) for q in queries)
    assert tree.match(SCOPE, queries[0]).num_tokens == len(queries[0])

    # Insert: new blocks under random blocks of random sequences, timed one batch at a time, then
    # removed so the tree keeps its size.
    insert_times = []
    for _ in range(repeats):
        chains = [tree.match(SCOPE, full[i]).blocks for i in rng.integers(0, len(full), 100)]
        parents = [chain[rng.integers(0, len(chain))] for chain in chains]
        new_tokens = [random_tokens(rng, tokens_per_block) for _ in parents]
        begin = time.perf_counter()
        inserted = [tree.insert(p, t).block for p, t in zip(parents, new_tokens, strict=True)]
        insert_times.append((time.perf_counter() - begin) / len(parents))
        for block in inserted:
            tree.remove(block)

    # Eviction: make room for k pages in a full device-only pool (drops the LRU leaves), then
    # refill with new sequences (untimed) so the tree keeps its size.
    batch = max(1, min(1024, num_blocks // 10))
    evict_times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        assert pages.make_room(Tier.DEVICE, batch)
        evict_times.append((time.perf_counter() - begin) / batch)
        refill = random_tokens(rng, batch * tokens_per_block)
        assert commit_sequence(pages, refill)
    return {
        "blocks": num_blocks,
        "build_s": build_s,
        "match_64_blocks_us": match_us * 1e6,
        "insert_us": statistics.median(insert_times) * 1e6,
        "evict_drop_us_per_block": statistics.median(evict_times) * 1e6,
        "evict_batch": batch,
    }


def bench_offload(rng, num_blocks: int, tokens_per_block: int, repeats: int) -> dict:
    """Eviction that moves pages to a host tier instead of dropping them."""
    batch = max(1, min(1024, num_blocks // 10))
    pages, _ = build(rng, num_blocks, tokens_per_block, num_host_pages=batch * repeats)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        assert pages.make_room(Tier.DEVICE, batch)
        times.append((time.perf_counter() - begin) / batch)
        assert len(pages.take_moves()) == batch
        assert commit_sequence(pages, random_tokens(rng, batch * tokens_per_block))
    return {"blocks": num_blocks, "evict_to_host_us_per_block": statistics.median(times) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--tokens-per-block", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    tpb = args.tokens_per_block

    hashing = bench_hashing(rng, tpb, args.repeats)
    print(
        f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )
    print(
        f"key hashing, {tpb} tokens/block: blake3 chain {hashing['blake3_ns_per_token']:.1f} "
        f"ns/token; vLLM-style sha256(pickle) {hashing['sha256_pickle_ns_per_token']:.1f} "
        f"ns/token (same run)"
    )
    print(
        f"{'blocks':>9} {'build s':>8} {'match 64 blk us':>16} {'insert us':>10} "
        f"{'evict(drop) us/blk':>19} {'evict(to host) us/blk':>22}"
    )
    trees = []
    for size in args.sizes:
        row = bench_tree(rng, size, tpb, args.repeats)
        row.update(bench_offload(rng, size, tpb, args.repeats))
        trees.append(row)
        print(
            f"{size:>9} {row['build_s']:>8.1f} {row['match_64_blocks_us']:>16.1f} "
            f"{row['insert_us']:>10.2f} {row['evict_drop_us_per_block']:>19.2f} "
            f"{row['evict_to_host_us_per_block']:>22.2f}",
            flush=True,
        )
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_rss_mib:.0f} MiB")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tokens_per_block": tpb,
        "hashing": hashing,
        "trees": trees,
        "peak_rss_mib": peak_rss_mib,
    }
    path = args.out / "bench_radix_tree.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
