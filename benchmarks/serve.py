"""Serving benchmark: the engine over a shared-prefix, multi-turn workload.

With no arguments: a tiny Llama with random weights (fixed seed) on this machine's default JAX
device, groups of requests sharing a 192-token system prompt, half of them followed by a second
turn. Prints throughput, TTFT and TPOT percentiles, the prefix hit rate next to the workload's
ideal, preemptions and compilations after warm-up; writes `serve.json` and `serve.png`
(throughput and cache occupancy over time) under `--out`.

    python -m benchmarks.serve [--model NAME|FILE|DIR] [--device-pages N] [--groups N] ...

With `--model smollm2` (or a GGUF file, or a Hugging Face directory with a tokenizer): the real
model serves the same shape of workload in text (`benchmarks.chat_workload`): users behind a few
long system prompts ask real questions, answers end at the model's end of turn, and a sample of
answers is printed and saved.

With `--speculative ngram|draft`: a repetitive workload (prompts repeating a short phrase) served
twice in the same run, without and with speculative decoding (prompt lookup, or a draft model
made of the target's first `--draft-layers` layers); prints the acceptance rate, tokens per step
and the speedup, checks that greedy outputs are identical, writes `serve_speculative.json`.

Several hosts: run the same command on every host with `--coordinator HOST:PORT
--num-processes N --process-id I` (and `--tensor-parallel` over all their devices); every
process serves the same workload in lockstep, process 0 writes the results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from benchmarks.chat_workload import FOLLOW_UPS, QUESTIONS, ChatWorkload
from benchmarks.kv_capacity import KV_DTYPE_NAMES, fixed_quota_bytes, kv_capacity, report_capacity
from benchmarks.workload import RepetitiveWorkload, Workload, ideal_hit_rate
from kvjax.engine.draft_model import DraftModelDrafter
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.runtime.sharding import tensor_parallel_mesh
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig, SchedulerPolicy
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from models.config import LlamaConfig
from models.llama import Llama, truncated_draft

TINY = LlamaConfig(
    vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=32,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="a local Hugging Face Llama/Qwen2 directory")
    p.add_argument(
        "--model", help="a model with a tokenizer: smollm2, a .gguf file or a Hugging Face dir"
    )
    p.add_argument("--device-pages", type=int, default=160)
    p.add_argument(
        "--kv-dtype", choices=["model", *KV_DTYPE_NAMES], default="model",
        help="KV page dtype (fp8: e4m3 pages with per-row scales); other than 'model', the "
        "device quota is bytes (--device-mib, or --device-pages bf16 pages) and the report "
        "compares the requests that fit with bf16",
    )  # fmt: skip
    p.add_argument("--device-mib", type=float, default=None, help="device quota in MiB")
    p.add_argument("--host-pages", type=int, default=None, help="default: provisioned")
    p.add_argument("--tokens-per-block", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the workload's")
    p.add_argument(
        "--tensor-parallel", type=int, default=None,
        help="shard over N devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-num-tokens", type=int, default=256)
    p.add_argument("--chunk-unit", type=int, default=16)
    policies = [policy.value for policy in SchedulerPolicy]
    p.add_argument("--policy", choices=policies, default="max_utilization")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--system-len", type=int, default=192)
    p.add_argument("--user-len", type=int, nargs=2, default=(16, 64))
    p.add_argument("--follow-up-fraction", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-commit-generated", action="store_true", help="reuse prompts only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--no-progress", action="store_true")
    hosts = p.add_argument_group("several hosts (jax.distributed, one process per host)")
    hosts.add_argument("--coordinator", help="HOST:PORT of process 0")
    hosts.add_argument("--num-processes", type=int, default=1)
    hosts.add_argument("--process-id", type=int, default=0)
    hosts.add_argument(
        "--check-agreement", action="store_true", help="check every step's batch across processes"
    )
    spec = p.add_argument_group("speculative decoding (compared with plain decoding)")
    spec.add_argument("--speculative", choices=["none", "ngram", "draft"], default="none")
    spec.add_argument("--draft-tokens", type=int, default=4)
    spec.add_argument("--draft-layers", type=int, default=1, help="layers of the draft model")
    spec.add_argument("--draft-checkpoint", type=Path, help="a smaller model of the family")
    spec.add_argument("--ngram", type=int, nargs=2, default=(1, 3), help="min and max n")
    spec.add_argument("--requests", type=int, default=16, help="prompts of the workload")
    spec.add_argument("--phrase-len", type=int, default=12)
    spec.add_argument("--repeats", type=int, default=6)
    return p.parse_args(argv)


def load_model(args, checkpoint: Path | None = None):
    """The checkpoint's model (its weights placed straight onto `args.mesh`), or a tiny one;
    with `--model`, also sets `args.tokenizer`."""
    args.tokenizer = None
    if args.model is not None and checkpoint is None:
        from kvjax.engine.checkpoints import load_model as load_named_model

        dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        start = time.perf_counter()
        model, args.tokenizer = load_named_model(args.model, dtype=dtype, mesh=args.mesh)
        args.load_s = time.perf_counter() - start
        print(f"loaded {args.model} in {args.load_s:.1f} s", flush=True)
        return model
    checkpoint = checkpoint or args.checkpoint
    if checkpoint is not None:
        from models.loader import load_hf_checkpoint

        dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        return load_hf_checkpoint(checkpoint, dtype=dtype, mesh=args.mesh)
    return Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))


def serve(engine: Engine, workload: Workload, params: SamplingParams, progress: bool):
    """Submits the first turns, and each follow-up when its first turn finishes (after the
    answer's tokens, less an end-of-turn token the follow-up's own text brings back)."""
    turns = workload.first_turns()
    pending = {engine.add_request(t.prompt, params): t for t in turns}
    prompts = {rid: t.prompt for rid, t in pending.items()}
    order = list(pending)
    total = len(turns) + sum(t.follow_up is not None for t in turns)
    outputs = {}
    with tqdm(total=total, disable=not progress, desc="serve", unit="req") as bar:
        while engine.num_unfinished:
            for output in engine.step():
                outputs[output.request_id] = output
                bar.update(1)
                turn = pending.pop(output.request_id, None)
                if turn is not None and turn.follow_up is not None:
                    answer = list(output.token_ids)
                    if answer and answer[-1] in engine.eos_token_ids:
                        answer.pop()
                    prompt = [*turn.prompt, *answer, *turn.follow_up]
                    rid = engine.add_request(prompt, params)
                    prompts[rid] = prompt
                    order.append(rid)
    return order, prompts, outputs


def plot(steps, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = steps[0].start
    times = np.array([s.end - t0 for s in steps])
    tokens = np.array([s.num_tokens for s in steps], float)
    # Throughput over a sliding window of steps: tokens computed / wall time.
    window = max(1, len(steps) // 50)
    starts = np.array([s.start - t0 for s in steps])
    sums = np.convolve(tokens, np.ones(window), "valid")
    spans = times[window - 1 :] - starts[: len(times) - window + 1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(times[window - 1 :], sums / spans)
    top.set_ylabel("tokens computed / s")
    top.set_title(title)
    bottom.stackplot(
        times,
        [s.device_in_use * 100 for s in steps],
        [s.device_evictable * 100 for s in steps],
        labels=["device: held by requests", "device: evictable (cache, suspended)"],
    )
    bottom.plot(times, [s.host_in_use * 100 for s in steps], "k--", label="host: held")
    bottom.set_ylabel("% of pages")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(0, 100)
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_engine(model, args, **options) -> tuple[Engine, float]:
    """An engine for `args`' sizes; returns it and its warm-up seconds."""
    scheduler = SchedulerConfig(
        max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
        chunk_unit=args.chunk_unit, policy=SchedulerPolicy(args.policy),
    )  # fmt: skip
    start = time.perf_counter()
    config = cache_config(model, args)
    engine = Engine(
        model, config, scheduler, max_seq_len=args.max_seq_len,
        tensor_parallel=args.mesh, check_agreement=args.check_agreement, **options,
    )  # fmt: skip
    return engine, time.perf_counter() - start


