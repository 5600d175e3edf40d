#!/usr/bin/env bash
# One prepared call for a lent GPU: the compiled kernel tests, then the kernel benchmark.
# The device machine reaches no package registry: it uses its own python3 (jax 0.11.2 with CUDA,
# flax, numpy, hypothesis, sortedcontainers), plus wheels carried in wheels/ for what it lacks
# (blake3: `pip download blake3 --only-binary=:all: --python-version 3.12 -d wheels`).
# Writes everything under $OUT (default results/gpu) and prints the benchmark table last.
set -uo pipefail
out="${OUT:-results/gpu}"
mkdir -p "$out"
py=python3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$out/card.csv" 2>&1
if ! "$py" -c "import blake3" 2>/dev/null; then
  "$py" -m pip install -q --no-index --find-links wheels blake3 > "$out/setup.log" 2>&1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
tests=()  # without blake3 only the kernel tests (which import no kvjax) can be collected
"$py" -c "import blake3" 2>/dev/null || tests=(tests/test_page_copy.py tests/test_kv_write.py
  tests/test_paged_attention.py tests/test_ragged_paged_attention.py)
timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider "${tests[@]}" > "$out/pytest_gpu.log" 2>&1
echo "pytest -m gpu: exit $?; $(tail -1 "$out/pytest_gpu.log")"
timeout 300 "$py" -m benchmarks.bench_kernels --out "$out" > "$out/bench.log" 2>&1
echo "bench_kernels: exit $?"
tail -40 "$out/bench.log"
