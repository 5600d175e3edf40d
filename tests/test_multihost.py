"""Two processes joined by `jax.distributed` on localhost (tests/multihost_check.py), each with
2 CPU devices, serve requests on one 4-way mesh in lockstep."""

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.test_tensor_parallel import ROOT, cpu_devices_env

TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(pid: int, port: str, out) -> subprocess.Popen:
    # Output to a file: a full pipe would block the process while the test only polls.
    with open(out / f"log_{pid}.txt", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_check", str(pid), port, str(out)],
            cwd=ROOT, env=cpu_devices_env(2), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.slow  # 75 s (two processes compiling); tensor parallelism in one process runs in CI
def test_two_processes_serve_in_lockstep(tmp_path, compile_cache):
    port = str(free_port())
    processes = [launch(pid, port, tmp_path) for pid in (0, 1)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # A process that fails leaves the other waiting in a collective: stop it too.
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for p in processes:
        p.wait()
    logs = [(tmp_path / f"log_{pid}.txt").read_text() for pid in (0, 1)]
    for pid, (p, log) in enumerate(zip(processes, logs, strict=True)):
        both = "\n".join(f"--- process {i}:\n{text[-3000:]}" for i, text in enumerate(logs))
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{both}"
        assert f"process {pid}: multihost ok" in log, both
    tokens = [json.loads((tmp_path / f"tokens_{pid}.json").read_text()) for pid in (0, 1)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 9