def cache_config(model, args):
    quotas = {"device_pages": args.device_pages}
    dtype = KV_DTYPE_NAMES.get(args.kv_dtype)
    if dtype is not None or args.device_mib is not None:  # a byte quota, the same for any dtype
        quotas = {"device_bytes": kv_quota(model, args)}
    if args.host_pages is not None:
        quotas["host_pages"] = args.host_pages
    return cache_config_for(model, tokens_per_block=args.tokens_per_block, dtype=dtype, **quotas)


def kv_quota(model, args) -> int:
    return fixed_quota_bytes(model, args.tokens_per_block, args.device_pages, args.device_mib)


def join_processes(args) -> None:
    """`jax.distributed.initialize` when `--coordinator` is given, then `args.mesh` (None without
    `--tensor-parallel`); progress on process 0 only."""
    if args.coordinator is not None:
        if args.tensor_parallel is None:
            raise SystemExit(
                "--coordinator serves one model over several processes: give --tensor-parallel "
                "(every process's devices)"
            )
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    args.mesh = args.tensor_parallel and tensor_parallel_mesh(args.tensor_parallel)
    args.no_progress = args.no_progress or jax.process_index() > 0


def main(argv=None) -> dict:
    args = parse_args(argv)
    join_processes(args)
    model = load_model(args)
    if args.speculative != "none":
        return main_speculative(args, model)
    commit_generated = not args.no_commit_generated
    if args.tokenizer is not None:
        workload = ChatWorkload(
            args.tokenizer, args.groups, args.per_group, args.follow_up_fraction, args.seed
        )
    else:
        workload = Workload(
            model.config.vocab_size, args.groups, args.per_group, args.system_len,
            tuple(args.user_len), args.follow_up_fraction, args.seed,
        )  # fmt: skip
    # Page tables as wide as the workload's longest sequence, not the whole device.
    args.max_seq_len = args.max_seq_len or workload.max_seq_len(args.new_tokens)
    engine, warmup_s = build_engine(
        model, args, commit_generated=commit_generated, tokenizer=args.tokenizer
    )
    print(
        f"warm-up: {engine.registry.stats.compiled} step shapes compiled in {warmup_s:.1f} s "
        f"on {jax.devices()[0].device_kind}",
        flush=True,
    )
    # A real model's answers end at its end of turn; random weights run to the length.
    params = SamplingParams(
        max_new_tokens=args.new_tokens, temperature=args.temperature,
        ignore_eos=args.tokenizer is None,
    )  # fmt: skip
    order, prompts, outputs = serve(engine, workload, params, not args.no_progress)
    summary = engine.metrics.summary()
    answers = sample_answers(args.tokenizer, order, prompts, outputs)
    # The last generated token is never fed back, so its KV is never written or committed.
    served = [
        prompts[rid] + (list(outputs[rid].token_ids[:-1]) if commit_generated else [])
        for rid in order
    ]
    summary["ideal_prefix_hit_rate"] = ideal_hit_rate([prompts[rid] for rid in order], served)
    summary["compilations_after_warmup"] = engine.compiles.after_warmup
    summary["warmup_s"] = warmup_s
    summary["load_s"] = getattr(args, "load_s", None)
    summary["step_shapes"] = engine.registry.stats.compiled
    summary["devices"] = args.tensor_parallel or 1
    summary["processes"] = jax.process_count()
    summary["output_tokens_per_s_per_device"] = summary["output_tokens_per_s"] / summary["devices"]
    if args.kv_dtype != "model":
        summary["kv_capacity"] = kv_capacity(
            model, args.tokens_per_block, KV_DTYPE_NAMES[args.kv_dtype], kv_quota(model, args),
            served,
        )  # fmt: skip
    steps = engine.metrics.steps
    engine.shutdown()
    report(summary)
    for answer in answers[:4]:
        print(f"Q: {answer['question']}\nA: {answer['answer']}")
    result = {
        "device": jax.devices()[0].device_kind,
        "args": args_json(args),
        "summary": summary,
        "answers": answers,
        "steps": [
            {"t": s.end - steps[0].start, "tokens": s.num_tokens, "seqs": s.num_seqs,
             "device_in_use": s.device_in_use, "device_evictable": s.device_evictable,
             "host_in_use": s.host_in_use}
            for s in steps
        ],
    }  # fmt: skip
    if writes_results(args):
        (args.out / "serve.json").write_text(json.dumps(result, indent=2))
        title = f"{summary['requests']} requests, {summary['output_tokens_per_s']:.0f} output tok/s"
        plot(steps, args.out / "serve.png", title)
        print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.png'}")
    return result


