"""Every kernel lowers for the GPU (Triton, against an abstract H100) at real shapes: the
power-of-two and supported-primitive rules interpret mode does not check."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kernels.kv_quant import SCALE_DTYPE, QuantizedPool
from kernels.kv_write import write_kv
from kernels.page_copy import copy_pages, gather_pages, scatter_pages
from kernels.paged_attention import paged_decode_attention
from kernels.ragged_paged_attention import ragged_paged_attention
from kvjax.runtime.page_ops import page_ops
from kvjax.runtime.sharding import TP_AXIS, pool_spec
from kvjax.runtime.step import StepInputs
from models.config import LlamaConfig
from models.llama import Llama
from tests.gpu_lowering import gpu_mesh, lower_for_gpu, num_triton_kernels

S = jax.ShapeDtypeStruct
I32 = jnp.int32
# (q_heads, kv_heads, head_dim, tokens_per_block, dtype): Llama-3-8B and -70B style GQA, MHA,
# a group that is not a power of two, small pages, and each KV dtype.
ATTENTION_SHAPES = [
    (32, 8, 128, 16, jnp.bfloat16),
    (64, 8, 128, 16, jnp.bfloat16),
    (32, 32, 128, 16, jnp.float16),
    (48, 4, 128, 32, jnp.bfloat16),
    (32, 8, 64, 8, jnp.float32),
]


FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
# fp8 pages (with their scales) read by bf16 queries: the shapes of Llama-3-8B, small pages, MHA.
FP8_SHAPES = [(32, 8, 128, 16, fp8) for fp8 in FP8] + [(32, 32, 64, 8, jnp.float8_e4m3fn)]


def pool_struct(kv_heads, head_dim, tokens_per_block, dtype, num_pages=8192, num_layers=32):
    shape = (num_pages, num_layers, 2, kv_heads, tokens_per_block, head_dim)
    if dtype in FP8:
        return QuantizedPool(S(shape, jnp.uint8), S(shape[:-1], SCALE_DTYPE), jnp.dtype(dtype).name)
    return S(shape, dtype)


def query_dtype(dtype):
    return jnp.bfloat16 if dtype in FP8 else dtype


@pytest.mark.parametrize("shape", ATTENTION_SHAPES + FP8_SHAPES, ids=str)
@pytest.mark.parametrize("batch", [1, 128])
@pytest.mark.parametrize(("window", "sink_tokens"), [(None, 0), (4096, 4)])
def test_decode_attention_lowers(shape, batch, window, sink_tokens):
    q_heads, kv_heads, head_dim, tokens_per_block, dtype = shape
    max_blocks = 32768 // tokens_per_block
    fn = functools.partial(
        paged_decode_attention, layer=31, sm_scale=head_dim**-0.5, soft_cap=50.0,
        interpret=False, window=window, sink_tokens=sink_tokens,
    )  # fmt: skip
    args = (
        S((batch, q_heads, head_dim), query_dtype(dtype)),
        pool_struct(kv_heads, head_dim, tokens_per_block, dtype),
        S((batch, max_blocks), I32),
        S((batch,), I32),
    )
    assert num_triton_kernels(lower_for_gpu(fn, *args)) == 1


@pytest.mark.parametrize("shape", ATTENTION_SHAPES + FP8_SHAPES, ids=str)
@pytest.mark.parametrize(("tokens", "seqs", "tile_q"), [(2048, 64, None), (256, 256, 1)])
@pytest.mark.parametrize(("window", "sink_tokens"), [(None, 0), (1024, 4)])
def test_ragged_attention_lowers(shape, tokens, seqs, tile_q, window, sink_tokens):
    q_heads, kv_heads, head_dim, tokens_per_block, dtype = shape
    fn = functools.partial(
        ragged_paged_attention, layer=0, sm_scale=head_dim**-0.5, tile_q=tile_q,
        interpret=False, window=window, sink_tokens=sink_tokens,
    )  # fmt: skip
    args = (
        S((tokens, q_heads, head_dim), query_dtype(dtype)),
        pool_struct(kv_heads, head_dim, tokens_per_block, dtype),
        S((seqs, 8192 // tokens_per_block), I32),
        S((seqs,), I32),
        S((seqs + 1,), I32),
        S((1,), I32),
    )
    assert num_triton_kernels(lower_for_gpu(fn, *args)) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float8_e4m3fn])
@pytest.mark.parametrize("bucket", [1, 512])
def test_block_copies_lower(dtype, bucket):
    pool = pool_struct(8, 128, 16, dtype, num_pages=2048)
    ids, count = S((bucket,), I32), S((), I32)
    staging = jax.tree.map(lambda a: S((bucket, *a.shape[1:]), a.dtype), pool)
    for fn, args in (
        (copy_pages, (pool, ids, ids, count)),
        (gather_pages, (pool, ids, count)),
        (scatter_pages, (pool, staging, ids, count)),
    ):
        lowered = lower_for_gpu(functools.partial(fn, interpret=False), *args)
        assert num_triton_kernels(lowered) == 1


@pytest.mark.parametrize("tokens", [1, 8192])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, *FP8])
def test_kv_write_lowers(tokens, dtype):
    pool = pool_struct(8, 128, 16, dtype)
    new = S((tokens, 8, 128), jnp.bfloat16)
    fn = functools.partial(write_kv, layer=5, interpret=False)
    lowered = lower_for_gpu(fn, pool, new, new, S((tokens,), I32))
    assert num_triton_kernels(lowered) == 1


# Tensor parallelism: (q_heads, kv_heads, devices), local heads per shard from 4 KV heads down to
# 1, with groups of 4, 8 and 12 query heads.
# The last case is a Mistral-style model: every layer attends through a 4096-token window.
TENSOR_PARALLEL = [(32, 8, 2, None), (32, 8, 8, None), (64, 8, 4, None), (48, 4, 4, None),
                   (32, 8, 2, 4096)]  # fmt: skip


@pytest.mark.parametrize(("q_heads", "kv_heads", "devices", "window"), TENSOR_PARALLEL, ids=str)
def test_tensor_parallel_step_lowers(q_heads, kv_heads, devices, window):
    """The sharded Llama step (2 layers, bf16) lowers with its kernels on each shard's heads."""
    mesh = gpu_mesh(devices, TP_AXIS)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=q_heads * 128, intermediate_size=1024, num_layers=2,
        num_heads=q_heads, num_kv_heads=kv_heads, head_dim=128, sliding_window=window,
    )  # fmt: skip
    model = nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(
        lambda spec, variable: jax.tree.map(
            lambda x: S(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)), variable
        ),
        model.partition_specs(),
        params,
    )
    pool = pool_struct(kv_heads, 128, 16, jnp.bfloat16, num_pages=4096, num_layers=2)
    pool = S(pool.shape, pool.dtype, sharding=NamedSharding(mesh, pool_spec()))
    seqs, tokens = 8, 256
    replicated = NamedSharding(mesh, PartitionSpec())
    # tokens, page_table, kv_lens, cu_q_lens, num_seqs, logits_indices
    shapes = [(tokens,), (seqs, 512), (seqs,), (seqs + 1,), (1,), (seqs,)]
    inputs = StepInputs(*(S(shape, I32, sharding=replicated) for shape in shapes))

    def step(params, pool, inputs):
        model = nnx.merge(graphdef, params)
        return model(inputs, pool, impl="pallas", interpret=False, mesh=mesh)

    lowered = lower_for_gpu(jax.jit(step, donate_argnums=1), params, pool, inputs, mesh=mesh)
    # A KV write and an attention, traced once: the layers are a loop over stacked weights.
    assert num_triton_kernels(lowered) == 2
    # Each shard's pool rows ([pages * layers, 2, local heads, ...]) as the kernels see them.
    local_rows = f"tensor<8192x1x2x{kv_heads // devices}x16x128xbf16>"
    assert local_rows in lowered.as_text()


@pytest.mark.parametrize("devices", [2, 8])
def test_sharded_page_ops_lower(devices):
    """The storage's page moves, per shard of the KV heads."""
    mesh = gpu_mesh(devices, TP_AXIS)
    sharded = NamedSharding(mesh, pool_spec())
    pool = pool_struct(8, 128, 16, jnp.bfloat16, num_pages=2048)
    staging = S((512, *pool.shape[1:]), pool.dtype, sharding=sharded)
    pool = S(pool.shape, pool.dtype, sharding=sharded)
    ids, count = S((512,), I32), S((), I32)
    copy, gather, scatter = page_ops("pallas", mesh, interpret=False)
    for fn, args in (
        (copy, (pool, ids, ids, count)),
        (gather, (pool, ids, count)),
        (scatter, (pool, staging, ids, count)),
    ):
        lowered = lower_for_gpu(fn, *args, mesh=mesh)
        assert num_triton_kernels(lowered) == 1
        assert f"x{8 // devices}x16x128xbf16>" in lowered.as_text()
