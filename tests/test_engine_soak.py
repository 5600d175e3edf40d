"""The bounded engine soak in CI (the long one: `python -m benchmarks.soak --requests 400`)."""

import contextlib

import numpy as np
import pytest

from benchmarks.soak import failing_disk_io, make_engine, served_alone, soak, workload
from kvjax.serving.scheduler import SchedulerPolicy
from tests.test_llama import random_model, tiny_config

NUM_REQUESTS = 24


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


@pytest.fixture(scope="module")
def served(model):
    requests = workload(np.random.default_rng(0), NUM_REQUESTS)
    ample = make_engine(
        model, device_pages=64, host_pages=0, policy=SchedulerPolicy.MAX_UTILIZATION
    )
    expected = served_alone(ample, requests)
    ample.shutdown()
    return requests, expected


@pytest.mark.parametrize(
    ("policy", "host_pages", "disk"),
    [
        (SchedulerPolicy.MAX_UTILIZATION, 8, False),
        (SchedulerPolicy.MAX_UTILIZATION, 0, False),
        (SchedulerPolicy.GUARANTEED_NO_EVICT, 8, False),
        (SchedulerPolicy.MAX_UTILIZATION, 2, True),
    ],
    ids=["max-util-host", "max-util-no-host", "no-evict-host", "max-util-failing-disk"],
)
def test_a_randomized_soak_serves_every_request_exactly_and_leaks_nothing(
    model, served, policy, host_pages, disk, tmp_path
):
    requests, expected = served
    engine = make_engine(
        model, device_pages=10, host_pages=host_pages, policy=policy,
        disk_dir=tmp_path if disk else None,
    )  # fmt: skip
    with failing_disk_io(5) if disk else contextlib.nullcontext():
        report = soak(engine, requests, expected, seed=1, abort_fraction=0.15)
    engine.shutdown()
    print(report)
    assert report.wrong_outputs == 0 and report.leaks == 0, report
    assert report.finished + report.aborted == NUM_REQUESTS, report
    if policy is SchedulerPolicy.MAX_UTILIZATION:
        assert report.suspensions + report.recomputations > 0, report  # the device was scarce
    assert (report.lost_pages > 0) == disk, report  # the failing disk did lose pages
