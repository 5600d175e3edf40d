"""What the engine checks before it builds anything: the token budget, the drafter against the
buckets, the vocabulary and the mesh, and the configuration across processes."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from kvjax.cache.config import CacheConfig
from kvjax.runtime.buckets import Buckets, default_buckets
from kvjax.runtime.sharding import check_heads, check_same_on_every_process
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import SpeculativeConfig, check_speculative

__all__ = [
    "check_batch_agrees",
    "check_drafter",
    "check_processes_agree",
    "plan",
    "token_budget",
]


def plan(
    model,
    config: SchedulerConfig,
    buckets: Buckets | None,
    eos_token_ids,
    speculative: SpeculativeConfig | None,
    mesh,
    lockstep: bool,
) -> tuple[frozenset[int], tuple[int, ...], Buckets]:
    """Checks the model and the drafter against the engine's options; returns the stop tokens
    (default the model config's `eos_token_ids`), the draft lengths and the buckets (default
    from the scheduler's budgets)."""
    if mesh is not None:
        check_heads(model.config.num_heads, model.config.num_kv_heads, mesh)
    if eos_token_ids is None:
        eos_token_ids = getattr(model.config, "eos_token_ids", ())
    draft_lengths = check_speculative(speculative, config)
    budget = token_budget(config)
    buckets = buckets or default_buckets(config.max_batch_size, budget, draft_lengths)
    vocab_size = model.config.vocab_size
    check_drafter(speculative, draft_lengths, buckets, vocab_size, mesh, lockstep)
    return frozenset(int(t) for t in eos_token_ids), draft_lengths, buckets


def token_budget(config: SchedulerConfig) -> int:
    """The scheduler's tokens per step, which sizes the buckets; the engine needs one."""
    if config.max_num_tokens is None:
        raise ValueError("the engine needs SchedulerConfig.max_num_tokens to size its buckets")
    return config.max_num_tokens


def check_drafter(
    speculative: SpeculativeConfig | None,
    draft_lengths: tuple[int, ...],
    buckets: Buckets,
    vocab_size: int,
    mesh,
    lockstep: bool,
) -> None:
    """Raises unless every draft length is compiled, a draft model shares the target's
    vocabulary, and, across processes, is sharded on the engine's mesh."""
    missing = sorted(set(draft_lengths) - set(buckets.draft_lengths))
    if missing:
        raise ValueError(
            f"draft lengths {missing} of the speculative config are not in "
            f"buckets.draft_lengths={buckets.draft_lengths}"
        )
    drafter = speculative and speculative.drafter
    draft_vocab = getattr(drafter, "vocab_size", None)
    if draft_vocab is not None and draft_vocab != vocab_size:
        raise ValueError(
            f"the draft model's vocab_size={draft_vocab} differs from the target's {vocab_size}"
        )
    if lockstep and getattr(drafter, "mesh", mesh) != mesh:
        raise ValueError(
            "across several processes the draft model must be sharded on the engine's mesh: "
            "build it with DraftModelDrafter(..., mesh=engine mesh)"
        )


def _quotas(config: CacheConfig) -> dict:
    """What of a `CacheConfig` every process must share (the disk tier's directory may differ)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields["disk_dir"] = config.disk_dir is not None
    return fields


def check_processes_agree(mesh, model_config, cache_config: CacheConfig, *options) -> None:
    """Raises on every process unless all built the engine alike (a collective: call it before
    any other, so that a mismatch fails here, clearly)."""
    devices = [(d.id, d.process_index) for d in mesh.devices.flat]
    check_same_on_every_process(
        "the engine's configuration", model_config, _quotas(cache_config), *options, devices,
        mesh.axis_names,
    )  # fmt: skip


def check_batch_agrees(step_index: int, batch, sampling, manager) -> None:
    """Raises on every process unless all scheduled the same batch (a `StepBatch` and its
    `SamplingInputs`) and moved the same pages (a collective, once per step)."""
    # After scheduling, the page moves have run: their digest stands in for them.
    arrays = [*dataclasses.astuple(batch.inputs), *sampling.arrays()]
    ids = [request.request_id for request in batch.requests]
    check_same_on_every_process(
        f"the batch of step {step_index}",
        *map(np.asarray, arrays), batch.draft_tokens, ids, manager.moves_digest,
    )  # fmt: skip


def check_tokenizer(model, tokenizer, eos_token_ids: Sequence[int] | None):
    """Checks the tokenizer's ids fit the model's vocabulary; returns the EOS tokens to use:
    those given, else (None: the model's) the model's and the tokenizer's together."""
    if tokenizer is None:
        return eos_token_ids
    tokenizer.check_vocab(model.config.vocab_size)
    if eos_token_ids is not None:
        return eos_token_ids
    return sorted({*model.config.eos_token_ids, *tokenizer.eos_token_ids})


SAMPLER_VARIANTS = ("logprobs", "penalties", "prompt_logprobs")


def check_sampler_variants(variants: Sequence[str]) -> tuple[str, ...]:
    """The sampler variants to compile ahead, checked against `SAMPLER_VARIANTS`."""
    if isinstance(variants, str) or any(v not in SAMPLER_VARIANTS for v in variants):
        raise ValueError(f"sampler_variants={variants!r} must name some of {SAMPLER_VARIANTS}")
    return tuple(sorted(set(variants)))
