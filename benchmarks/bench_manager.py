"""Host bookkeeping per KVCache operation with many live caches (target: <= 5 us per cache per
decode step, i.e. resize by one token plus commit of one token).

Operations: create with a 64-block prefix hit (then close), one decode step (resize by one, commit
one token; every `tokens_per_block` steps this allocates a page and commits a block into the tree),
and suspend + resume. The device pool is a real (small-page) JAX array, but with room to spare no
page moves, so the figures are bookkeeping only.

    python -m benchmarks.bench_manager [--live-caches 256] [--steps 256] [--out results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from kvjax.cache import CacheConfig, KVCacheManager
from kvjax.runtime.storage import KVStorage

PREFIX_BLOCKS = 64
VOCAB = 128_000


def per_call_us(samples: list[float], calls: int) -> float:
    """Median over rounds of the wall time per call, in microseconds."""
    return statistics.median(samples) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live-caches", type=int, default=256)
    parser.add_argument("--steps", type=int, default=128, help="decode steps per cache")
    parser.add_argument("--tokens-per-block", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    tpb, live = args.tokens_per_block, args.live_caches

    blocks_per_cache = PREFIX_BLOCKS + -(-args.steps // tpb) + 1
    config = CacheConfig(
        num_layers=1,
        num_kv_heads=1,
        head_dim=8,
        tokens_per_block=tpb,
        dtype="float32",
        device_pages=live * blocks_per_cache + 2 * PREFIX_BLOCKS + 2,
        host_pages=0,
    )
    manager = KVCacheManager(config, KVStorage.for_config(config))
    prompt = rng.integers(0, VOCAB, PREFIX_BLOCKS * tpb).tolist()
    seed = manager.create_kv_cache()
    assert seed.resume() and seed.resize(capacity=len(prompt))
    seed.commit(prompt)
    seed.close()

    create_samples = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        caches = [manager.create_kv_cache(prompt) for _ in range(live)]
        create_samples.append(time.perf_counter() - start)
        assert caches[0].num_reused_tokens == len(prompt)
        for cache in caches:
            cache.close()

    # Each cache's own tokens: its first decode token differs, so its blocks are its own. Each
    # round decodes fresh caches; a step's time is divided over the caches it grew.
    round_means, resize_means, commit_means, step_samples = [], [], [], []
    for _ in range(args.rounds):
        for cache in manager.live_caches:
            cache.close()
        caches = [manager.create_kv_cache(prompt) for _ in range(live)]
        for cache in caches:
            assert cache.resume()
        tokens = rng.integers(0, VOCAB, (live, args.steps)).tolist()
        samples, resize_time, commit_time = [], 0.0, 0.0
        for step in range(args.steps):
            start = time.perf_counter()
            for cache in caches:
                cache.resize(cache.capacity + 1)
            middle = time.perf_counter()
            for cache, own in zip(caches, tokens, strict=True):
                cache.commit([own[step]])
            end = time.perf_counter()
            samples.append(end - start)
            resize_time += middle - start
            commit_time += end - middle
        assert caches[0].num_committed_tokens == len(prompt) + args.steps
        round_means.append(statistics.mean(samples))
        resize_means.append(resize_time / args.steps)
        commit_means.append(commit_time / args.steps)
        step_samples += samples

    suspend_samples = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for cache in caches:
            cache.suspend()
            assert cache.resume()
        suspend_samples.append(time.perf_counter() - start)
    manager.check_invariants()

    result = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "live_caches": live,
        "tokens_per_block": tpb,
        "prefix_blocks": PREFIX_BLOCKS,
        "create_64_block_hit_us": per_call_us(create_samples, live),
        "decode_step_median_us_per_cache": per_call_us(step_samples, live),
        "resize_by_one_us": statistics.median(resize_means) / live * 1e6,
        "commit_one_token_us": statistics.median(commit_means) / live * 1e6,
        "decode_step_mean_us_per_cache": statistics.median(round_means) / live * 1e6,
        "decode_step_p90_us_per_cache": float(np.percentile(step_samples, 90)) / live * 1e6,
        "suspend_resume_us": per_call_us(suspend_samples, live),
        "target_decode_step_us_per_cache": 5.0,
    }
    print(f"machine: {result['machine']}, Python {result['python']}, {live} live caches")
    print(f"create with a {PREFIX_BLOCKS}-block hit: {result['create_64_block_hit_us']:.1f} us")
    print(
        "decode step (resize +1, commit 1): "
        f"{result['decode_step_mean_us_per_cache']:.2f} us/cache mean, "
        f"{result['decode_step_median_us_per_cache']:.2f} median step, "
        f"{result['decode_step_p90_us_per_cache']:.2f} p90 (target <= 5)"
    )
    print(
        f"  of which resize by one {result['resize_by_one_us']:.2f} us, "
        f"commit of one token {result['commit_one_token_us']:.2f} us (means over steps)"
    )
    print(f"suspend + resume ({blocks_per_cache - 1} blocks): {result['suspend_resume_us']:.1f} us")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_manager.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
