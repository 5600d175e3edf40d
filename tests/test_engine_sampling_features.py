"""Log-probabilities, penalties and parallel samples through the engine with a tiny Llama.

Each is checked against the dense forward: the reported log-probabilities are the log-softmax of
the (penalized, temperature-scaled) logits at each position; penalized greedy tokens are the
argmax of the dense logits penalized in numpy as vLLM defines it; in the overlapped and serial
loops and with speculative drafts alike. Parallel samples compute their prompt once.
"""

import dataclasses

import numpy as np
import pytest

from kvjax.serving.request import SamplingParams
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from tests.dense_llama import dense_logits
from tests.test_engine import TPB, assert_all_pages_free, serve_checked
from tests.test_engine import make_engine as make_plain_engine
from tests.test_llama import random_model, tiny_config

NEW_TOKENS = 9


@pytest.fixture(scope="module")
def model(compile_cache):
    return random_model(tiny_config(vocab_size=64))


def make_engine(model, **options):
    """An engine whose sampler variants are compiled ahead (`serve_checked` counts compiles)."""
    return make_plain_engine(model, sampler_variants=("logprobs", "penalties"), **options)


def prompts(seed=5):
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 64, 4).tolist()
    return [rng.integers(0, 64, 7).tolist(), pattern * 3, rng.integers(0, 64, 13).tolist()]


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def penalize(logits, prompt, outputs, params):
    """vLLM's penalties in numpy, on one position's f32[vocab] logits."""
    logits = logits.copy()
    counts = np.bincount(np.asarray(outputs, np.int64), minlength=logits.shape[0])
    seen = counts > 0
    seen[np.asarray(prompt)] = True
    r = params.repetition_penalty
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / r, logits[seen] * r)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def check_against_dense(model, prompt, output, params):
    """Each token is the argmax of the penalized dense logits (greedy) and its reported
    log-probabilities are theirs, scaled by the temperature."""
    tokens = [*prompt, *output.token_ids]
    logits = dense_logits(model, tokens)
    temperature = params.temperature or 1.0
    assert len(output.logprobs) == len(output.token_ids)
    for index, entry in enumerate(output.logprobs):
        position = len(prompt) + index - 1
        scores = penalize(logits[position], prompt, output.token_ids[:index], params)
        if params.temperature == 0:
            assert entry.token_id == output.token_ids[index] == int(np.argmax(scores))
        expected = log_softmax(scores / temperature)
        np.testing.assert_allclose(entry.logprob, expected[entry.token_id], atol=2e-4)
        ranked = np.argsort(-expected, kind="stable")[: params.logprobs]
        assert len(entry.top) == params.logprobs
        np.testing.assert_allclose([lp for _, lp in entry.top], expected[ranked], atol=2e-4)
        np.testing.assert_allclose(expected[[t for t, _ in entry.top]], expected[ranked], atol=2e-4)


PENALIZED = SamplingParams(
    max_new_tokens=NEW_TOKENS, temperature=0.0, logprobs=5, repetition_penalty=1.6,
    frequency_penalty=0.7, presence_penalty=0.4,
)  # fmt: skip


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, logprobs=3),
        SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.7, seed=3, logprobs=20),
        PENALIZED,
    ],
    ids=["greedy", "sampled", "penalized"],
)
@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_logprobs_and_penalties_equal_the_dense_forward(model, params, overlap):
    engine = make_engine(model, overlap=overlap)
    outputs = serve_checked(engine, prompts(), params)
    for prompt, output in zip(prompts(), outputs, strict=True):
        check_against_dense(model, prompt, output, params)
    assert_all_pages_free(engine)


