"""Kernel benchmark: paged decode, mixed ragged batches and page copies, against the XLA path and
JAX's own Pallas paged attention, with the card's measured copy and matmul ceilings.

One run on a GPU measures, in this order: the device-to-device copy ceiling (bytes read + written)
and a bf16 matmul ceiling; decode attention for batch x context (Hq/Hkv/D = 32/8/128, bf16, 16
tokens per block) with ours, the XLA path and `jax.experimental.pallas.ops.gpu.paged_attention`
(head-major layout built outside the timed region); a mixed batch (decode rows plus a prefill
chunk); page copies, gathers and scatters of 1 to 512 whole pages; fp8 decode (e4m3 pages with
their per-row scales) against bf16 decode on the same data. It prints a table and writes
JSON and Markdown under `--out`. `--smoke` runs tiny shapes (in Pallas interpret mode on a CPU) to
check the script itself; its timings mean nothing.

    python -m benchmarks.bench_kernels [--smoke] [--out results]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.kv_quant import QuantizedPool, quantize
from kernels.page_copy import copy_pages, gather_pages, scatter_pages
from kernels.paged_attention import paged_decode_attention
from kernels.ragged_paged_attention import ragged_paged_attention

BF16 = jnp.bfloat16
XLA_BYTES_LIMIT = (
    8 << 30
)  # the XLA path gathers a dense float32 copy of the context; skip past this


def median_seconds(step, repeats: int, warmup: int = 3) -> float:
    """Median wall time of `step()` (which returns arrays to wait for) over `repeats` runs."""
    for _ in range(warmup):
        jax.block_until_ready(step())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rotating(calls):
    """A step that cycles through several prepared calls (input sets larger than L2 together)."""
    index = [0]

    def step():
        index[0] = (index[0] + 1) % len(calls)
        return calls[index[0]]()

    return step


def ceilings(smoke: bool, repeats: int) -> dict:
    size = (1 << 20) if smoke else (1 << 30)  # elements of bf16: 2 GiB at full size
    data = jax.random.normal(jax.random.key(0), (size,), jnp.float32).astype(BF16)
    copy = jax.jit(lambda x: x * 1)
    copy_s = median_seconds(lambda: copy(data), repeats)
    n = 256 if smoke else 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(BF16) for i in (1, 2))
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    matmul_s = median_seconds(lambda: matmul(a, b), repeats)
    return {
        "copy_gb_s": 2 * size * 2 / copy_s / 1e9,
        "matmul_tflop_s": 2 * n**3 / matmul_s / 1e12,
    }


def random_pool(key, num_pages, num_kv_heads, tokens_per_block, head_dim, num_layers=1):
    shape = (num_pages, num_layers, 2, num_kv_heads, tokens_per_block, head_dim)
    return jax.random.normal(key, shape, BF16)  # never zeros: they can time faster than data


def decode_inputs(seed, batch, context, q_heads, kv_heads, tokens_per_block, head_dim):
    """A pool holding `batch` sequences of `context` tokens on randomly permuted pages."""
    blocks = context // tokens_per_block
    rng = np.random.default_rng(seed)
    table = (1 + rng.permutation(batch * blocks)).reshape(batch, blocks).astype(np.int32)
    key = jax.random.key(seed)
    pool = random_pool(key, batch * blocks + 1, kv_heads, tokens_per_block, head_dim)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, q_heads, head_dim), BF16)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, pool, jnp.asarray(table), lengths


def bench_decode(batch, context, args, interpret, ceiling) -> dict:
    q_heads, kv_heads, head_dim, tokens_per_block = 32, 8, 128, 16
    sm_scale = head_dim**-0.5
    useful = batch * context * 2 * kv_heads * head_dim * 2  # K and V bytes, bf16
    sets = [
        decode_inputs(seed, batch, context, q_heads, kv_heads, tokens_per_block, head_dim)
        for seed in range(2 if useful < (1 << 30) else 1)  # rotate sets smaller than 1 GiB
    ]
    ours = functools.partial(
        paged_decode_attention, layer=0, sm_scale=sm_scale, interpret=interpret,
        pages_per_chunk=args.pages_per_chunk, num_warps=args.num_warps,
        num_stages=args.num_stages, num_splits=splits_for(args.waves, batch, kv_heads, context),
    )  # fmt: skip
    row = {"batch": batch, "context": context, "useful_mb": useful / 1e6}
    row["ours_us"] = 1e6 * median_seconds(
        rotating([functools.partial(ours, *inputs) for inputs in sets]), args.repeats
    )
    if batch * context * kv_heads * head_dim * 8 <= XLA_BYTES_LIMIT:
        xla = functools.partial(ours, impl="xla")
        row["xla_us"] = 1e6 * median_seconds(
            rotating([functools.partial(xla, *inputs) for inputs in sets]), args.repeats
        )
    row["jax_pallas_us"] = bench_upstream_decode(sets, sm_scale, interpret, args.repeats)
    row["ours_gb_s"] = useful / row["ours_us"] / 1e3
    row["fraction_of_copy"] = row["ours_gb_s"] / ceiling
    for other in ("xla", "jax_pallas"):
        if row.get(f"{other}_us"):
            row[f"speedup_vs_{other}"] = row[f"{other}_us"] / row["ours_us"]
    return row


def bench_fp8_decode(batch, context, args, interpret, ceiling) -> dict:
    """Ours over e4m3 pages (and their scales) against ours over the bf16 pages they quantize."""
    q_heads, kv_heads, head_dim, tokens_per_block = 32, 8, 128, 16
    q, pool, table, lengths = decode_inputs(
        0, batch, context, q_heads, kv_heads, tokens_per_block, head_dim
    )
    fp8_pool = QuantizedPool.of(*jax.jit(quantize, static_argnums=1)(pool, jnp.float8_e4m3fn))
    ours = functools.partial(
        paged_decode_attention, layer=0, sm_scale=head_dim**-0.5, interpret=interpret,
        num_warps=args.num_warps, num_stages=args.num_stages,
    )  # fmt: skip
    row = {"batch": batch, "context": context}
    row["bf16_us"] = 1e6 * median_seconds(lambda: ours(q, pool, table, lengths), args.repeats)
    row["fp8_us"] = 1e6 * median_seconds(lambda: ours(q, fp8_pool, table, lengths), args.repeats)
    fp8_bytes = batch * context * 2 * kv_heads * (head_dim + 2)  # values and bf16 scales
    row["fp8_gb_s"] = fp8_bytes / row["fp8_us"] / 1e3
    row["fp8_fraction_of_copy"] = row["fp8_gb_s"] / ceiling
    row["fp8_speedup"] = row["bf16_us"] / row["fp8_us"]
    return row


def splits_for(waves: int | None, batch: int, kv_heads: int, context: int) -> int | None:
    """Page splits giving about `waves` programs per SM of an H100/H200 (None: the default)."""
    if not waves:
        return None
    wanted = -(-waves * 132 // (batch * kv_heads))
    return max(1, min(1 << (wanted - 1).bit_length(), context // (16 * 8)))


def bench_upstream_decode(sets, sm_scale, interpret, repeats) -> float | None:
    """JAX's Triton paged attention on the same data in its head-major layout."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        except ImportError:
            return None
    calls = []
    for q, pool, table, lengths in sets:
        k_pages = jnp.transpose(pool[:, 0, 0], (1, 0, 2, 3))  # [kv_heads, pages, tokens, dim]
        v_pages = jnp.transpose(pool[:, 0, 1], (1, 0, 2, 3))
        splits = min(16, table.shape[1])
        per_block = min(8, table.shape[1] // splits)
        fn = jax.jit(
            functools.partial(
                paged_attention, k_splits=splits, pages_per_compute_block=per_block,
                interpret=interpret,
            )
        )  # fmt: skip
        scaled = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)
        calls.append(functools.partial(fn, scaled, k_pages, v_pages, table, lengths))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return 1e6 * median_seconds(rotating(calls), repeats)


