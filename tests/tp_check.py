"""Tensor parallelism on 4 CPU devices (run by tests/test_tensor_parallel.py in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, so other tests keep one device).

A 2- and 4-way sharded engine give the single-device engine's greedy tokens under prefix reuse,
partial-block reuse and suspend/resume (the 4-way one on a checkpoint loaded straight onto the
mesh); the pool stays sharded over KV heads after every step; no compiled step all-gathers the
pool; head counts and MLP widths that do not divide are refused.
"""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from kvjax.runtime.sharding import TP_AXIS, tensor_parallel_mesh
from kvjax.serving.request import SamplingParams
from tests.dense_llama import dense_greedy
from tests.test_engine import assert_all_pages_free, make_engine
from tests.test_llama import random_model, tiny_config

POOL_SPEC = PartitionSpec(None, None, None, TP_AXIS)  # KV heads split, the rest whole


def serve(engine, prompts, params, tp):
    ids = [engine.add_request(p, params) for p in prompts]
    outputs = {}
    while engine.num_unfinished:
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
        # Still sharded over KV heads (fp8 scales too): nothing gathered it to one device.
        for array in jax.tree.leaves(engine.manager.pool) if tp else ():
            sharding = array.sharding
            expected = NamedSharding(engine.mesh, POOL_SPEC)
            assert sharding.is_equivalent_to(expected, array.ndim), sharding
            assert sharding.mesh.shape[TP_AXIS] == tp, sharding
    assert engine.compiles.after_warmup == 0
    return [outputs[i] for i in ids]


def pool_all_gathers(engine) -> list[str]:
    """Lines of compiled steps that all-gather a whole pool."""
    pool = engine.manager.pool
    full = "f32[" + ",".join(str(d) for d in pool.shape) + "]"
    lines = []
    for key in engine.registry.keys:
        text = engine.registry._executables[key].as_text()
        lines += [ln for ln in text.splitlines() if re.search("all-gather", ln) and full in ln]
    return lines


def main() -> None:
    assert len(jax.devices()) == 4, jax.devices()
    model, prompts = reuse_case()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    results = {}
    models = {None: model, 2: model, 4: loaded_sharded(model, tensor_parallel_mesh(4))}
    for tp in (None, 2, 4):
        # 13 device pages for 4 requests of up to 37 tokens: the tail is suspended to the host.
        engine = make_engine(models[tp], device_pages=13, host_pages=64, tensor_parallel=tp)
        cold = serve(engine, prompts[:1], params, tp)
        warm = serve(engine, prompts[1:], params, tp)
        outputs = cold + warm
        assert min(o.metrics.num_reused_tokens for o in warm) >= 13
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
        if tp:
            assert pool_all_gathers(engine) == []
        results[tp] = [o.token_ids for o in outputs]
        assert_all_pages_free(engine)
        print(f"tp={tp}: {len(outputs)} requests, pool {engine.mesh and POOL_SPEC}")
    assert results[None] == results[2] == results[4]
    assert results[None][0] == tuple(dense_greedy(model, prompts[0], 10))
    check_fp8_shards(model, prompts, params)
    odd_mlp = random_model(tiny_config(num_heads=8, num_kv_heads=4, head_dim=8,
                                       intermediate_size=66))  # fmt: skip
    expect_error(
        lambda: make_engine(odd_mlp, tensor_parallel=4),
        "['layers']['mlp']['down_proj']['kernel'] of shape [2, 66, 32]: dimension 1 (66) does "
        "not divide over tensor_parallel=4",
    )
    narrow = random_model(tiny_config(num_heads=4, num_kv_heads=2, head_dim=8))
    expect_error(
        lambda: make_engine(narrow, tensor_parallel=4),
        "num_kv_heads=2 does not divide over tensor_parallel=4",
    )
    expect_error(
        lambda: make_engine(model, tensor_parallel=8), "tensor_parallel=8 must be in [1, 4]"
    )
    check_benchmark()
    print("tensor parallel ok")


def check_fp8_shards(model, prompts, params) -> None:
    """fp8 pages sharded over KV heads, their scales with them, suspended to the host and
    resumed: the tokens of a dense reference that quantizes K and V alike."""
    engine = make_engine(
        model, device_pages=13, host_pages=64, tensor_parallel=2, kv_dtype="float8_e4m3fn"
    )
    outputs = serve(engine, prompts, params, 2)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = dense_greedy(model, prompt, 10, kv_dtype="float8_e4m3fn")
        assert list(output.token_ids) == expected, (output.token_ids, expected)
    assert_all_pages_free(engine)
    print(f"fp8 pages: tp=2 equals the quantized dense reference over {len(prompts)} requests")


def loaded_sharded(model, mesh):
    """`model` saved as a checkpoint and loaded with its weights straight onto `mesh`."""
    import tempfile

    from models.loader import load_hf_checkpoint, save_hf_checkpoint

    with tempfile.TemporaryDirectory() as path:
        save_hf_checkpoint(model, path)
        loaded = load_hf_checkpoint(path, dtype=jax.numpy.float32, mesh=mesh)
    kernels = {"q_proj": PartitionSpec(None, TP_AXIS), "o_proj": PartitionSpec(TP_AXIS, None)}
    for name, spec in kernels.items():
        kernel = getattr(loaded.layer(1).self_attn, name).kernel.get_value()
        assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), kernel.sharding
    assert loaded.embed_tokens.embedding.get_value().sharding.is_fully_replicated
    return loaded


def expect_error(call, message: str, kind: type[Exception] = ValueError) -> None:
    """`call()` raises a `kind` saying `message`."""
    try:
        call()
    except kind as error:
        assert message in str(error), error
    else:
        raise AssertionError(f"no error; expected: {message}")


def reuse_case():
    """A model with 4 KV heads and 4 prompts sharing a 13-token prefix: at 4 tokens per block
    reuse ends mid-block (partial reuse)."""
    model = random_model(tiny_config(num_heads=8, num_kv_heads=4, head_dim=8))
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(0, 64, 13))
    return model, [prefix + list(rng.integers(0, 64, n)) for n in (3, 9, 14, 5)]


def tiny_benchmark_args(tensor_parallel: int, out) -> list[str]:
    """Serving benchmark flags for a few short requests."""
    return [
        "--tensor-parallel", str(tensor_parallel), "--groups", "1", "--per-group", "2",
        "--system-len", "24", "--user-len", "4", "8", "--new-tokens", "4",
        "--max-batch-size", "2", "--max-num-tokens", "32", "--device-pages", "24",
        "--tokens-per-block", "8", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def check_benchmark() -> None:
    """The serving benchmark's --tensor-parallel runs and reports per-device throughput."""
    import tempfile

    from benchmarks.serve import main as serve_main

    with tempfile.TemporaryDirectory() as out:
        summary = serve_main(tiny_benchmark_args(2, out))["summary"]
    assert summary["devices"] == 2 and summary["compilations_after_warmup"] == 0, summary
    assert summary["output_tokens_per_s_per_device"] > 0


if __name__ == "__main__":
    main()
