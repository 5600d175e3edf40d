"""Presence, frequency and repetition penalties on the device, as vLLM defines them.

For each row, with `count[t]` the times token t was generated so far (the speculative drafts
ahead of a verified position included) and `seen[t]` whether t is in the prompt or the output:

- repetition (> 0, 1 is none): a seen token's logit is divided by it when positive, multiplied
  by it otherwise (so > 1 discourages repeats);
- frequency (in [-2, 2]): `count[t] * frequency` is subtracted from the logit;
- presence (in [-2, 2]): `presence` is subtracted from the logit of every generated token.

Penalties apply before temperature and truncation, to greedy rows as well. The host sends each
penalized row's token history, padded to the longest sequence the engine serves (one shape per
batch size, compiled ahead); the counts are scattered on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Penalties", "history_penalties", "no_penalties", "penalized"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Penalties:
    """Per-row penalties and the tokens they count (host arrays, then device arrays)."""

    presence: Any  # f32[rows]
    frequency: Any  # f32[rows]
    repetition: Any  # f32[rows]; 1 is none
    history: Any  # int32[rows, H]: prompt then output token ids, -1 padding
    num_prompt: Any  # int32[rows]: the leading history entries that are the prompt's


def history_penalties(
    params: Sequence,
    histories: Sequence[tuple[Sequence[int], Sequence[int]]],
    rows: int,
    width: int,
) -> Penalties:
    """`Penalties` of the first `len(params)` rows (`SamplingParams`), the rest padding.

    Args:
        histories: each row's (prompt ids, output ids); unpenalized rows' are not sent.
        width: history entries per row (the engine's `max_seq_len`).
    """
    if histories is None or len(histories) != len(params):
        raise ValueError("penalized rows need each row's (prompt, outputs) history")
    penalized_rows = [row for row, p in enumerate(params) if p.penalized]
    longest = max(len(histories[row][0]) + len(histories[row][1]) for row in penalized_rows)
    if longest > width:
        raise ValueError(f"a history of {longest} tokens exceeds width={width}")
    history = np.full((rows, width), -1, np.int32)
    num_prompt = np.zeros(rows, np.int32)
    presence, frequency = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    repetition = np.ones(rows, np.float32)
    for row in penalized_rows:
        prompt, outputs = histories[row]
        history[row, : len(prompt)] = prompt
        history[row, len(prompt) : len(prompt) + len(outputs)] = outputs
        num_prompt[row] = len(prompt)
        p = params[row]
        presence[row], frequency[row] = p.presence_penalty, p.frequency_penalty
        repetition[row] = p.repetition_penalty
    return Penalties(presence, frequency, repetition, history, num_prompt)


def no_penalties(rows: int, width: int) -> Penalties:
    """Padding `Penalties` of these shapes (for compiling ahead)."""
    zeros = np.zeros(rows, np.float32)
    history = np.full((rows, width), -1, np.int32)
    return Penalties(zeros, zeros, zeros + 1, history, np.zeros(rows, np.int32))


def penalized(
    logits: jax.Array, penalties: Penalties, draft_tokens: jax.Array, num_drafts: jax.Array
) -> jax.Array:
    """f32[rows * (1 + W), vocab] logits with each row's penalties applied at each position.

    Args:
        logits: row `r * (1 + W) + j` scores row r's token after j drafts.
        draft_tokens: int32[rows, W]; num_drafts: int32[rows] (those past it are padding).
    """
    rows, num_slots = draft_tokens.shape
    vocab = logits.shape[-1]
    history = penalties.history
    valid = history >= 0
    is_output = valid & (jnp.arange(history.shape[1])[None, :] >= penalties.num_prompt[:, None])
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], history.shape)
    tokens = jnp.where(valid, history, 0)
    counts = jnp.zeros((rows, vocab), jnp.float32).at[row_ids, tokens].add(is_output)
    seen = jnp.zeros((rows, vocab), jnp.bool_).at[row_ids, tokens].max(valid)
    # The drafts before position j are outputs there, if accepted.
    is_draft = jnp.arange(num_slots)[None, :] < num_drafts[:, None]
    drafted = jax.nn.one_hot(draft_tokens, vocab, dtype=jnp.float32) * is_draft[..., None]
    ahead = jnp.concatenate([jnp.zeros((rows, 1, vocab)), jnp.cumsum(drafted, axis=1)], axis=1)
    counts = counts[:, None, :] + ahead  # [rows, 1 + W, vocab]
    seen = seen[:, None, :] | (ahead > 0)
    per_row = lambda a: a[:, None, None]  # noqa: E731
    scores = logits.reshape(rows, num_slots + 1, vocab)
    repetition = per_row(penalties.repetition)
    scores = jnp.where(
        seen, jnp.where(scores > 0, scores / repetition, scores * repetition), scores
    )
    scores = scores - per_row(penalties.frequency) * counts
    scores = scores - per_row(penalties.presence) * (counts > 0)
    return scores.reshape(logits.shape)
