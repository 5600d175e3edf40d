"""The OpenAI-compatible server, spoken to by the official `openai` client and plain HTTP: a tiny
random model with a tokenizer the tests train; completions and chat, streamed and not, stop
strings, log-probabilities, parallel samples, penalties, errors as 400/429, a client leaving
mid-stream (its pages freed), 64 concurrent streams equal to the plain answers, and `/metrics`
parsed by Prometheus' parser."""

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.server.app import build_app
from kvjax.server.engine_loop import EngineLoop
from kvjax.server.metrics import ServerMetrics
from kvjax.serving.scheduler import SchedulerConfig
from tests.test_engine_text import chatml_tokenizer
from tests.test_llama import random_model, tiny_config

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Café au lait, 12 croissants"}]


class Server:
    """uvicorn serving the app on a free port from a thread of this process."""

    def __init__(self, loop: EngineLoop, metrics: ServerMetrics):
        config = uvicorn.Config(build_app(loop, metrics, MODEL), port=0, log_level="warning")
        self.loop, self.server = loop, uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join()
        self.loop.close(timeout=0)


def make_server(model, tokenizer, *, max_waiting=64) -> Server:
    cache = cache_config_for(model, tokens_per_block=4, device_pages=64, host_pages=64)
    scheduler = SchedulerConfig(max_batch_size=8, max_num_tokens=64, chunk_unit=4)
    engine = Engine(
        model, cache, scheduler, max_seq_len=128, tokenizer=tokenizer,
        sampler_variants=("logprobs", "penalties"),
    )  # fmt: skip
    metrics = ServerMetrics(engine)
    return Server(EngineLoop(engine, max_waiting=max_waiting, on_finished=metrics.observe), metrics)


@pytest.fixture(scope="module")
def model_and_tokenizer(compile_cache):
    """The engine text tests' tiny model and trained ChatML tokenizer."""
    tokenizer = chatml_tokenizer()
    return random_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=11), tokenizer


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    server = make_server(*model_and_tokenizer)
    yield server
    server.close()


def assert_nothing_held(server: Server):
    deadline = time.monotonic() + 10
    while server.loop.engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    engine = server.loop.engine
    assert engine.num_unfinished == 0
    engine.manager.check_invariants()
    engine.manager.check_no_leaks()


def test_completions_streamed_and_not_agree(server):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    plain = server.client.completions.create(**args)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    assert plain.usage.prompt_tokens == len(server.loop.engine.tokenizer.encode(args["prompt"]))
    stream = server.client.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert_nothing_held(server)


def test_chat_streamed_and_not_agree_and_stop_strings_cut(server):
    args = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, seed=3)
    plain = server.client.chat.completions.create(**args)
    content = plain.choices[0].message.content
    assert plain.choices[0].message.role == "assistant"
    chunks = list(server.client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    if len(content) > 4:  # a stop string from the answer cuts it there
        stop = content[2:4]
        cut = server.client.chat.completions.create(**args, stop=[stop])
        assert cut.choices[0].message.content == content[: content.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
    assert_nothing_held(server)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, "model='gpt-4' is unknown"),
        ({"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": MODEL, "prompt": "hi", "n": 0}, "n=0 must be in [1, 128]"),
        ({"model": MODEL, "prompt": "hi", "n": 2, "best_of": 3}, "best_of=3"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "prompt": ""}, "prompt must be"),
        ({"model": MODEL, "prompt": "word " * 400}, "max_seq_len"),
        ({"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs=21 must be in [0, 20]"),
        ({"model": MODEL, "prompt": "hi", "stop_token_ids": 5}, "stop_token_ids=5 must be"),
        ({"model": MODEL, "prompt": "hi", "ignore_eos": "false"}, "ignore_eos='false' must"),
        ({"model": MODEL, "prompt": "hi", "presence_penalty": 3}, "presence_penalty=3.0"),
        ({"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty=0.0"),
        ({"model": MODEL, "prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs=21 must"),
        ({"model": MODEL, "messages": CHAT, "top_logprobs": 2}, "top_logprobs needs logprobs"),
        ({"model": MODEL, "messages": CHAT, "logprobs": 3}, "logprobs=3 must be a boolean"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]: type='image_url' is not supported",
        ),
    ],
)
def test_bad_requests_are_answered_400_naming_the_field(server, body, message):
    path = "chat/completions" if "messages" in body else "completions"
    response = httpx.post(f"{server.url}/v1/{path}", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert_nothing_held(server)


def test_models_health_and_a_body_that_is_not_json(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]


def test_a_client_leaving_mid_stream_frees_its_request(server):
    engine = server.loop.engine
    finished_before = engine.metrics.totals.requests
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 120, "stream": True,
            "ignore_eos": True, "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        hold_the_engine(server).acquire()  # hold the engine still while the client goes
    try:
        time.sleep(0.3)  # the server sees the disconnect; its abort waits for the lock
    finally:
        hold_the_engine(server).release()
    assert_nothing_held(server)  # aborted, and every page back
    assert engine.metrics.totals.requests == finished_before  # it never ran to its end


def test_concurrent_streams_equal_their_plain_answers(server):
    prompts = [f"Story number {i}:" for i in range(64)]

    def plain(prompt):
        out = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                               temperature=0)  # fmt: skip
        return out.choices[0].text

    def streamed(prompt):
        stream = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                                  temperature=0, stream=True)  # fmt: skip
        return "".join(c.choices[0].text for c in stream)

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(plain, prompts))
        streams = list(pool.map(streamed, prompts))
    assert streams == answers
    assert_nothing_held(server)


