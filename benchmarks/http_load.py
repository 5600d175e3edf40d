"""Load generator: the shared-prefix workload through the OpenAI-compatible server, and the same
workload through the engine directly; the difference is the server's overhead per request.

    python -m benchmarks.http_load [--requests 96] [--rate 64] [--max-concurrency 32] ...

By default it writes a tiny random Llama (the serving benchmark's) and a byte-level tokenizer to
a temporary directory (`--model smollm2`, a GGUF file or a directory: that model instead),
starts `python -m kvjax.serve` on it in a process of its own, and sends
streamed completion requests from an async HTTP client (httpx): Poisson arrivals at `--rate`
requests/s, at most `--max-concurrency` in flight, each prompt a group's system prompt and a
user message as token ids, `--max-tokens` generated (EOS ignored, so both paths generate the
same tokens). Then this process builds the same engine and serves the same requests at the same
arrival times (streamed, from a submitting thread while it steps). Both paths first serve a
warm-up round of `--max-concurrency` requests of the same shapes but other tokens (so nothing
of the measured prompts is cached), 4 tokens each. TTFT is measured from the
request's arrival to its first token as its consumer sees it (the first SSE chunk; the first
step output); TPOT from the first to the last token. `--url` measures a running server instead
(no engine comparison). Writes `http_load.json` under `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.workload import Workload
from kvjax.serving.metrics import percentiles

__all__ = ["main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one on the tiny model)")
    p.add_argument("--model", help="smollm2, a .gguf file or a directory (default: tiny)")
    p.add_argument("--vocab-size", type=int, help="with --url: prompt ids below this")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--rate", type=float, default=64.0, help="Poisson arrivals per second")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--system-len", type=int, default=192)
    p.add_argument("--user-len", type=int, nargs=2, default=(16, 64))
    p.add_argument("--device-mib", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-num-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results"))
    return p.parse_args(argv)


def requests_of(args, vocab_size: int) -> tuple[list[list[int]], list[float]]:
    """The prompts (first turns of the shared-prefix workload) and their arrival offsets."""
    per_group = -(-args.requests // args.groups)
    workload = Workload(
        vocab_size, args.groups, per_group, args.system_len, tuple(args.user_len), 0.0, args.seed
    )
    prompts = [turn.prompt for turn in workload.first_turns()][: args.requests]
    gaps = np.random.default_rng(args.seed).exponential(1.0 / args.rate, len(prompts))
    return prompts, np.cumsum(gaps).tolist()


def warm_up_prompts(args, vocab_size: int) -> list[list[int]]:
    """`--max-concurrency` prompts shaped as the workload's, of other random tokens."""
    other = argparse.Namespace(**{**vars(args), "seed": args.seed + 1})
    return requests_of(other, vocab_size)[0][: args.max_concurrency]


def summarize(records: list[dict], elapsed: float) -> dict:
    """Throughput and percentiles of per-request records (`ttft`, `tpot`, `tokens`)."""
    tokens = sum(r["tokens"] for r in records)
    tpots = [r["tpot"] for r in records if r["tpot"] is not None]
    return {
        "requests": len(records),
        "output_tokens": tokens,
        "seconds": elapsed,
        "requests_per_s": len(records) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "ttft_s": percentiles([r["ttft"] for r in records]),
        "tpot_s": percentiles(tpots),
        "tpot_mean_s": float(np.mean(tpots)),
    }


# -- through the server -------------------------------------------------------------------------


async def _one_request(client, url, prompt, max_tokens, arrival, start, slots) -> dict:
    await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
    async with slots:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
        first = last = None
        tokens = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"]:
                    last = time.perf_counter()
                    first = first or last
    # TTFT from the arrival (queueing behind the concurrency limit counts, as in the engine run)
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return {"ttft": first - (start + arrival), "tpot": tpot, "tokens": tokens}


