"""Tensor parallelism over a CPU mesh of 4 devices, in a subprocess (tests/tp_check.py) so that
the rest of the suite keeps one device."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_devices_env(count: int) -> dict[str, str]:
    """This environment with `count` CPU devices and the repository importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_sharded_engines_match_the_single_device_engine(compile_cache):
    env = cpu_devices_env(4)
    result = subprocess.run(
        [sys.executable, "-m", "tests.tp_check"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tensor parallel ok" in result.stdout
