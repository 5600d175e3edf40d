"""Start-up cost: seconds from process start to the first token, cold (empty compilation cache)
and warm (the cache the cold run filled), and step compile time against model depth.

Each measurement runs in a fresh Python process, so nothing compiled stays in memory between
them. The engine is the default main job's (`benchmarks.serve`'s tiny Llama, buckets and
geometry); depth varies the number of layers of the same model.

    python -m benchmarks.bench_startup [--depths 2 8 32] [--out results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import time
start = time.perf_counter()
import dataclasses, json, sys
import jax.numpy as jnp
from flax import nnx
from benchmarks.serve import TINY, parse_args, build_engine
from kvjax.serving.request import SamplingParams
from models.llama import Llama
args = parse_args([])
args.max_seq_len, args.mesh = 512, None
model = Llama(dataclasses.replace(TINY, num_layers={depth}), dtype=jnp.float32, rngs=nnx.Rngs(0))
imported = time.perf_counter()
engine, warmup_s = build_engine(model, args)
engine.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=1), use_tqdm=False)
first_token = time.perf_counter()
print(json.dumps({{"imports_s": imported - start, "warmup_s": warmup_s,
                  "shapes": engine.registry.stats.compiled, "in_process_s": first_token - start}}))
"""


def run_child(depth: int, cache_dir: str) -> dict:
    """One fresh process building the engine and serving one token; its figures plus the wall
    time from launching it (interpreter start included)."""
    env = {**os.environ, "KVJAX_COMPILE_CACHE": cache_dir}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(depth=depth)], env=env, capture_output=True,
        text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"depth": depth, "to_first_token_s": time.perf_counter() - start, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    rows = []
    for depth in args.depths:
        with tempfile.TemporaryDirectory() as cache_dir:
            for kind in ("cold", "warm"):
                row = {"start": kind, **run_child(depth, cache_dir)}
                rows.append(row)
                detail = (f"{row['shapes']} step shapes compiled or loaded in "
                          f"{row['warmup_s']:.1f} s, imports {row['imports_s']:.1f} s")  # fmt: skip
                print(f"{depth:>3} layers, {kind}: first token {row['to_first_token_s']:.1f} s "
                      f"after launch ({detail})", flush=True)  # fmt: skip
    cold = {row["depth"]: row["warmup_s"] for row in rows if row["start"] == "cold"}
    if len(cold) > 1:
        low = min(cold)
        for depth, seconds in sorted(cold.items()):
            print(f"compile time at {depth} layers: {seconds / cold[low]:.2f}x {low} layers")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_startup.json").write_text(json.dumps({"rows": rows}, default=str))
    print(f"wrote {args.out / 'bench_startup.json'}")


if __name__ == "__main__":
    main()