def bench_mixed(args, interpret, smoke) -> dict:
    """Decode rows plus one prefill chunk over a cached prefix, in one ragged call."""
    q_heads, kv_heads, head_dim, tokens_per_block = 32, 8, 128, 16
    decode_rows, context, chunk = (4, 64, 16) if smoke else (64, 2048, 512)
    seqs = decode_rows + 1
    blocks = (context + chunk) // tokens_per_block
    rng = np.random.default_rng(0)
    table = (1 + rng.permutation(seqs * blocks)).reshape(seqs, blocks).astype(np.int32)
    pool = random_pool(jax.random.key(3), seqs * blocks + 1, kv_heads, tokens_per_block, head_dim)
    num_tokens = decode_rows + chunk
    q = jax.random.normal(jax.random.key(4), (num_tokens, q_heads, head_dim)).astype(BF16)
    kv_lens = jnp.array([context] * decode_rows + [context + chunk], jnp.int32)
    cu_q_lens = jnp.array([*range(decode_rows + 1), num_tokens], jnp.int32)
    inputs = (q, pool, jnp.asarray(table), kv_lens, cu_q_lens, jnp.array([seqs], jnp.int32))
    ours = functools.partial(
        ragged_paged_attention, layer=0, sm_scale=head_dim**-0.5, interpret=interpret
    )
    row = {"decode_rows": decode_rows, "context": context, "prefill_chunk": chunk}
    row["ours_us"] = 1e6 * median_seconds(functools.partial(ours, *inputs), args.repeats)
    if num_tokens * blocks * tokens_per_block * kv_heads * head_dim * 8 <= XLA_BYTES_LIMIT:
        xla = functools.partial(ours, *inputs, impl="xla")
        row["xla_us"] = 1e6 * median_seconds(xla, args.repeats)
        row["speedup_vs_xla"] = row["xla_us"] / row["ours_us"]
    flops = (
        4 * q_heads * head_dim * (decode_rows * context + chunk * context + chunk * (chunk + 1) / 2)
    )
    row["tflop_s"] = flops / row["ours_us"] / 1e6
    return row