def sample_answers(tokenizer, order, prompts, outputs) -> list[dict]:
    """Each request's last question (the workload's message latest in its prompt) and the
    answer it got (a real model's), in order."""
    if tokenizer is None:
        return []
    answers = []
    for rid in order:
        prompt = tokenizer.decode(prompts[rid])
        question = max(QUESTIONS + FOLLOW_UPS, key=prompt.rfind)
        answers.append({"question": question, "answer": outputs[rid].text})
    return answers


def writes_results(args) -> bool:
    """Process 0 writes the results (creating `--out`); the others only print."""
    if jax.process_index() > 0:
        return False
    args.out.mkdir(parents=True, exist_ok=True)
    return True


def args_json(args) -> dict:
    skip = {"mesh", "tokenizer"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip}


def main_speculative(args, model) -> dict:
    """The repetitive workload without, then with, speculative decoding, in this process."""
    workload = RepetitiveWorkload(
        model.config.vocab_size, args.requests, args.phrase_len, args.repeats, seed=args.seed
    )
    params = SamplingParams(
        max_new_tokens=args.new_tokens, temperature=args.temperature, ignore_eos=True
    )
    runs = {}
    for mode in ("plain", args.speculative):
        speculative = None
        if mode == "ngram":
            drafter = NgramDrafter(min_ngram=args.ngram[0], max_ngram=args.ngram[1])
            speculative = SpeculativeConfig(drafter, args.draft_tokens)
        elif mode == "draft":
            draft = truncated_draft(model, args.draft_layers)
            if args.draft_checkpoint is not None:
                draft = load_model(args, args.draft_checkpoint)
            drafter = DraftModelDrafter(draft, cache_config(draft, args), mesh=args.mesh)
            speculative = SpeculativeConfig(drafter, args.draft_tokens)
        engine, warmup_s = build_engine(model, args, speculative=speculative)
        print(f"{mode}: warm-up {warmup_s:.1f} s", flush=True)
        order, _, outputs = serve(engine, workload, params, not args.no_progress)
        summary = engine.metrics.summary()
        summary["compilations_after_warmup"] = engine.compiles.after_warmup
        summary["warmup_s"] = warmup_s
        engine.shutdown()
        runs[mode] = (summary, [outputs[rid].token_ids for rid in order])
    (plain, plain_tokens), (spec, spec_tokens) = runs["plain"], runs[args.speculative]
    comparison = {
        "drafter": args.speculative,
        "draft_tokens": args.draft_tokens,
        "acceptance_rate": spec["acceptance_rate"],
        "tokens_per_step": spec["tokens_per_step"],
        "speedup": spec["output_tokens_per_s"] / plain["output_tokens_per_s"],
        "step_ratio": spec["steps"] / plain["steps"],
        "identical_outputs": plain_tokens == spec_tokens,
    }
    print(
        f"plain               {plain['output_tokens_per_s']:.1f} output tok/s "
        f"({plain['steps']} steps), TPOT p50 {plain['tpot_s']['p50'] * 1e3:.1f} ms"
    )
    print(
        f"{args.speculative:<19} {spec['output_tokens_per_s']:.1f} output tok/s "
        f"({spec['steps']} steps), TPOT p50 {spec['tpot_s']['p50'] * 1e3:.1f} ms"
    )
    print(f"acceptance rate     {spec['acceptance_rate']:.1%} of {spec['draft_tokens']} drafts")
    print(f"tokens per step     {spec['tokens_per_step']:.2f} per generating request")
    print(
        f"speedup             {comparison['speedup']:.2f}x output tok/s, "
        f"{comparison['step_ratio']:.2f}x the steps"
    )
    print(f"identical outputs   {comparison['identical_outputs']}")  # fmt: skip
    result = {
        "device": jax.devices()[0].device_kind,
        "args": args_json(args),
        "comparison": comparison,
        "plain": plain,
        "speculative": spec,
    }
    if writes_results(args):
        path = args.out / "serve_speculative.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return result


