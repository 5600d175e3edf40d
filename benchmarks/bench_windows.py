"""Decode attention with a sliding window against full attention, at growing contexts: the
windowed step should cost O(window + sinks), not O(context), because only the sinks' and the
window's pages are read.

One layer of a Llama-3-8B-shaped model (32 query heads, 8 KV heads, head_dim 128, bf16, 16-token
pages), `--batch` sequences of each context on randomly permuted pages. The XLA path runs
everywhere; the Pallas kernel is timed only on a GPU (interpret mode is not a timing).

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

Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS_PER_BLOCK = 32, 8, 128, 16


def measure(batch: int, context: int, window: int, sinks: int, repeats: int) -> dict:
    """Microseconds per decode call, full and windowed, for each implementation available."""
    inputs = decode_inputs(0, batch, context, Q_HEADS, KV_HEADS, TOKENS_PER_BLOCK, HEAD_DIM)
    impls = ["xla", "pallas"] if jax.default_backend() == "gpu" else ["xla"]
    row = {"batch": batch, "context": context, "window": window, "sink_tokens": sinks}
    for impl in impls:
        for name, kwargs in (("full", {}), ("windowed", {"window": window, "sink_tokens": sinks})):
            call = functools.partial(
                paged_decode_attention, *inputs, layer=0, sm_scale=HEAD_DIM**-0.5, impl=impl,
                interpret=False, **kwargs,
            )  # fmt: skip
            row[f"{impl}_{name}_us"] = 1e6 * median_seconds(call, repeats)
        row[f"{impl}_speedup"] = row[f"{impl}_full_us"] / row[f"{impl}_windowed_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; checks the script")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    if args.smoke:
        args.contexts, args.window, args.batch, args.repeats = [64, 256], 32, 1, 2
    rows = []
    for context in args.contexts:
        row = measure(args.batch, context, args.window, args.sink_tokens, args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}
    (args.out / "bench_windows.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out / 'bench_windows.json'}")


if __name__ == "__main__":
    main()
