"""The JAX-free parts of a step, alone: the request door, the deadlock watch and how a sampled
token finishes a request."""

import types

import numpy as np
import pytest

from kvjax.serving.intake import RequestIntake
from kvjax.serving.progress import ProgressWatch, memory_report
from kvjax.serving.request import FinishReason, Request, SamplingParams
from kvjax.serving.results import append_token
from kvjax.serving.scheduler import SchedulerConfig, SchedulerOutput


def intake(max_seq_len=32, **config):
    manager = types.SimpleNamespace(max_seq_len=max_seq_len)  # all the door reads of it
    config = SchedulerConfig(max_batch_size=4, max_num_tokens=8, chunk_unit=4, **config)
    return RequestIntake(manager, config, vocab_size=64, lora_pages={3: 1}, seed=0)


def test_the_door_refuses_what_cannot_run_and_numbers_the_rest():
    door = intake()
    first = door.make_request(np.array([1, 2, 3, 4], np.int64), None, live={})
    assert first.request_id == 0 and first.prompt_token_ids == [1, 2, 3, 4]
    assert all(type(token) is int for token in first.prompt_token_ids)
    assert first.sampling_params.seed is not None  # drawn from the engine's seed
    assert door.make_request([5], None, live={}, request_id=9).request_id == 9
    assert door.make_request([5], None, live={}).request_id == 10  # past the largest given
    with pytest.raises(ValueError, match="request_id=9 is already live"):
        door.make_request([5], None, live={9}, request_id=9)
    with pytest.raises(ValueError, match="must have 1 to 31 tokens"):
        door.make_request(list(range(32)), None, live={})
    with pytest.raises(ValueError, match=r"lora_id=4 is unknown; known: \[3\]"):
        door.make_request([1], None, live={}, lora_id=4)
    with pytest.raises(ValueError, match="is not a SamplingParams"):
        door.make_request([1], {"temperature": 0}, live={})
    unchunked = intake(enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="exceeds the per-step token budget 8"):
        unchunked.make_request(list(range(9)), None, live={})
    seeds = [intake().make_request([1], None, live={}).sampling_params.seed for _ in range(2)]
    assert seeds[0] == seeds[1]  # the same engine seed draws the same request seeds


def outcome(num_paused=0, num_running=0):
    request = Request(0, [1])
    return SchedulerOutput([], [request] * num_running, [request] * num_paused, num_running)


def test_the_progress_watch_waits_while_suspensions_make_room():
    def report():
        return "device: 12 of 12 pages held"

    watch = ProgressWatch(report)
    watch.observe(outcome(num_paused=1), num_queued=2)
    watch.observe(outcome(num_paused=1), num_queued=2)
    with pytest.raises(
        RuntimeError, match=r"no request of 2 can be scheduled \(device: 12 of 12 pages held\)"
    ):
        watch.observe(outcome(num_paused=1), num_queued=2)
    watch = ProgressWatch(report)
    watch.observe(outcome(num_paused=1), num_queued=1)
    watch.observe(outcome(num_running=1), num_queued=1)  # progress
    watch.observe(outcome(num_paused=1), num_queued=1)
    with pytest.raises(RuntimeError, match="more pages where every page is held"):
        watch.observe(outcome(), num_queued=1)  # nothing preempted


def test_the_memory_report_names_each_tier_and_the_budget():
    from kvjax.cache import BlockRadixTree, TieredPages

    pages = TieredPages(BlockRadixTree(4), num_device_pages=5, num_host_pages=3)
    assert pages.allocate(2) is not None
    assert memory_report(pages, 32) == (
        "device: 2 of 4 pages held; host: 0 of 3 pages held; no disk tier; token budget 32 per step"
    )


@pytest.mark.parametrize(
    ("token", "params", "reason"),
    [
        (7, SamplingParams(stop_token_ids=(7,)), FinishReason.STOP),
        (2, SamplingParams(), FinishReason.STOP),  # EOS
        (2, SamplingParams(ignore_eos=True), None),
        (5, SamplingParams(max_new_tokens=1), FinishReason.LENGTH),
    ],
)
def test_a_sampled_token_finishes_a_request_by_stop_eos_or_length(token, params, reason):
    request = Request(0, [1, 2, 3], params)
    assert append_token(request, token, eos_token_ids={2}, max_seq_len=32) is (reason is not None)
    assert request.output_token_ids == [token] and request.finish_reason is reason