def report(s: dict) -> None:
    def ms(p):
        return "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in p.items() if v is not None)

    print(f"requests            {s['requests']} in {s['elapsed_s']:.2f} s ({s['steps']} steps)")
    print(f"throughput          {s['output_tokens_per_s']:.1f} output tok/s, "
          f"{s['total_tokens_per_s']:.1f} total tok/s")  # fmt: skip
    print(f"TTFT                {ms(s['ttft_s'])}")
    print(f"TPOT                {ms(s['tpot_s'])}")
    hit, ideal = s["prefix_hit_rate"], s["ideal_prefix_hit_rate"]
    print(f"prefix hit rate     {hit:.1%} (ideal {ideal:.1%})")
    print(f"preemptions         {s['preemptions']} ({s['recomputations']} by recomputation)")
    print(f"padding waste       {s['padding_waste']:.1%} of token rows")
    print(f"compilations after warm-up: {s['compilations_after_warmup']}")
    if "kv_capacity" in s:
        report_capacity(s["kv_capacity"])
    if s["devices"] > 1:
        processes = f"{s['processes']} process" + ("es" if s["processes"] > 1 else "")
        print(f"tensor parallel     {s['devices']} devices in {processes}, "
              f"{s['output_tokens_per_s_per_device']:.1f} output tok/s per device")  # fmt: skip


if __name__ == "__main__":
    main()
