"""Sliding windows: the pages a request holds and the decode attention it costs, windowed against
full attention, at growing contexts.

Pages: a request is served as the engine does (prompt committed in 2048-token chunks, then 64
decode steps) on the manager the engine builds for layers that attend as in a Gemma-3-4B-shaped
model (34 layers: 5 local with a `--window` of 1024, then 1 global; a pool per layer group), the
same model on one pool (a page holds every layer, so it goes only once every layer is done with
it), a Mistral-shaped one (every layer windowed) and one with full attention everywhere. The
bytes of the device pages it holds at the end (and at its peak) are counted, as a share of full
attention's.

Attention: decode attention of one Gemma-3-4B layer (8 query heads, 4 KV heads, head_dim 256,
bf16, 16-token pages), full and windowed, `--batch` sequences of each context on permuted pages,
and the sum over the model's layers (28 local, 6 global). Decode step: one compiled step of a
34-layer model with Gemma-3-4B's attention shapes (its MLP and vocabulary shrunk, which the
attention dominates at these contexts), one sequence, on the pools the engine builds (a pool
per group, the local one holding the window's pages) against the same model with full attention
on one pool. The XLA path runs everywhere; the Pallas kernel is timed only on a GPU (interpret
mode is not a timing).

    python -m benchmarks.bench_windows [--contexts 4096 16384] [--window 1024] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_kernels import decode_inputs, median_seconds
from kernels.paged_attention import paged_decode_attention
from kvjax.cache import CacheConfig
from kvjax.cache.life_cycles import LayerAttention, windows_by_layer
from kvjax.engine.assembly import new_cache_manager, new_manager
from kvjax.engine.compile import model_registry
from kvjax.runtime.buckets import BucketKey
from kvjax.runtime.step import StepInputs, allow_compile
from models.config import LlamaConfig
from models.llama import Llama

Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK, NUM_LAYERS = 8, 4, 256, 16, 34
LAYER_PAGE_BYTES = 2 * KV_HEADS * TOKENS_PER_BLOCK * HEAD_DIM * 2  # one layer's block, bf16
CHUNK, DECODE_STEPS = 2048, 64


def patterns(window: int) -> dict[str, list[LayerAttention]]:
    gemma = windows_by_layer(NUM_LAYERS, [window] * 5 + [None])
    return {
        "full": (windows_by_layer(NUM_LAYERS, [None]), False),
        "gemma3_5to1": (gemma, True),
        "gemma3_5to1_one_pool": (gemma, False),
        "mistral_all_windowed": (windows_by_layer(NUM_LAYERS, [window]), False),
    }


def layer_pages(manager, cache) -> int:
    """Pages held, each counted by its layers: blocks of one layer."""
    managers, parts = getattr(manager, "managers", [manager]), getattr(cache, "caches", [cache])
    pairs = zip(managers, parts, strict=True)
    return sum(len(part.held_pages()) * m.config.num_layers for m, part in pairs)


def pages_held(layers: list[LayerAttention], grouped: bool, context: int) -> dict:
    """Layer-pages one request holds once `context` tokens are in its history, and at peak."""
    # Page counts do not depend on the page's bytes: a small page keeps the pool small.
    config = CacheConfig(
        num_layers=NUM_LAYERS, num_kv_heads=1, head_dim=1, tokens_per_block=TOKENS_PER_BLOCK,
        dtype="float32", device_pages=2 * context // TOKENS_PER_BLOCK + 64, host_pages=0,
        layer_attention=layers,
    )  # fmt: skip
    build = new_cache_manager if grouped else (lambda c, mesh, chunk, **o: new_manager(c, **o))
    manager = build(config, None, CHUNK, max_seq_len=context)
    cache = manager.create_kv_cache()
    assert cache.resume()
    prompt = list(range(context - DECODE_STEPS))
    peak = 0
    for start in range(0, len(prompt), CHUNK):  # chunked prefill, committed for reuse
        chunk = prompt[start : start + CHUNK]
        assert cache.resize(capacity=cache.history_length + len(chunk))
        peak = max(peak, layer_pages(manager, cache))
        cache.commit(chunk)
    cache.stop_committing()
    for _ in range(DECODE_STEPS):
        assert cache.resize(capacity=cache.history_length + 1)
        peak = max(peak, layer_pages(manager, cache))
        cache.resize(history_length=cache.history_length + 1)
    held = layer_pages(manager, cache)
    cache.close()
    manager.shutdown()
    full = -(-context // TOKENS_PER_BLOCK) * NUM_LAYERS
    return {
        "pool_groups": len(getattr(manager, "managers", [manager])),
        "share_of_full": held / full,
        "peak_share_of_full": peak / full,
        "gib_held": held * LAYER_PAGE_BYTES / 2**30,
        "full_attention_gib": full * LAYER_PAGE_BYTES / 2**30,
    }


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


def decode_step_ms(context: int, window: int | None, repeats: int) -> float:
    """Milliseconds per decode step of one sequence with `context` tokens of history: with
    `window`, Gemma's 5:1 layers on a pool per group; without, full attention on one pool."""
    flags = tuple(i % 6 != 5 for i in range(NUM_LAYERS)) if window else None
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=NUM_LAYERS,
        num_heads=Q_HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=True,
        sliding_window=window, windowed_layers=flags,
    )  # fmt: skip
    model = Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    blocks = context // TOKENS_PER_BLOCK
    page = (2, KV_HEADS, TOKENS_PER_BLOCK, HEAD_DIM)
    table = np.zeros((1, 2 * blocks if window else blocks), np.int32)
    if window:  # the local group holds the window's pages only; the global one every block
        live = -(-window // TOKENS_PER_BLOCK) + 1
        table[0, blocks - live : blocks] = 1 + np.arange(live)
        table[0, blocks:] = 1 + np.arange(blocks)
        pool = (
            jnp.zeros((1 + live, sum(flags), *page), jnp.bfloat16),
            jnp.zeros((1 + blocks, NUM_LAYERS - sum(flags), *page), jnp.bfloat16),
        )
        groups = tuple(0 if flag else 1 for flag in flags)
    else:
        table[0] = 1 + np.arange(blocks)
        pool, groups = jnp.zeros((1 + blocks, NUM_LAYERS, *page), jnp.bfloat16), None
    registry, params = model_registry(model, impl="xla", layer_groups=groups)
    key = BucketKey(1, 1, 1)
    inputs = StepInputs(
        tokens=np.array([3], np.int32), page_table=table, kv_lens=np.array([context], np.int32),
        cu_q_lens=np.array([0, 1], np.int32), num_seqs=np.array([1], np.int32),
        logits_indices=np.array([0], np.int32),
    )  # fmt: skip
    with allow_compile():
        registry.warmup(params, pool, lambda _: inputs, [key])

    def step():
        nonlocal pool
        logits, pool = registry(params, pool, inputs)
        return logits

    return 1e3 * median_seconds(step, min(repeats, 3), warmup=1)  # seconds per step at 16k


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
        for name, (layers, grouped) in patterns(args.window).items():
            row[name] = pages_held(layers, grouped, context)
        row.update(attention_us(args.batch, context, args.window, args.repeats))
        if not args.smoke or context == args.contexts[-1]:  # the smoke run compiles less
            row["gemma3_decode_step_ms"] = decode_step_ms(context, args.window, args.repeats)
            row["full_attention_decode_step_ms"] = decode_step_ms(context, None, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}
    (args.out / "bench_windows.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'bench_windows.json'}")


if __name__ == "__main__":
    main()