def test_logprobs_streamed_and_not_in_both_apis(server):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=3,
                extra_body={"ignore_eos": True})  # fmt: skip
    plain = server.client.completions.create(**args).choices[0]
    logprobs = plain.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 8
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and chosen == max(top.values())  # greedy picks the best
    chunks = server.client.completions.create(**args, stream=True)
    streamed = [c.choices[0].logprobs for c in chunks]
    assert [lp for s in streamed for lp in s.token_logprobs] == logprobs.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == logprobs.text_offset
    # The chat API's layout, with each token's bytes.
    chat = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0.8, seed=1)
    answer = server.client.chat.completions.create(**chat, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    text = [e for e in content if e.token != "<|im_end|>"]  # the text leaves specials out
    assert bytes(b for e in text for b in e.bytes).decode() == answer.choices[0].message.content
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
    chunks = server.client.chat.completions.create(**chat, logprobs=True, top_logprobs=2,
                                                   stream=True)  # fmt: skip
    assert [e.logprob for c in chunks for e in c.choices[0].logprobs.content] == [
        e.logprob for e in content
    ]
    # The prompt's, vLLM's extension: the prompt computed again though it is cached now.
    body = {**{k: v for k, v in args.items() if k != "extra_body"}, "ignore_eos": True}
    scored = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt_logprobs": 2})
    scored = scored.json()
    prompt = scored["choices"][0]["prompt_logprobs"]
    assert scored["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert len(prompt) == scored["usage"]["prompt_tokens"] and prompt[0] is None
    assert all(len(entry) in (2, 3) for entry in prompt[1:])  # the token and 2 alternatives
    recomputed = scored["choices"][0]["logprobs"]["token_logprobs"]  # another batch shape:
    assert recomputed == pytest.approx(logprobs.token_logprobs, abs=1e-4)  # rounding differs
    plain_chat = server.client.chat.completions.create(**chat)
    assert plain_chat.choices[0].logprobs is None
    assert plain_chat.choices[0].message.content == answer.choices[0].message.content
    assert_nothing_held(server)


def test_chat_content_parts_are_joined_as_text(server):
    chat = dict(model=MODEL, max_tokens=6, temperature=0)
    parts = [{"type": "text", "text": "Café au lait,"}, {"type": "text", "text": "12 croissants"}]
    as_parts = server.client.chat.completions.create(
        **chat, messages=[{"role": "user", "content": parts}]
    )
    joined = server.client.chat.completions.create(
        **chat, messages=[{"role": "user", "content": "Café au lait,\n12 croissants"}]
    )
    assert as_parts.choices[0].message.content == joined.choices[0].message.content
    assert as_parts.usage.prompt_tokens == joined.usage.prompt_tokens


def test_parallel_samples_streamed_and_not_share_the_prompt(server):
    totals = server.loop.engine.metrics.totals
    args = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, seed=7, n=3)
    reused_before = totals.reused_tokens
    answer = server.client.chat.completions.create(**args)
    # Samples 2 and 3 reused the prompt the first computed (all of it but its partial block).
    prompt_tokens = answer.usage.prompt_tokens
    assert totals.reused_tokens - reused_before >= 2 * (prompt_tokens - 4)
    texts = [c.message.content for c in answer.choices]
    assert [c.index for c in answer.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert 3 <= answer.usage.completion_tokens <= 24
    streamed = ["", "", ""]
    chunks = server.client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    for c in chunks:
        if c.choices:
            streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == texts and c.usage.completion_tokens == answer.usage.completion_tokens
    # Sample i is the single request seeded seed + i.
    single = server.client.chat.completions.create(**{**args, "n": 1, "seed": 8})
    assert single.choices[0].message.content == texts[1]
    assert_nothing_held(server)


def test_penalties_change_a_greedy_answer(server):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0)
    plain = server.client.completions.create(**args, extra_body={"ignore_eos": True})
    penalized = server.client.completions.create(
        **args, frequency_penalty=2.0, presence_penalty=1.0,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.5},
    )  # fmt: skip
    assert penalized.choices[0].text != plain.choices[0].text
    assert_nothing_held(server)


