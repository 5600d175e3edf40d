"""Sliding windows: the pages a request holds and the decode attention it costs, windowed against
full attention, at growing contexts.

Pages: a request is served as the engine does (prompt committed in 2048-token chunks, then 64
decode steps) on a `KVCacheManager` whose layers attend as in a Gemma-3-4B-shaped model (34
layers: 5 local with a `--window` of 1024, then 1 global), a Mistral-shaped one (every layer
windowed) and one with full attention everywhere; the device pages it holds at the end are
counted. One page holds a block of every layer, so it goes only once every layer is done with
it; `per_group_projection` is what pages per layer group would hold (from the groups' stale
ranges; not served yet).

Attention: decode attention of one Gemma-3-4B layer (8 query heads, 4 KV heads, head_dim 256,
bf16, 16-token pages), full and windowed, `--batch` sequences of each context on permuted pages,
and the sum over the model's layers (28 local, 6 global). The XLA path runs everywhere; the Pallas
kernel is timed only on a GPU (interpret mode is not a timing).

    python -m benchmarks.bench_windows [--contexts 4096 16384] [--window 1024] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax

from benchmarks.bench_kernels import decode_inputs, median_seconds
from kernels.paged_attention import paged_decode_attention
from kvjax.cache import CacheConfig, KVCacheManager
from kvjax.cache.life_cycles import LayerAttention, LayerGroups, windows_by_layer
from kvjax.runtime.storage import KVStorage

Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK, NUM_LAYERS = 8, 4, 256, 16, 34
PAGE_BYTES = NUM_LAYERS * 2 * KV_HEADS * TOKENS_PER_BLOCK * HEAD_DIM * 2  # bf16, every layer
CHUNK, DECODE_STEPS = 2048, 64


def patterns(window: int) -> dict[str, list[LayerAttention]]:
    return {
        "full": windows_by_layer(NUM_LAYERS, [None]),
        "gemma3_5to1": windows_by_layer(NUM_LAYERS, [window] * 5 + [None]),
        "mistral_all_windowed": windows_by_layer(NUM_LAYERS, [window]),
    }


def pages_held(layers: list[LayerAttention], context: int) -> dict:
    """Device pages one request holds once `context` tokens are in its history."""
    # Page counts do not depend on the page's bytes: a small page keeps the pool small.
    config = CacheConfig(
        num_layers=NUM_LAYERS, num_kv_heads=1, head_dim=1, tokens_per_block=TOKENS_PER_BLOCK,
        dtype="float32", device_pages=context // TOKENS_PER_BLOCK + 64, host_pages=0,
        layer_attention=layers,
    )  # fmt: skip
    manager = KVCacheManager(config, KVStorage.for_config(config))
    cache = manager.create_kv_cache()
    assert cache.resume()
    prompt = list(range(context - DECODE_STEPS))
    peak = 0
    for start in range(0, len(prompt), CHUNK):  # chunked prefill, committed for reuse
        chunk = prompt[start : start + CHUNK]
        assert cache.resize(capacity=cache.history_length + len(chunk))
        peak = max(peak, len(cache.held_pages()))
        cache.commit(chunk)
    cache.stop_committing()
    for _ in range(DECODE_STEPS):
        assert cache.resize(capacity=cache.history_length + 1)
        peak = max(peak, len(cache.held_pages()))
        cache.resize(history_length=cache.history_length + 1)
    held = len(cache.held_pages())
    cache.close()
    manager.shutdown()
    return {"pages_held": held, "peak_pages_held": peak, "blocks": cache_blocks(context)}


def cache_blocks(context: int) -> int:
    return -(-context // TOKENS_PER_BLOCK)


def per_group_projection(layers: list[LayerAttention], context: int) -> float:
    """Layer-pages a request would hold at `context` with a page per layer group, as a share
    of one page per block of every layer (arithmetic on the groups' stale ranges)."""
    groups = LayerGroups(layers, TOKENS_PER_BLOCK, max_seq_len=1 << 20)
    blocks = cache_blocks(context)
    held = 0
    for group, (start, end) in enumerate(groups.stale_ranges(context)):
        held += (blocks - (end - start)) * len(groups.layers_of(group))
    return held / (blocks * NUM_LAYERS)


def attention_us(batch: int, context: int, window: int, repeats: int) -> dict:
    """Microseconds per decode call of one layer, full and windowed, per implementation."""
    inputs = decode_inputs(0, batch, context, Q_HEADS, KV_HEADS, TOKENS_PER_BLOCK, HEAD_DIM)
    impls = ["xla", "pallas"] if jax.default_backend() == "gpu" else ["xla"]
    row = {}
    for impl in impls:
        for name, kwargs in (("full", {}), ("windowed", {"window": window})):
            call = functools.partial(
                paged_decode_attention, *inputs, layer=0, sm_scale=HEAD_DIM**-0.5, impl=impl,
                interpret=False, **kwargs,
            )  # fmt: skip
            row[f"{impl}_{name}_us"] = 1e6 * median_seconds(call, repeats)
        row[f"{impl}_speedup"] = row[f"{impl}_full_us"] / row[f"{impl}_windowed_us"]
        # The model's layers: 28 local and 6 global against 34 global.
        local, full = row[f"{impl}_windowed_us"], row[f"{impl}_full_us"]
        row[f"{impl}_gemma3_step_ms"] = (28 * local + 6 * full) / 1e3
        row[f"{impl}_full_model_step_ms"] = NUM_LAYERS * full / 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; checks the script")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.smoke:
        args.contexts, args.window, args.batch, args.repeats = [256, 512], 64, 1, 2
    rows = []
    for context in args.contexts:
        row = {"context": context, "window": args.window, "batch": args.batch}
        for name, layers in patterns(args.window).items():
            held = pages_held(layers, context)
            row[name] = {
                **held,
                "share_of_full": held["pages_held"] / cache_blocks(context),
                "gib_held": held["pages_held"] * PAGE_BYTES / 2**30,
                "per_group_projection": per_group_projection(layers, context),
            }
        row.update(attention_us(args.batch, context, args.window, args.repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}
    (args.out / "bench_windows.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'bench_windows.json'}")


if __name__ == "__main__":
    main()