class OracleDrafter(NgramDrafter):
    """Proposes each prompt's known continuation, with a wrong token at every third output."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def propose(self, requests, max_lens):
        drafts = []
        for request, k in zip(requests, max_lens, strict=True):
            done = len(request.output_token_ids)
            answer = self.answers[tuple(request.prompt_token_ids)][done : done + k]
            drafts.append(
                [(t + 1) % 64 if (done + i) % 3 == 2 else t for i, t in enumerate(answer)]
            )
        return drafts


def test_penalties_change_greedy_tokens_and_speculation_keeps_them(model):
    unpenalized = dataclasses.replace(
        PENALIZED, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0
    )
    plain = serve_checked(make_engine(model), prompts(), unpenalized)
    penalized = serve_checked(make_engine(model), prompts(), PENALIZED)
    assert [o.token_ids for o in plain] != [o.token_ids for o in penalized]
    # Drafts ahead of a position count as outputs there: the same tokens and logprobs, with
    # drafts that are the answer (accepted) but for a wrong one at every third token.
    answers = {tuple(p): o.token_ids for p, o in zip(prompts(), penalized, strict=True)}
    speculative = make_engine(model, speculative=SpeculativeConfig(OracleDrafter(answers), 3))
    drafted = serve_checked(speculative, prompts(), PENALIZED)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in penalized]
    for a, b in zip(drafted, penalized, strict=True):
        np.testing.assert_allclose(
            [e.logprob for e in a.logprobs], [e.logprob for e in b.logprobs], atol=1e-5
        )
    assert speculative.metrics.summary()["acceptance_rate"] > 0
    assert_all_pages_free(speculative)


def test_streamed_logprobs_add_up_to_the_final_ones(model):
    engine = make_engine(model)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, logprobs=2)
    deltas = list(engine.stream(prompts()[0], params))
    assert [e for d in deltas for e in d.new_logprobs] == list(deltas[-1].logprobs)
    assert len(deltas[-1].logprobs) == NEW_TOKENS
    # A request that asks for none gets None.
    assert engine.generate(prompts()[:1], SamplingParams(max_new_tokens=2))[0].logprobs is None


def finish_all(engine, ids):
    """Steps until nothing is left (scoring steps compile when first used: no compile check);
    the outputs of `ids`, checking the cache's invariants after every step."""
    outputs = {}
    while engine.num_unfinished:
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
    return [outputs[i] for i in ids]


def run_samples(engine, prompt, params, n):
    return finish_all(engine, engine.add_samples(prompt, params, n))


def test_parallel_samples_compute_the_prompt_once(model):
    engine = make_engine(model)
    prompt = np.random.default_rng(1).integers(0, 64, 6 * TPB + 2).tolist()
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=11)
    samples = run_samples(engine, prompt, sampled, 4)
    # Sample i is the request seeded seed + i; they differ.
    seeded = [dataclasses.replace(sampled, seed=11 + i) for i in range(4)]
    alone = make_engine(model).generate([prompt] * 4, seeded, use_tqdm=False)
    assert [s.token_ids for s in samples] == [a.token_ids for a in alone]
    assert len({s.token_ids for s in samples}) > 1
    # The first computed the prompt; the others reused all of it but the last token.
    assert samples[0].metrics.num_reused_tokens == 0
    assert all(s.metrics.num_reused_tokens >= len(prompt) - TPB for s in samples[1:])
    assert_all_pages_free(engine)


def test_parallel_samples_are_checked_and_aborted_as_a_group(model):
    engine = make_engine(model)
    for n in (0, 129, 2.5):
        with pytest.raises(ValueError, match="n="):
            engine.add_samples([1, 2, 3], None, n)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_samples([], None, 3)
    assert engine.num_unfinished == 0
    ids = engine.add_samples([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4), 3)
    assert engine.num_unfinished == 3 and engine.request_counts() == (0, 3)
    engine.abort(ids[2])  # a held sample
    engine.step()
    engine.abort(ids[0])  # the first: the held one is released and computes the prompt
    while engine.num_unfinished:
        finished = engine.step()
    assert [o.request_id for o in finished] == [ids[1]] and len(finished[0].token_ids) == 4
    assert_all_pages_free(engine)