def test_a_request_ends_at_max_seq_len():
    request = Request(0, [1, 2, 3], SamplingParams(max_new_tokens=10))
    assert not append_token(request, 5, eos_token_ids=(), max_seq_len=5)
    assert append_token(request, 5, eos_token_ids=(), max_seq_len=5)
    assert request.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([1.0, 2.0], "prompt token 1.0 at index 0 is not an int id"),
        (["1", "2"], "prompt token '1' at index 0 is not an int id"),
        ("12", "must be a sequence of token ids"),
        ([[1, 2], [3]], r"prompt token \[1, 2\] at index 0 is not an int id"),
        ([1, True], "prompt token True at index 1 is not an int id"),
        (np.array([[1, 2]]), r"shape \(1, 2\); expected a 1-D integer array"),
        (np.array([1.5]), "dtype float64"),
        (5, "prompt_token_ids=5 must be a sequence"),
        ([1, 64], "token 64 at index 1 is outside the vocabulary"),
    ],
)
def test_the_door_takes_only_a_1d_sequence_of_token_ids(prompt, message):
    with pytest.raises(ValueError, match=message):
        intake().make_request(prompt, None, live={})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"salt": 3.5}, "salt=3.5 must be an int, str, bytes or None"),
        ({"lora_id": 1.0}, "lora_id=1.0 must be an int or None"),
        ({"lora_id": True}, "lora_id=True must be an int or None"),
        ({"request_id": 2.0}, "request_id=2.0 must be an int"),
        ({"request_id": -1}, "request_id=-1 must be >= 0"),
        ({"priority": 101}, "priority=101 must be in"),
    ],
)
def test_the_door_checks_every_field_before_queuing(options, message):
    door = intake()
    with pytest.raises(ValueError, match=message):
        door.make_request([1, 2], None, live={}, **options)
    assert door.make_request([1], None, live={}).request_id == 0  # no id was used up


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"top_k": 2**40}, r"top_k=1099511627776 must be in \[0, 2147483647\]"),
        ({"stop_token_ids": 5}, "stop_token_ids=5 must be a sequence of token ids"),
        ({"stop_token_ids": "5"}, "stop_token_ids='5' must be a sequence"),
        ({"ignore_eos": "no"}, "ignore_eos='no' must be a bool"),
        ({"temperature": True}, "temperature=True must be a finite float"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"max_new_tokens": 1.5}, "max_new_tokens=1.5 must be an int"),
    ],
)
def test_sampling_params_refuse_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_engine_metrics_keep_totals_and_a_bounded_window():
    from kvjax.serving.metrics import EngineMetrics
    from kvjax.serving.request import RequestMetrics, RequestOutput

    manager = types.SimpleNamespace(pages=None)
    metrics = EngineMetrics(manager, window=3)
    for i in range(10):
        request_metrics = RequestMetrics(arrival_time=i, first_token_time=i + 0.5)
        request_metrics.num_preemptions, request_metrics.num_recomputations = 2, 1
        output = RequestOutput(i, (1, 2, 3), (4, 5), FinishReason.LENGTH, request_metrics)
        metrics.record_finished(output)
    assert len(metrics.finished) == 3  # the window
    summary = metrics.summary()
    assert summary["requests"] == 10 and summary["output_tokens"] == 20  # the totals
    assert summary["prompt_tokens"] == 30 and summary["preemptions"] == 20
    assert summary["recomputations"] == 10 and summary["ttft_s"]["p50"] == 0.5


def test_interrupts_are_held_back_to_the_end_of_the_block(request):
    import signal
    import threading

    from kvjax.serving.interrupts import interrupts_deferred

    # A background shell starts Python with SIGINT ignored: make Ctrl-C mean KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        steps.append("finished the block")
    assert steps == ["finished the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored

    def elsewhere():  # no signals off the main thread: the block just runs
        with interrupts_deferred():
            steps.append("ran in a thread")

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert steps[-1] == "ran in a thread"
