"""Where a decode step's time goes: host work against device work, per batch size.

A tiny Llama (random weights) decodes B requests at a time through the engine. For each step of
the steady decode state it records the wall time of `Engine.step()` and the time of the compiled
step plus the sampler, inputs sent and tokens fetched (`Engine._run`, the device's share); the
rest is host work (scheduling, batch building, sampling inputs, applying results). `hidden` is
the share of host time overlapped with the device: 0 by construction in today's serial loop,
which waits for each step's tokens before scheduling the next.
A jitted dense decode loop of the same weights (a plain KV array, no paging) gives the
reference tokens/s.

    python -m benchmarks.bench_engine [--batch-sizes 1 8 32 128] [--steps 40] [--out results]
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

from benchmarks.dense_decode import dense_decode_tokens_per_second
from benchmarks.serve import TINY
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.runtime.buckets import Buckets
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from models.llama import Llama

TPB, PROMPT_LEN = 16, 32


def measure(model, batch: int, steps: int, seed: int) -> dict:
    """Host, device and wall ms per steady decode step at `batch` requests, and tokens/s."""
    max_num_tokens = max(512, batch)
    blocks = (PROMPT_LEN + steps + 8) // TPB + 1
    config = cache_config_for(model, tokens_per_block=TPB, device_pages=batch * blocks + 1)
    scheduler = SchedulerConfig(max_batch_size=batch, max_num_tokens=max_num_tokens)
    buckets = Buckets([batch], [batch, max_num_tokens])
    engine = Engine(model, config, scheduler, buckets, max_seq_len=blocks * TPB)
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_new_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, TINY.vocab_size, PROMPT_LEN).tolist(), params)
    device_s: list[float] = []
    run = engine._run

    def timed_run(*args):
        start = time.perf_counter()
        result = run(*args)  # returns host arrays: the device work is done
        device_s.append(time.perf_counter() - start)
        return result

    engine._run = timed_run
    for _ in range(-(-batch * PROMPT_LEN // max_num_tokens) + 2):  # the prompts' prefill
        engine.step()
    walls, devices = [], []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
        devices.append(device_s[-1])
    engine.shutdown()
    wall, device = statistics.median(walls), statistics.median(devices)
    host = wall - device
    return {
        "batch": batch, "host_ms": 1e3 * host, "device_ms": 1e3 * device,
        "wall_ms": 1e3 * wall, "hidden": 0.0,  # serial: host = wall - device, no overlap
        "engine_tok_s": batch / wall,
        "dense_tok_s": dense_decode_tokens_per_second(model, batch, PROMPT_LEN, steps),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    model = Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    rows = []
    header = ("B", "host ms", "device ms", "wall ms", "hidden", "engine tok/s", "dense tok/s")
    print(" ".join(f"{name:>{len(name) + 2}}" for name in header), "ratio",
          f"({jax.devices()[0].device_kind})")  # fmt: skip
    for batch in args.batch_sizes:
        row = measure(model, batch, args.steps, args.seed)
        rows.append(row)
        print(f"{batch:>3} {row['host_ms']:>9.2f} {row['device_ms']:>11.2f} "
              f"{row['wall_ms']:>9.2f} {row['hidden']:>8.0%} {row['engine_tok_s']:>14.0f} "
              f"{row['dense_tok_s']:>13.0f} {row['engine_tok_s'] / row['dense_tok_s']:>5.2f}",
              flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                           default=str))  # fmt: skip
    print(f"wrote {args.out / 'bench_engine.json'}")


if __name__ == "__main__":
    main()
