#!/usr/bin/env bash
# One prepared call for a lent GPU: the compiled kernel tests, then the kernel benchmark.
# Writes everything under $OUT (default ./results/gpu); prints the benchmark table last.
set -uo pipefail
out="${OUT:-results/gpu}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$out/card.csv" 2>&1
scripts/venv.sh > "$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }
# The GPU machine's jax must see CUDA: install the plugin matching the pinned jaxlib.
.venv/bin/pip install -q "jax[cuda13]==0.11.2" >> "$out/setup.log" 2>&1 \
  || .venv/bin/pip install -q "jax[cuda12]==0.11.2" >> "$out/setup.log" 2>&1
.venv/bin/python -c "import jax; print(jax.devices())" | tee "$out/devices.txt"
timeout 240 .venv/bin/python -m pytest -q -m gpu -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1
echo "pytest -m gpu exit $?; $(tail -1 "$out/pytest_gpu.log")"
timeout 300 .venv/bin/python -m benchmarks.bench_kernels --out "$out" > "$out/bench.log" 2>&1
echo "bench exit $?"
tail -40 "$out/bench.log"