def bench_copies(count, args, interpret, ceiling, smoke) -> dict:
    """Whole pages of every layer (32 layers at full size: 2 MiB a page in bf16)."""
    num_layers = 2 if smoke else 32
    num_pages = max(2 * count + 2, 64)
    pool = random_pool(jax.random.key(5), num_pages, 8, 16, 128, num_layers)
    page_bytes = pool[0].size * 2
    rng = np.random.default_rng(count)
    pages = 1 + rng.permutation(num_pages - 1)
    src, dst = (jnp.asarray(pages[i * count : (i + 1) * count], jnp.int32) for i in (0, 1))
    staging = gather_pages(pool, src, count, impl="xla")
    row = {"pages": count, "mb": count * page_bytes / 1e6}
    for impl in ("pallas", "xla"):
        state = [pool.copy()]

        def copy(impl=impl, state=state):
            state[0] = copy_pages(state[0], src, dst, count, impl=impl, interpret=interpret)
            return state[0]

        def scatter(impl=impl, state=state):
            state[0] = scatter_pages(state[0], staging, dst, count, impl=impl, interpret=interpret)
            return state[0]

        def gather(impl=impl, state=state):
            return gather_pages(state[0], src, count, impl=impl, interpret=interpret)

        for name, step in (("copy", copy), ("gather", gather), ("scatter", scatter)):
            row[f"{name}_{impl}_us"] = 1e6 * median_seconds(step, args.repeats)
    moved = 2 * count * page_bytes  # read + write
    row["copy_pallas_gb_s"] = moved / row["copy_pallas_us"] / 1e3
    row["copy_fraction_of_copy"] = row["copy_pallas_gb_s"] / ceiling
    for name in ("copy", "gather", "scatter"):
        row[f"{name}_speedup_vs_xla"] = row[f"{name}_xla_us"] / row[f"{name}_pallas_us"]
    return row


