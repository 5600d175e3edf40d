"""The engine on a failing disk: a page whose disk write or read failed is never served; the
requests that held it recompute and still produce exactly the dense model's tokens."""

import errno
import os

import numpy as np
import pytest

from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from tests.test_engine import TPB, dense_greedy, prompts_with_shared_prefix
from tests.test_llama import random_model, tiny_config

LONG = SamplingParams(max_new_tokens=16, temperature=0.0)


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def fail_every(monkeypatch, call, period):
    """Makes every `period`-th call of `os.<call>` fail with EIO; returns the failure count."""
    real, calls, failures = getattr(os, call), [0], [0]

    def faulty(*args):
        calls[0] += 1
        if calls[0] % period == 0:
            failures[0] += 1
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(os, call, faulty)
    return failures


def test_failed_disk_writes_and_reads_recompute_and_serve_the_right_tokens(
    model, tmp_path, monkeypatch
):
    config = cache_config_for(
        model, tokens_per_block=TPB, device_pages=12, host_pages=3, disk_pages=64,
        disk_dir=tmp_path,
    )  # fmt: skip
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=32, chunk_unit=4)
    engine = Engine(model, config, scheduler)
    write_failures = fail_every(monkeypatch, "pwrite", 5)
    read_failures = fail_every(monkeypatch, "preadv", 2)
    rng = np.random.default_rng(9)
    prompts = prompts_with_shared_prefix(rng, 8, [5, 12, 3, 9, 14, 6, 10, 2])
    ids = {engine.add_request(prompt, LONG): prompt for prompt in prompts}
    outputs = {}
    with pytest.warns(RuntimeWarning, match="pages lost"):
        while engine.num_unfinished:
            for output in engine.step():
                outputs[output.request_id] = output
            engine.manager.check_invariants()
    assert write_failures[0] > 0 and read_failures[0] > 0
    stats = engine.manager.stats
    assert stats.lost_pages > 0
    assert sum(o.metrics.num_preemptions for o in outputs.values()) > 0
    for request_id, prompt in ids.items():
        assert outputs[request_id].token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    engine.manager.check_no_leaks()
    engine.shutdown()
