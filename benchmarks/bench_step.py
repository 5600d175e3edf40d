"""Compiled step functions per bucket: compile time, step time, and padding waste of a workload.

A tiny Llama (random weights) serves through `StepRegistry`: every allowed bucket is compiled ahead
of time (timed one by one), then each bucket's step is timed on valid inputs, and a seeded sample
workload (decode batches and prefill chunks) is padded to its buckets to count wasted rows. Runs on
CPU with the XLA kernels, on a GPU with the Pallas ones.

    python -m benchmarks.bench_step [--out results] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.engine.compile import model_registry
from kvjax.runtime.buckets import BucketKey, Buckets
from kvjax.runtime.step import StepInputs, allow_compile
from models.config import LlamaConfig
from models.llama import Llama

TPB, MAX_BLOCKS = 16, 16


def inputs_for(key: BucketKey, rng) -> StepInputs:
    """Valid inputs filling `key`: sequences of random contexts on distinct pages."""
    q_lens = np.full(key.num_seqs, key.num_tokens // key.num_seqs)
    q_lens[: key.num_tokens % key.num_seqs] += 1
    kv_lens = q_lens + rng.integers(0, MAX_BLOCKS * TPB // 2, key.num_seqs)
    pages = 1 + rng.permutation(key.num_seqs * MAX_BLOCKS).reshape(key.num_seqs, MAX_BLOCKS)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    logits = cu[1:] - 1 if key.num_logits == key.num_seqs else np.arange(key.num_logits)
    return StepInputs(
        tokens=rng.integers(0, 1024, key.num_tokens).astype(np.int32),
        page_table=pages.astype(np.int32),
        kv_lens=kv_lens.astype(np.int32),
        cu_q_lens=cu.astype(np.int32),
        num_seqs=np.array([key.num_seqs], np.int32),
        logits_indices=logits.astype(np.int32),
    )


def padding_waste(buckets: Buckets, rng, num_steps: int) -> dict:
    """Decode steps (1-8 sequences) and prefill chunks (1-2 sequences, 10-128 tokens)."""
    real_tokens = padded_tokens = real_seqs = padded_seqs = 0
    for _ in range(num_steps):
        if rng.random() < 0.7:
            seqs = int(rng.integers(1, 9))
            tokens = seqs
        else:
            seqs = int(rng.integers(1, 3))
            tokens = int(rng.integers(10, 129))
        key = buckets.pad(seqs, tokens, seqs)
        real_tokens, padded_tokens = real_tokens + tokens, padded_tokens + key.num_tokens
        real_seqs, padded_seqs = real_seqs + seqs, padded_seqs + key.num_seqs
    return {
        "steps": num_steps,
        "token_rows_wasted": 1 - real_tokens / padded_tokens,
        "sequence_rows_wasted": 1 - real_seqs / padded_seqs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    on_gpu = jax.default_backend() == "gpu"
    impl = "pallas" if on_gpu else "xla"
    config = LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32,
    )  # fmt: skip
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    registry, params = model_registry(Llama(config, dtype=dtype, rngs=nnx.Rngs(0)), impl=impl)
    num_pages = 8 * MAX_BLOCKS + 1
    shape = (num_pages, config.num_layers, 2, config.num_kv_heads, TPB, config.head_dim)
    pool = jax.random.normal(jax.random.key(0), shape, dtype)
    buckets = Buckets(batch_sizes=[1, 2, 4, 8], token_counts=[32, 64, 128], draft_lengths=[0, 3])
    rows = []
    for key in buckets.keys:
        start = time.perf_counter()
        with allow_compile():
            registry.warmup(params, pool, lambda k: inputs_for(k, rng), [key])
        compile_s = time.perf_counter() - start
        inputs = inputs_for(key, rng)
        times = []
        for i in range(args.repeats + 3):
            start = time.perf_counter()
            logits, pool = registry(params, pool, inputs)
            jax.block_until_ready(logits)
            if i >= 3:
                times.append(time.perf_counter() - start)
        row = {
            "key": [key.num_seqs, key.num_tokens, key.num_logits],
            "compile_s": compile_s,
            "step_us": statistics.median(times) * 1e6,
        }
        rows.append(row)
        print(
            f"seqs {key.num_seqs:>2} tokens {key.num_tokens:>4} logits {key.num_logits:>3}: "
            f"compile {compile_s:5.2f} s, step {row['step_us']:8.1f} us",
            flush=True,
        )
    waste = padding_waste(buckets, rng, 1000)
    print(
        f"padding waste over {waste['steps']} sampled steps: "
        f"{waste['token_rows_wasted']:.1%} of token rows, "
        f"{waste['sequence_rows_wasted']:.1%} of sequence rows"
    )
    result = {
        "device": jax.devices()[0].device_kind,
        "impl": impl,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_layers", "num_heads")},
        "buckets": rows,
        "padding": waste,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_step.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'bench_step.json'}")


if __name__ == "__main__":
    main()
