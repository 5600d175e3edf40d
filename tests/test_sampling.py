"""On-device sampling: top-k then top-p per row, untouched rows, greedy rows, seeded streams."""

import jax.numpy as jnp
import numpy as np

from kvjax.runtime.sampling import _filtered, sample_tokens


def kept(logits, top_k, top_p):
    out = _filtered(jnp.asarray(logits, jnp.float32), jnp.asarray(top_k), jnp.asarray(top_p))
    return np.isfinite(np.asarray(out))


def test_top_p_applies_to_what_top_k_left_and_rows_asking_nothing_stay_whole():
    probs = [0.4, 0.35, 0.25, 1e-9]
    logits = np.log([probs, probs, probs])
    mask = kept(logits, [2, 0, 0], [0.5, 0.7, 1.0])
    # Top-2 renormalised is (0.53, 0.47): p=0.5 keeps one token (as Hugging Face and vLLM do).
    np.testing.assert_array_equal(mask[0], [True, False, False, False])
    np.testing.assert_array_equal(mask[1], [True, True, False, False])
    assert mask[2].all()
    wide = np.random.default_rng(0).normal(size=(2, 128_000)) * 8  # float32 cumsum saturates
    assert kept(wide, [5, 0], [1.0, 1.0]).sum(axis=1).tolist() == [5, 128_000]


def test_greedy_rows_seeded_rows_and_batch_independence():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 50)), jnp.float32)

    def sample(rows, temperature, top_k, top_p, seeds, counters):
        args = [np.asarray(a, dtype) for a, dtype in (
            (temperature, np.float32), (top_k, np.int32), (top_p, np.float32),
            (seeds, np.uint32), (counters, np.int32))]  # fmt: skip
        return np.asarray(sample_tokens(logits[np.asarray(rows)], *args))

    greedy = sample([0, 1, 2], [0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
    alone = sample([2], [1.0], [0], [1.0], [7], [3])
    beside = sample([0, 2], [0.5, 1.0], [3, 0], [0.9, 1.0], [1, 7], [0, 3])
    assert beside[1] == alone[0]  # a row's draw depends on its seed and counter only
    draws = {int(sample([2], [1.0], [0], [1.0], [7], [c])[0]) for c in range(20)}
    assert len(draws) > 1  # the counter moves the stream
