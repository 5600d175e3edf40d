"""Where a decode step's time goes: host work against device work, per batch size, and how much
of the host work the overlapped loop hides.

A tiny Llama (random weights) decodes B requests at a time through the engine, once with the
serial loop (`Engine(overlap=False)`: each step waits for its tokens before the next is
scheduled) and once with the overlapped one (the default), the two alternated over `--rounds`.
In the serial loop the compiled step and the sampler are timed to completion on their own
(`device`); the rest of a step's wall time is host work (scheduling, batch building, sampling
inputs, applying results). `hidden` is the share of that host work the overlapped loop takes off
the wall time: (serial wall - overlapped wall) / host. A jitted dense decode loop of the same
weights (a plain KV array, no paging) gives the reference tokens/s.

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


def _engine(model, batch: int, steps: int, overlap: bool) -> Engine:
    max_num_tokens = max(512, batch)
    blocks = (PROMPT_LEN + steps + 8) // TPB + 1
    config = cache_config_for(model, tokens_per_block=TPB, device_pages=batch * blocks + 1)
    scheduler = SchedulerConfig(max_batch_size=batch, max_num_tokens=max_num_tokens)
    buckets = Buckets([batch], [batch, max_num_tokens])
    return Engine(model, config, scheduler, buckets, max_seq_len=blocks * TPB, overlap=overlap)


def _decode(model, batch: int, steps: int, seed: int, overlap: bool) -> tuple[list, list]:
    """Wall seconds of each steady decode step, and (serial loop only) the device's."""
    engine = _engine(model, batch, steps, overlap)
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(rng.integers(0, TINY.vocab_size, PROMPT_LEN).tolist(), params)
    device_s: list[float] = []
    runner = engine._runner
    dispatch = runner._dispatch

    def timed_dispatch(*args):
        start = time.perf_counter()
        sampled = dispatch(*args)
        jax.block_until_ready(sampled.tokens)  # the serial loop waits for it anyway
        device_s.append(time.perf_counter() - start)
        return sampled

    if not overlap:
        runner._dispatch = timed_dispatch
    max_num_tokens = engine.scheduler_config.max_num_tokens
    for _ in range(-(-batch * PROMPT_LEN // max_num_tokens) + 3):  # the prompts' prefill
        engine.step()
    walls, devices = [], []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
        devices.append(device_s[-1] if device_s else 0.0)
    engine.shutdown()
    return walls, devices


def measure(model, batch: int, steps: int, seed: int, rounds: int = 2) -> dict:
    """Host, device and wall ms per steady decode step at `batch` requests (both loops,
    alternated over `rounds`), the hidden share of host work, and tokens/s."""
    serial, overlapped, devices = [], [], []
    for _ in range(rounds):
        walls, device = _decode(model, batch, steps, seed, overlap=False)
        serial += walls
        devices += device
        overlapped += _decode(model, batch, steps, seed, overlap=True)[0]
    wall, device = statistics.median(serial), statistics.median(devices)
    overlap_wall = statistics.median(overlapped)
    host = max(wall - device, 1e-9)
    return {
        "batch": batch, "host_ms": 1e3 * host, "device_ms": 1e3 * device,
        "serial_wall_ms": 1e3 * wall, "wall_ms": 1e3 * overlap_wall,
        "hidden": min(max((wall - overlap_wall) / host, 0.0), 1.0),
        "serial_tok_s": batch / wall, "engine_tok_s": batch / overlap_wall,
        "dense_tok_s": dense_decode_tokens_per_second(model, batch, PROMPT_LEN, steps),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="serial/overlapped alternations")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    model = Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    rows = []
    header = ("B", "host ms", "device ms", "serial wall", "overlap wall", "hidden",
              "serial tok/s", "engine tok/s", "dense tok/s")  # fmt: skip
    print(" ".join(f"{name:>{len(name) + 1}}" for name in header), "ratio",
          f"({jax.devices()[0].device_kind})")  # fmt: skip
    for batch in args.batch_sizes:
        row = measure(model, batch, args.steps, args.seed, args.rounds)
        rows.append(row)
        print(f"{batch:>2} {row['host_ms']:>8.2f} {row['device_ms']:>10.2f} "
              f"{row['serial_wall_ms']:>12.2f} {row['wall_ms']:>13.2f} {row['hidden']:>7.0%} "
              f"{row['serial_tok_s']:>13.0f} {row['engine_tok_s']:>13.0f} "
              f"{row['dense_tok_s']:>12.0f} {row['engine_tok_s'] / row['dense_tok_s']:>5.2f}",
              flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_engine.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                           default=str))  # fmt: skip
    print(f"wrote {args.out / 'bench_engine.json'}")


if __name__ == "__main__":
    main()
