"""Text in the engine: string and chat prompts serve exactly as their token ids, outputs carry the
detokenized text, and stop strings end a request at the token that completes them (serial,
overlapped and speculative loops alike); text without a tokenizer is refused at the door."""

import dataclasses

import pytest

from kvjax.serving.request import FinishReason, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from kvjax.text.tokenizer import Tokenizer
from tests.test_engine import assert_all_pages_free, make_engine
from tests.test_llama import random_model, tiny_config
from tests.test_text import CHATML, original_tokenizer

PROMPT = "Café au lait, 12 croissants and 日本語 🙂"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
LONG = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def chatml_tokenizer() -> Tokenizer:
    backend = original_tokenizer("qwen2")  # a trained byte-level BPE with ChatML's tokens
    return Tokenizer(
        backend, bos_token_id=None, eos_token_ids=[backend.token_to_id("<|im_end|>")],
        add_bos=False, chat_template=CHATML, source="trained",
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def model(compile_cache, tokenizer):
    return random_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=11)


def text_engine(model, tokenizer, **options):
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=64, chunk_unit=4)
    return make_engine(model, scheduler=scheduler, tokenizer=tokenizer, **options)


def test_string_and_chat_prompts_serve_as_their_token_ids(model, tokenizer):
    engine = text_engine(model, tokenizer)
    ids, chat_ids = tokenizer.encode(PROMPT), tokenizer.encode_chat(MESSAGES)
    assert tokenizer.decode(chat_ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    by_text = engine.generate([PROMPT, MESSAGES], LONG, use_tqdm=False)
    by_ids = engine.generate([ids, chat_ids], LONG, use_tqdm=False)
    for text_output, ids_output in zip(by_text, by_ids, strict=True):
        assert text_output.prompt_token_ids == ids_output.prompt_token_ids
        assert text_output.token_ids == ids_output.token_ids
        assert text_output.text == ids_output.text == tokenizer.decode(text_output.token_ids)
        assert text_output.finish_reason is FinishReason.LENGTH
    assert by_text[0].prompt_token_ids == tuple(ids)
    assert_all_pages_free(engine)


def stop_string_in(text: str) -> tuple[str, int]:
    """A 3-character piece of `text` first found at index >= 4, and that index."""
    for start in range(4, len(text) - 3):
        piece = text[start : start + 3]
        if "\ufffd" not in piece and text.find(piece) == start:
            return piece, start
    raise AssertionError(f"no stop string to pick in {text!r}")


@pytest.mark.parametrize("loop", ["overlapped", "serial", "speculative"])
def test_stop_strings_end_the_request_at_the_completing_token(model, tokenizer, loop):
    options = {
        "overlapped": {},
        "serial": {"overlap": False},
        "speculative": {"speculative": SpeculativeConfig(NgramDrafter(), 3)},
    }[loop]
    engine = text_engine(model, tokenizer, **options)
    (full,) = engine.generate([PROMPT], LONG, use_tqdm=False)
    stop, start = stop_string_in(full.text)
    params = dataclasses.replace(LONG, stop=("never seen", stop))
    stopped, other = engine.generate([PROMPT, MESSAGES], params, use_tqdm=False)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == full.text[:start]
    # The tokens run to the one that completed the stop string, and no further.
    tokens = stopped.token_ids
    assert tokens == full.token_ids[: len(tokens)]
    assert stop in tokenizer.decode(tokens) and stop not in tokenizer.decode(tokens[:-1])
    assert tokenizer.decode(other.token_ids).startswith(other.text)  # cut at a stop, if any
    assert_all_pages_free(engine)


def test_one_text_or_one_chat_is_one_prompt(model, tokenizer):
    engine = text_engine(model, tokenizer)
    (by_text,) = engine.generate(PROMPT, LONG, use_tqdm=False)
    (by_chat,) = engine.generate(MESSAGES, LONG, use_tqdm=False)
    assert by_text.prompt_token_ids == tuple(tokenizer.encode(PROMPT))
    assert by_chat.prompt_token_ids == tuple(tokenizer.encode_chat(MESSAGES))
    with pytest.raises(ValueError, match=r"is a special token.*stop_token_ids"):
        engine.add_request(PROMPT, SamplingParams(stop=("<|im_end|>",)))
    assert_all_pages_free(engine)


def test_text_needs_a_tokenizer_and_stop_strings_are_checked(model, tokenizer):
    engine = make_engine(model)
    for prompt in (PROMPT, MESSAGES):
        with pytest.raises(ValueError, match="needs an engine with a tokenizer"):
            engine.add_request(prompt)
    with pytest.raises(ValueError, match=r"stop=.*needs an engine with a tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(stop=("x",)))
    (output,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), use_tqdm=False)
    assert output.text is None
    assert_all_pages_free(engine)
    for stop, message in [("ab", "must be a sequence of strings"), (("",), "non-empty str"),
                          ((3,), "non-empty str")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            SamplingParams(stop=stop)
    engine = text_engine(model, tokenizer)
    bad = [{"role": "user"}]  # no content
    with pytest.raises(ValueError, match="content"):
        engine.generate([PROMPT, bad], LONG, use_tqdm=False)
    assert engine.num_unfinished == 0
    assert_all_pages_free(engine)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tokenizer):
    small = random_model(tiny_config(vocab_size=64))
    with pytest.raises(ValueError, match=r"vocab.*64|64.*vocab"):
        make_engine(small, tokenizer=tokenizer)


def test_text_requests_from_several_threads_while_one_steps(model, tokenizer):
    import threading

    engine = text_engine(model, tokenizer)
    prompts = [f"{PROMPT} #{index}" for index in range(8)]
    expected = engine.generate(prompts, LONG, use_tqdm=False)
    ids: dict[int, int] = {}

    def submit(indices):
        for index in indices:  # encoded in this thread, outside the queue's lock
            ids[index] = engine.add_request(prompts[index], LONG)

    threads = [threading.Thread(target=submit, args=(range(i, 8, 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    outputs = {}
    while len(outputs) < 8:  # this thread steps while the others submit
        for output in engine.step():
            outputs[output.request_id] = output
    for thread in threads:
        thread.join()
    for index, want in enumerate(expected):
        got = outputs[ids[index]]
        assert (got.token_ids, got.text) == (want.token_ids, want.text)
    assert_all_pages_free(engine)


@pytest.mark.parametrize("overlap", [True, False])
def test_streamed_progress_adds_up_to_the_final_output(model, tokenizer, overlap):
    engine = text_engine(model, tokenizer, overlap=overlap)
    (expected,) = engine.generate([PROMPT], LONG, use_tqdm=False)
    plain = engine.add_request(MESSAGES, LONG)  # not streamed: reported once, at its end
    parts = list(engine.stream(PROMPT, LONG))
    assert [p.finished for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len(parts) > LONG.max_new_tokens // 2  # about one report per step
    assert sum((p.new_token_ids for p in parts), ()) == parts[-1].token_ids == expected.token_ids
    assert "".join(p.new_text for p in parts) == parts[-1].text == expected.text
    assert all(p.text == "".join(q.new_text for q in parts[: i + 1]) for i, p in enumerate(parts))
    outputs = []
    while engine.num_unfinished:
        outputs += engine.step()
    outputs += engine.step()  # the plain request's output, put back by the stream
    assert [o.request_id for o in outputs if o.request_id == plain] == [plain]
    assert_all_pages_free(engine)


def test_closing_a_stream_early_aborts_its_request(model, tokenizer):
    engine = text_engine(model, tokenizer)
    stream = engine.stream(PROMPT, LONG)
    first = next(stream)
    assert not first.finished and first.new_token_ids
    stream.close()
    assert engine.num_unfinished == 0
    assert_all_pages_free(engine)
