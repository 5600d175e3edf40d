"""The overlapped loop against the serial one: the same requests, arriving at the same calls,
emit exactly the same tokens under prefix reuse, chunked prefill, suspension, recomputation,
stop tokens, EOS and length limits; the overlapped loop really feeds tokens on the device and
voids the rows of requests that ended while their next step was in flight."""

import numpy as np
import pytest

from kvjax.engine import runner as runner_module
from kvjax.runtime.sampling import SampledTokens
from kvjax.serving.request import FinishReason, RequestState, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig, SchedulerPolicy
from tests.test_engine import dense_greedy, make_engine
from tests.test_llama import random_model, tiny_config


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def workload(seed: int, num_requests: int = 10):
    """(arrival call, prompt, params) triples: shared prefixes, long prompts, greedy and
    seeded sampling, stop tokens and assorted lengths."""
    rng = np.random.default_rng(seed)
    prefix = list(rng.integers(0, 64, 9))
    requests = []
    for index in range(num_requests):
        prompt = [*prefix[: rng.integers(0, 10)], *rng.integers(0, 64, rng.integers(1, 30))]
        params = SamplingParams(
            max_new_tokens=int(rng.integers(1, 12)),
            temperature=float(rng.choice([0.0, 0.8])),
            top_k=int(rng.choice([0, 8])),
            seed=int(rng.integers(0, 1000)),
            stop_token_ids=tuple(int(t) for t in rng.integers(0, 64, rng.integers(0, 3))),
        )
        requests.append((int(rng.integers(0, 6)) if index else 0, prompt, params))
    return requests


class Probe:
    """Counts input tokens fed on the device and rows voided by an earlier token."""

    def __init__(self, engine, monkeypatch) -> None:
        self.fed = self.void = 0
        registry, advance = engine.registry, runner_module.advance_dispatched

        def counting_registry(params, pool, inputs, fed=None):
            self.fed += int((np.asarray(inputs.tokens) < 0).sum())
            return registry(params, pool, inputs, fed)

        def counting_advance(requests, *args, **kwargs):
            self.void += sum(r.state is RequestState.COMPLETE for r in requests)
            return advance(requests, *args, **kwargs)

        engine.registry = counting_registry
        monkeypatch.setattr(runner_module, "advance_dispatched", counting_advance)


def serve(engine, requests):
    """Adds each request at its arrival call of `step()`; checks invariants after each call."""
    outputs, ids, call = {}, {}, 0
    pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
    while pending or engine.num_unfinished:
        while pending and requests[pending[0]][0] <= call:
            _, prompt, params = requests[pending[0]]
            ids[pending.pop(0)] = engine.add_request(prompt, params)
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
        call += 1
    engine.manager.check_no_leaks()
    return [outputs[ids[index]] for index in range(len(requests))]


NO_EVICT = SchedulerConfig(
    max_batch_size=4, max_num_tokens=32, chunk_unit=4, policy=SchedulerPolicy.GUARANTEED_NO_EVICT
)
CONFIGS = {
    "ample": dict(device_pages=60, host_pages=40),
    "suspending": dict(device_pages=14, host_pages=64),
    "recomputing": dict(device_pages=14, host_pages=0),
    "no-evict": dict(device_pages=14, host_pages=0, scheduler=NO_EVICT),
    "commit-generated": dict(device_pages=40, host_pages=40, commit_generated=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_overlapped_loop_emits_exactly_the_serial_loops_tokens(model, monkeypatch, name):
    requests = workload(seed=list(CONFIGS).index(name))
    eos = list(range(0, 64, 9))  # 1 token in 8: requests end by EOS mid-run
    serial = make_engine(model, overlap=False, eos_token_ids=eos, **CONFIGS[name])
    expected = serve(serial, requests)
    serial.shutdown()
    overlapped = make_engine(model, eos_token_ids=eos, **CONFIGS[name])
    probe = Probe(overlapped, monkeypatch)
    outputs = serve(overlapped, requests)
    for got, want in zip(outputs, expected, strict=True):
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
    assert probe.fed > 0  # tokens went from step to step on the device
    reasons = {o.finish_reason for o in outputs}
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    assert probe.void > 0  # a stop token ended a request already placed in the next step
    overlapped.shutdown()


def test_greedy_overlapped_tokens_are_the_dense_models(model):
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, 64, n)) for n in (3, 17, 40, 9)]
    engine = make_engine(model)
    assert engine._runner.overlap
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt)
    engine.manager.check_no_leaks()
    engine.shutdown()


def test_a_step_that_fails_on_the_device_loses_the_steps_in_flight_once(model, monkeypatch):
    """The step in flight fails when its tokens are fetched: it and the step dispatched after it
    are dropped, the pool is rebuilt and every started request recomputes; outputs stay the
    dense model's. A second failure in a row raises."""
    engine = make_engine(model)
    rng = np.random.default_rng(6)
    prompts = [list(rng.integers(0, 64, n)) for n in (5, 11, 7)]
    fetch, calls = SampledTokens.fetch, []

    def failing_fetch(self):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device fault")
        return fetch(self)

    monkeypatch.setattr(SampledTokens, "fetch", failing_fetch)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    with pytest.warns(RuntimeWarning, match="a step failed"):
        outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt)
    assert sum(o.metrics.num_recomputations for o in outputs) > 0
    engine.manager.check_no_leaks()

    def always_failing(self):
        raise RuntimeError("device gone")

    monkeypatch.setattr(SampledTokens, "fetch", always_failing)
    engine.add_request(prompts[0], params)
    with pytest.warns(RuntimeWarning), pytest.raises(runner_module.StepLost, match="device gone"):
        for _ in range(4):
            engine.step()
    engine.shutdown()


def test_speculation_keeps_the_serial_loop(model):
    from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig

    engine = make_engine(model, speculative=SpeculativeConfig(NgramDrafter(), 2))
    assert not engine._runner.overlap
    engine.shutdown()