@pytest.mark.parametrize(
    "field, value",
    [("logprobs", 21), ("logprobs", -1), ("presence_penalty", 2.5), ("frequency_penalty", -3),
     ("repetition_penalty", 0.0), ("repetition_penalty", float("inf"))],
)  # fmt: skip
def test_bad_sampling_values_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def serve_all(engine, prompts, params):
    return finish_all(engine, [engine.add_request(p, params) for p in prompts])


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "serial"])
def test_prompt_logprobs_equal_the_dense_forward_even_for_a_cached_prompt(model, overlap):
    """Chunked prompts (a 32-token budget, 4-token chunks) scored token by token; a prompt
    served before is computed again rather than taken from the cache, and scores the same; the
    scoring steps were compiled at construction."""
    variants = ("logprobs", "penalties", "prompt_logprobs")  # the scoring steps too
    engine = make_plain_engine(model, overlap=overlap, sampler_variants=variants)
    long_prompt = np.random.default_rng(9).integers(0, 64, 40).tolist()
    batch = [*prompts(), long_prompt]
    plain = SamplingParams(max_new_tokens=3, temperature=0.0)
    serve_all(engine, batch, plain)  # now cached
    params = SamplingParams(max_new_tokens=3, temperature=0.0, prompt_logprobs=4)
    outputs = serve_checked(engine, batch, params)  # nothing compiles: warmed up
    for prompt, output in zip(batch, outputs, strict=True):
        assert output.metrics.num_reused_tokens == 0
        scored = output.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        expected = log_softmax(dense_logits(model, prompt))
        for position, entry in enumerate(scored[1:]):
            assert entry.token_id == prompt[position + 1]
            np.testing.assert_allclose(entry.logprob, expected[position, prompt[position + 1]],
                                       atol=2e-4)  # fmt: skip
            best = np.sort(expected[position])[::-1][:4]
            np.testing.assert_allclose([lp for _, lp in entry.top], best, atol=2e-4)
    # The generated tokens are those of a plain request; the cache serves later ones again.
    again = serve_all(engine, batch, plain)
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs]
    assert all(o.metrics.num_reused_tokens > 0 for o in again[-1:])
    assert all(o.prompt_logprobs is None for o in again)
    assert_all_pages_free(engine)


def test_prompt_logprobs_are_refused_with_speculative_decoding(model):
    engine = make_engine(model, speculative=SpeculativeConfig(NgramDrafter(), 3))
    with pytest.raises(ValueError, match="prompt_logprobs=0 is not supported with speculative"):
        engine.add_request([1, 2, 3], SamplingParams(prompt_logprobs=0))
    assert engine.num_unfinished == 0


def test_prompt_logprobs_survive_preemption_by_recomputation(model):
    """Without a host tier, pressure drops requests' KV and computes their prompts again: the
    prompt is scored once, and equals the dense forward's scores."""
    rng = np.random.default_rng(2)
    batch = [rng.integers(0, 64, n).tolist() for n in (9, 12, 10, 11)]
    engine = make_plain_engine(model, device_pages=13, host_pages=0)  # no sampler variants
    params = SamplingParams(max_new_tokens=13, temperature=0.0, prompt_logprobs=1)
    outputs = serve_all(engine, batch, params)
    assert sum(o.metrics.num_recomputations for o in outputs) > 0
    for prompt, output in zip(batch, outputs, strict=True):
        expected = log_softmax(dense_logits(model, prompt))
        scored = [entry.logprob for entry in output.prompt_logprobs[1:]]
        positions = range(len(prompt) - 1)
        np.testing.assert_allclose(
            scored, [expected[p, prompt[p + 1]] for p in positions], atol=2e-4
        )
    engine.manager.check_no_leaks()


def test_penalized_and_plain_requests_ending_by_a_stop_token_in_the_overlapped_loop(model):
    """A penalized row waits for the step in flight before scheduling: requests that step
    ends (by a stop token, not by length) leave before the next batch is built."""
    serial = serve_checked(make_engine(model, overlap=False), prompts(), PENALIZED)
    plain_params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    plain = serve_checked(make_engine(model, overlap=False), prompts(), plain_params)
    stops = [
        dataclasses.replace(PENALIZED, stop_token_ids=(serial[0].token_ids[2],)),
        dataclasses.replace(plain_params, stop_token_ids=(plain[1].token_ids[1],)),
        PENALIZED,
    ]
    engine = make_engine(model, overlap=True)
    ids = [engine.add_request(p, params) for p, params in zip(prompts(), stops, strict=True)]
    outputs = finish_all(engine, ids)
    first_stop = serial[0].token_ids.index(serial[0].token_ids[2]) + 1
    assert outputs[0].token_ids == serial[0].token_ids[:first_stop]
    assert outputs[1].token_ids == plain[1].token_ids[: plain[1].token_ids.index(
        plain[1].token_ids[1]) + 1]  # fmt: skip
    assert outputs[2].token_ids == serial[2].token_ids
    assert_all_pages_free(engine)


def test_parallel_sample_ids_must_be_distinct(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="request_ids=\\[7, 7\\]"):
        engine.add_samples([1, 2, 3], None, 2, request_ids=[7, 7])
    assert engine.num_unfinished == 0
