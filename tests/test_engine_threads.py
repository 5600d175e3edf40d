"""The engine's thread contract: `add_request`, `abort` and `num_unfinished` from any thread
while one thread steps; `generate` leaves nothing of its own behind and drops nothing of others'."""

import signal
import threading

import numpy as np
import pytest

from kvjax.serving import results
from kvjax.serving.request import FinishReason, SamplingParams
from tests.test_engine import GREEDY, dense_greedy, make_engine, prompts_with_shared_prefix
from tests.test_llama import random_model, tiny_config

LONG = SamplingParams(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def step_until_done(engine, threads, outputs):
    """Steps (checking the cache after each) until the threads ended and nothing is left."""
    while any(t.is_alive() for t in threads) or engine.num_unfinished:
        for output in engine.step():
            assert output.request_id not in outputs, "an output came back twice"
            outputs[output.request_id] = output
        engine.manager.check_invariants()
    for thread in threads:
        thread.join()


def test_requests_added_from_two_threads_while_stepping_are_all_served(model):
    engine = make_engine(model)
    rng = np.random.default_rng(4)
    prompts = prompts_with_shared_prefix(rng, 9, [3, 11, 5, 17, 2, 8, 13, 6])
    ids: dict[int, list[int]] = {}  # request id -> prompt
    errors = []

    def add(chunk):
        try:
            for prompt in chunk:
                ids[engine.add_request(prompt, GREEDY)] = prompt
        except Exception as error:  # surfaced by the main thread
            errors.append(error)

    threads = [threading.Thread(target=add, args=(prompts[i::2],)) for i in range(2)]
    outputs = {}
    for thread in threads:
        thread.start()
    step_until_done(engine, threads, outputs)
    assert not errors and len(ids) == len(prompts)  # eight distinct ids: none lost
    assert sorted(outputs) == sorted(ids)
    for request_id, prompt in ids.items():
        assert outputs[request_id].token_ids == dense_greedy(model, prompt)
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_aborts_from_another_thread_never_break_a_step(model):
    engine = make_engine(model, device_pages=14, host_pages=40)  # tight: suspensions happen
    rng = np.random.default_rng(5)
    prompts = prompts_with_shared_prefix(rng, 5, [7, 12, 3, 9, 14, 6])
    ids = [engine.add_request(prompt, LONG) for prompt in prompts]
    victims, aborted = ids[1::2], {}
    started = threading.Event()

    def abort_some():
        started.wait(timeout=60)
        for request_id in victims:
            aborted[request_id] = engine.abort(request_id)

    thread = threading.Thread(target=abort_some)
    thread.start()
    outputs = {}
    for output in engine.step():  # the first step runs before the aborts can
        outputs[output.request_id] = output
    started.set()
    step_until_done(engine, [thread], outputs)
    assert sorted(aborted) == victims and not set(aborted) & set(outputs)
    for request_id in victims:
        assert aborted[request_id].finish_reason is None  # stopped, not finished
    for request_id in ids[::2]:
        prompt = prompts[ids.index(request_id)]
        assert outputs[request_id].token_ids == dense_greedy(model, prompt, 24)
    engine.manager.check_no_leaks()
    with pytest.raises(ValueError, match=f"request_id={victims[0]} is not live"):
        engine.abort(victims[0])
    engine.shutdown()


def test_generate_keeps_other_outputs_and_cleans_up_its_own(model):
    engine = make_engine(model)
    rng = np.random.default_rng(6)
    first, second, third = prompts_with_shared_prefix(rng, 4, [3, 5, 7])
    mine = engine.add_request(first, SamplingParams(max_new_tokens=1, temperature=0.0))
    (output,) = engine.generate([second], GREEDY, use_tqdm=False)
    assert output.token_ids == dense_greedy(model, second)
    returned = engine.step()  # the request generate did not add comes back here
    assert [o.request_id for o in returned] == [mine]
    assert returned[0].finish_reason is FinishReason.LENGTH

    class Interrupt(Exception):
        pass

    real_step, calls = engine.step, []

    def interrupted_step():  # the first step runs (pages are taken), the second is interrupted
        calls.append(1)
        if len(calls) > 1:
            raise Interrupt
        return real_step()

    engine.step = interrupted_step
    with pytest.raises(Interrupt):
        engine.generate([third, second], GREEDY, use_tqdm=False)
    engine.step = real_step
    assert len(calls) == 2 and engine.num_unfinished == 0  # generate aborted its own requests
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_a_step_that_loses_the_donated_pool_is_survived_once(model):
    """The compiled step fails after the pool was donated (a device fault): the engine rebuilds
    the pool, forgets the device's blocks, recomputes the requests in flight, and every output
    is still exactly the dense model's; a second failure in a row raises."""
    engine = make_engine(model)
    rng = np.random.default_rng(7)
    prompts = prompts_with_shared_prefix(rng, 6, [4, 9, 3])
    registry, calls = engine.registry, []

    def failing_registry(params, pool, inputs, fed=None):
        calls.append(1)
        if len(calls) == 3:  # mid-generation, after prefix blocks entered the tree
            pool.delete()  # what donation does to the caller's array
            raise RuntimeError("device fault")
        return registry(params, pool, inputs, fed)

    engine.registry = failing_registry
    ids = [engine.add_request(prompt, GREEDY) for prompt in prompts]
    outputs = {}
    with pytest.warns(RuntimeWarning, match="a step failed after donating the KV pool"):
        while engine.num_unfinished:
            for output in engine.step():
                outputs[output.request_id] = output
            engine.manager.check_invariants()
    for request_id, prompt in zip(ids, prompts, strict=True):
        assert outputs[request_id].token_ids == dense_greedy(model, prompt)
    assert sum(o.metrics.num_recomputations for o in outputs.values()) == len(prompts)
    engine.manager.check_no_leaks()

    def always_failing(params, pool, inputs, fed=None):
        pool.delete()
        raise RuntimeError("device gone")

    engine.registry = always_failing
    engine.add_request(prompts[0], GREEDY)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="device gone"):
        for _ in range(3):
            engine.step()
    engine.shutdown()