async def _through_server(url, prompts, arrivals, args, vocab_size: int) -> dict:
    slots = asyncio.Semaphore(args.max_concurrency)
    limits = httpx.Limits(max_connections=args.max_concurrency + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        warm = time.perf_counter()
        await asyncio.gather(*(
            _one_request(client, url, p, 4, 0.0, warm, slots)
            for p in warm_up_prompts(args, vocab_size)
        ))  # fmt: skip
        start = time.perf_counter()
        records = await asyncio.gather(*(
            _one_request(client, url, p, args.max_tokens, a, start, slots)
            for p, a in zip(prompts, arrivals, strict=True)
        ))  # fmt: skip
        return summarize(list(records), time.perf_counter() - start)


_FIRST_MEASURED_ID = 1 << 20  # past the warm-up's ids

# -- through the engine -------------------------------------------------------------------------


def _through_engine(engine, prompts, arrivals, args) -> dict:
    """The same requests at the same times: a thread submits (waiting for a free slot), this
    thread steps and stamps each request's first and last token when `step()` returns them."""
    from kvjax.serving.request import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate(warm_up_prompts(args, engine.vocab_size), warm, use_tqdm=False)
    slots = threading.Semaphore(args.max_concurrency)
    arrival_of: dict[int, float] = {}
    start = time.perf_counter()

    def submit():  # ids chosen here, so each arrival is known before its request exists
        for index, (prompt, arrival) in enumerate(zip(prompts, arrivals, strict=True)):
            time.sleep(max(0.0, start + arrival - time.perf_counter()))
            slots.acquire()
            request_id = _FIRST_MEASURED_ID + index
            arrival_of[request_id] = start + arrival
            engine.add_request(prompt, params, stream=True, request_id=request_id)

    submitter = threading.Thread(target=submit)
    submitter.start()
    first: dict[int, float] = {}
    records = []
    while len(records) < len(prompts):
        if not engine.num_unfinished:
            time.sleep(0.0005)
            continue
        for output in engine.step():
            now = time.perf_counter()
            first.setdefault(output.request_id, now)
            if output.finished:
                slots.release()
                tokens = len(output.token_ids)
                began = first[output.request_id]
                tpot = (now - began) / (tokens - 1) if tokens > 1 else None
                ttft = began - arrival_of[output.request_id]
                records.append({"ttft": ttft, "tpot": tpot, "tokens": tokens})
    submitter.join()
    return summarize(records, time.perf_counter() - start)


# -- the tiny model, as a directory the server loads ---------------------------------------------


def write_tiny_checkpoint(path: Path, seed: int) -> None:
    """The serving benchmark's tiny Llama and a byte-level tokenizer covering its vocabulary
    (256 byte tokens, then placeholder tokens)."""
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from benchmarks.serve import TINY
    from models.llama import Llama
    from models.loader import save_hf_checkpoint

    save_hf_checkpoint(Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(seed)), path)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(alphabet), TINY.vocab_size - 1)])
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "add_bos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def start_server(model_name: str, args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "kvjax.serve", "--port", str(port)]
    command += _serve_flags(model_name, args)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server on {model_name} did not come up")


def engine_for(model_name: str, args):
    """The engine `kvjax.serve` builds for these flags (its tokenizer too: detokenizing is
    engine work on both paths), in this process."""
    from kvjax.serve import build_engine, parse_args

    return build_engine(parse_args(_serve_flags(model_name, args)))


def _serve_flags(model_name: str, args) -> list[str]:
    """`python -m kvjax.serve`'s flags for this benchmark's sizes."""
    return [
        "--model", model_name, "--device-mib", str(args.device_mib),
        "--max-batch-size", str(args.max_batch_size), "--max-num-tokens", str(args.max_num_tokens),
    ]  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.url:
        from benchmarks.serve import TINY

        vocab_size = args.vocab_size or TINY.vocab_size
        prompts, arrivals = requests_of(args, vocab_size)
        result["server"] = asyncio.run(
            _through_server(args.url, prompts, arrivals, args, vocab_size)
        )
    else:
        with tempfile.TemporaryDirectory() as directory:
            model_name = args.model
            if model_name is None:
                write_tiny_checkpoint(Path(directory), args.seed)
                model_name = directory
            engine = engine_for(model_name, args)  # first: it also checks the flags
            prompts, arrivals = requests_of(args, engine.vocab_size)
            try:
                result["engine"] = _through_engine(engine, prompts, arrivals, args)
            finally:
                engine.shutdown()
            server, url = start_server(model_name, args)
            try:
                result["server"] = asyncio.run(
                    _through_server(url, prompts, arrivals, args, engine.vocab_size)
                )
            finally:
                server.terminate()
                server.wait(timeout=60)
        served, direct = result["server"], result["engine"]
        result["tpot_overhead"] = {
            "p50": served["tpot_s"]["p50"] / direct["tpot_s"]["p50"] - 1,
            "mean": served["tpot_mean_s"] / direct["tpot_mean_s"] - 1,
        }
    report(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_load.json").write_text(json.dumps(result, indent=2))
    return result


def report(result: dict) -> None:
    for name in ("server", "engine"):
        if name not in result:
            continue
        s = result[name]
        ms = lambda d: " ".join(f"{k} {v * 1e3:.1f}" for k, v in d.items())  # noqa: E731
        print(
            f"{name:>6}: {s['requests_per_s']:.1f} req/s, {s['output_tokens_per_s']:.0f} "
            f"output tok/s | TTFT ms {ms(s['ttft_s'])} | TPOT ms {ms(s['tpot_s'])}"
        )
    if "tpot_overhead" in result:
        o = result["tpot_overhead"]
        print(f"server overhead on TPOT: p50 {o['p50']:+.1%}, mean {o['mean']:+.1%}")


if __name__ == "__main__":
    main()