def markdown(result: dict) -> str:
    """Tables for benchmarks/RESULTS.md."""
    lines = [
        f"Device: {result['device']}; jax {result['jax']}; copy ceiling "
        f"{result['ceilings']['copy_gb_s']:.0f} GB/s, bf16 matmul "
        f"{result['ceilings']['matmul_tflop_s']:.0f} TFLOP/s (measured in the same run).",
        "",
        "| B | context | ours us | GB/s | of copy | xla us | jax pallas us | vs xla | vs jax |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['ours_us']:.1f} | {r['ours_gb_s']:.0f} | "
            f"{r['fraction_of_copy']:.0%} | {r.get('xla_us', float('nan')):.1f} | "
            f"{r.get('jax_pallas_us') or float('nan'):.1f} | "
            f"{r.get('speedup_vs_xla', float('nan')):.2f} | "
            f"{r.get('speedup_vs_jax_pallas', float('nan')):.2f} |"
        )
    m = result.get("mixed")
    lines += (
        []
        if m is None
        else [
            "",
            f"Mixed: {m['decode_rows']} decode rows at {m['context']} + a "
            f"{m['prefill_chunk']}-token chunk: {m['ours_us']:.1f} us "
            f"({m['tflop_s']:.1f} TFLOP/s), XLA {m.get('xla_us', float('nan')):.1f} us.",
            "",
            "| pages | MB | copy us | GB/s | of copy | vs xla | gather vs xla | scatter vs xla |",
            "|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in result.get("copies", []):
        lines.append(
            f"| {r['pages']} | {r['mb']:.1f} | {r['copy_pallas_us']:.1f} | "
            f"{r['copy_pallas_gb_s']:.0f} | {r['copy_fraction_of_copy']:.0%} | "
            f"{r['copy_speedup_vs_xla']:.2f} | {r['gather_speedup_vs_xla']:.2f} | "
            f"{r['scatter_speedup_vs_xla']:.2f} |"
        )
    if result.get("fp8_decode"):
        lines += ["", "| B | context | bf16 us | fp8 us | fp8 GB/s | of copy | fp8 speedup |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result.get("fp8_decode", []):
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['bf16_us']:.1f} | {r['fp8_us']:.1f} | "
            f"{r['fp8_gb_s']:.0f} | {r['fp8_fraction_of_copy']:.0%} | {r['fp8_speedup']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; checks the script")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--pages-per-chunk", type=int, default=None, help="decode tuning")
    parser.add_argument("--num-warps", type=int, default=4, help="decode tuning")
    parser.add_argument("--num-stages", type=int, default=3, help="decode tuning")
    parser.add_argument("--waves", type=int, default=None, help="decode splits: programs per SM")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["decode", "mixed", "copies", "fp8_decode"],
        help="what to run",
    )
    args = parser.parse_args()
    smoke = args.smoke
    args.repeats = args.repeats or (3 if smoke else 20)
    interpret = jax.default_backend() != "gpu"
    if interpret and not smoke:
        parser.error("without a GPU only --smoke runs (Pallas interpret mode is not a timing)")
    device = jax.devices()[0].device_kind
    result = {"device": device, "jax": jax.__version__, "smoke": smoke}
    result["ceilings"] = ceilings(smoke, args.repeats)
    print(f"{device}: copy {result['ceilings']['copy_gb_s']:.0f} GB/s, matmul "
          f"{result['ceilings']['matmul_tflop_s']:.1f} TFLOP/s", flush=True)  # fmt: skip
    ceiling = result["ceilings"]["copy_gb_s"]
    batches, contexts = ([1, 2], [32, 64]) if smoke else ([1, 8, 32, 128], [512, 2048, 8192, 32768])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_kernels.json"

    def record(section, row):  # partial results survive a timeout
        if isinstance(result.get(section), list):
            result[section].append(row)
        else:
            result[section] = row
        print(json.dumps({section: row}), flush=True)
        path.write_text(json.dumps(result, indent=2))

    result["decode"], result["copies"], result["fp8_decode"] = [], [], []
    if "decode" in args.sections:
        for batch in batches:
            for context in contexts:
                record("decode", bench_decode(batch, context, args, interpret, ceiling))
    if "mixed" in args.sections:
        record("mixed", bench_mixed(args, interpret, smoke))
    if "copies" in args.sections:
        for count in [1, 4] if smoke else [1, 8, 64, 512]:
            record("copies", bench_copies(count, args, interpret, ceiling, smoke))
    if "fp8_decode" in args.sections:
        for batch in batches[1:]:  # B >= 8 (and 2 in the smoke run)
            for context in contexts[-2:]:
                record("fp8_decode", bench_fp8_decode(batch, context, args, interpret, ceiling))
    table = markdown(result)
    (args.out / "bench_kernels.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