def test_a_request_that_fails_inside_a_step_fails_alone(model):
    from kvjax.serving.request import FinishReason

    engine = make_engine(model)
    rng = np.random.default_rng(8)
    prompts = prompts_with_shared_prefix(rng, 5, [3, 6, 4])
    ids = [engine.add_request(prompt, GREEDY) for prompt in prompts]
    computed = engine.resources.context_computed

    def context_computed(request, num_tokens):
        if request.request_id == ids[1]:
            raise ValueError("a broken request")
        computed(request, num_tokens)

    engine.resources.context_computed = context_computed
    outputs = {}
    while engine.num_unfinished:
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
    failed = outputs[ids[1]]
    assert failed.finish_reason is FinishReason.ERROR and failed.token_ids == ()
    assert failed.error == "ValueError: a broken request"
    for request_id in (ids[0], ids[2]):
        prompt = prompts[ids.index(request_id)]
        assert outputs[request_id].token_ids == dense_greedy(model, prompt)
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_ctrl_c_while_results_are_applied_lands_after_them(model, monkeypatch, request):
    """SIGINT arrives between a cache advancing and its token being appended: the step finishes
    its books first, then raises KeyboardInterrupt; serving on gives the dense model's tokens
    (without the deferral the next step would write that token's KV twice)."""
    engine = make_engine(model)
    rng = np.random.default_rng(8)
    prompts = prompts_with_shared_prefix(rng, 5, [4, 9])
    ids = {engine.add_request(prompt, LONG): prompt for prompt in prompts}
    real_append, signals = results.append_token, []

    def append_after_sigint(*args, **kwargs):
        step = engine.metrics.num_steps
        if step in (2, 4) and step not in signals:  # one interrupt in each of two steps
            signals.append(step)
            signal.raise_signal(signal.SIGINT)  # delivered at once unless deferred
        return real_append(*args, **kwargs)

    monkeypatch.setattr(results, "append_token", append_after_sigint)
    # A background shell starts Python with SIGINT ignored: make Ctrl-C mean KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    outputs, interrupts = {}, 0
    while engine.num_unfinished:
        try:
            for output in engine.step():
                outputs[output.request_id] = output
        except KeyboardInterrupt:
            interrupts += 1
        engine.manager.check_invariants()
    assert interrupts == 2
    for request_id, prompt in ids.items():
        assert outputs[request_id].token_ids == dense_greedy(model, prompt, LONG.max_new_tokens)
    engine.manager.check_no_leaks()
    engine.shutdown()
