"""`python -m kvjax.serve` as a user runs it: a process serving a checkpoint directory (a tiny
random Llama and a trained tokenizer written by the test) that, on SIGTERM, stops taking
connections, lets or makes its open streams end, closes its engine and exits."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from models.loader import save_hf_checkpoint
from tests.test_llama import random_model, tiny_config
from tests.test_text import CHATML, original_tokenizer, write_tokenizer_dir

DRAIN_SECONDS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face directory: the weights and a ChatML tokenizer."""
    path = tmp_path_factory.mktemp("tiny-chat")
    backend = original_tokenizer("qwen2")
    model = random_model(tiny_config(vocab_size=backend.get_vocab_size()), seed=11)
    save_hf_checkpoint(model, path)
    config = {"eos_token": "<|im_end|>", "chat_template": CHATML, "add_bos_token": False}
    write_tokenizer_dir(path, backend, config)
    return path


def start_server(checkpoint, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "kvjax.serve", "--model", str(checkpoint), "--port", str(port),
        "--device-mib", "4", "--max-seq-len", "256", "--max-batch-size", "4",
        "--max-num-tokens", "64", "--drain-seconds", str(DRAIN_SECONDS),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    pytest.fail(f"the server did not come up:\n{process.communicate()[0][-3000:]}")


def test_sigterm_ends_open_streams_closes_the_engine_and_exits(checkpoint):
    port = free_port()
    process = start_server(checkpoint, port)
    url = f"http://127.0.0.1:{port}"
    try:
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        })  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        body = {"prompt": "Once", "max_tokens": 200, "stream": True, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: ")))
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(httpx.TransportError):  # a stream cut at shutdown
                events += [line for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - sent
        # The stream either ran to its end or was cut when the drain ran out.
        assert ended < DRAIN_SECONDS + 15
        if events[-1] == "data: [DONE]":
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode in (0, -signal.SIGTERM), output[-3000:]
    assert "the engine loop is closed and the engine shut down" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    with pytest.raises(httpx.TransportError):  # no longer taking connections
        httpx.get(f"{url}/health", timeout=1)