def hold_the_engine(server):
    """The engine's step lock: while held, the loop thread cannot step."""
    return server.loop.engine._step_lock


def wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_overload_is_answered_429(model_and_tokenizer):
    server = make_server(*model_and_tokenizer, max_waiting=1)
    engine = server.loop.engine
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4}
    url = f"{server.url}/v1/completions"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with hold_the_engine(server):  # the first request waits in the engine
                first = pool.submit(httpx.post, url, json=body, timeout=60)
                wait_until(lambda: engine.num_unfinished == 1)
                second = httpx.post(url, json=body)
                assert second.status_code == 429, second.text
                assert "1 requests wait (max 1)" in second.json()["error"]["message"]
            assert first.result().status_code == 200
        assert httpx.post(url, json=body).status_code == 200
        assert_nothing_held(server)
    finally:
        server.close()


def test_a_client_leaving_before_its_answer_aborts_it(server):
    engine = server.loop.engine
    finished_before = engine.metrics.totals.requests
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 120, "ignore_eos": True}
    with hold_the_engine(server):  # queued, not started: the client gives up waiting
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.5)
        wait_until(lambda: engine.num_unfinished == 1)
        time.sleep(0.3)  # the watcher sees the disconnect; the abort waits for the lock
    assert_nothing_held(server)
    assert engine.metrics.totals.requests == finished_before  # aborted, never finished


def test_a_request_failing_in_a_step_is_a_500_and_the_server_goes_on(server, monkeypatch):
    resources = server.loop.engine.resources
    prepare = resources.prepare_context

    def fail_once(request, *args, **kwargs):
        monkeypatch.setattr(resources, "prepare_context", prepare)
        raise RuntimeError("injected")

    monkeypatch.setattr(resources, "prepare_context", fail_once)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4}
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == 500 and "injected" in response.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert_nothing_held(server)


def test_metrics_parse_as_prometheus_text(server):
    server.client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("kvjax_requests_running", "kvjax_requests_waiting", "kvjax_prefix_cache_hits",
                 "kvjax_kv_cache_usage_ratio", "kvjax_time_to_first_token_seconds",
                 "kvjax_e2e_request_latency_seconds", "kvjax_generation_tokens"):  # fmt: skip
        assert name in families, sorted(families)
    finished = families["kvjax_requests_finished"].samples[0].value
    assert finished >= 1
    e2e = families["kvjax_e2e_request_latency_seconds"]
    count = next(s.value for s in e2e.samples if s.name.endswith("_count"))
    assert count == finished  # every finished request, failed ones too (they have no TTFT)
    tiers = {s.labels["tier"] for s in families["kvjax_kv_cache_usage_ratio"].samples}
    assert tiers == {"device", "host"}
