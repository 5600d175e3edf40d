"""Two processes joined by `jax.distributed` on localhost, 2 CPU devices each (run twice, as
process 0 and 1, by tests/test_multihost.py with
`XLA_FLAGS=--xla_force_host_platform_device_count=2`).

    python -m tests.multihost_check PROCESS_ID PORT OUT_DIR

Each process, in lockstep with the other:
- runs the serving benchmark with `--coordinator` (which joins the processes) and
  `--tensor-parallel 2`: one device of each process;
- refuses meshes that leave a process out; provisions the same host tier on both;
- moves pages between a pool sharded over all 4 devices and host and disk tiers that hold only
  this process's KV heads;
- serves greedy requests on a 4-way engine under prefix reuse, partial reuse and suspend/resume,
  with the per-step agreement check on: the dense model's tokens, the pool sharded after every
  step, nothing compiled after warm-up; then a seeded sampled request;
- serves them again with the target as its own sharded draft model (a draft model left off
  the mesh is refused);
- shows that a different request on one process, or a different configuration, is caught on
  both;
- writes its tokens to OUT_DIR/tokens_PROCESS_ID.json (the test compares the two files).
"""

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from kvjax.cache.pages import Tier
from kvjax.cache.tier import PageMove
from kvjax.engine.draft_model import DraftModelDrafter
from kvjax.engine.geometry import cache_config_for
from kvjax.runtime.host_memory import available_host_bytes
from kvjax.runtime.sharding import (
    TP_AXIS,
    LocalHeads,
    agreed_host_pages,
    check_same_on_every_process,
    place,
    pool_sharding,
    tensor_parallel_mesh,
)
from kvjax.runtime.storage import KVStorage
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig
from kvjax.serving.speculative import NgramDrafter, SpeculativeConfig
from tests.test_engine import dense_greedy, make_engine
from tests.tp_check import expect_error, reuse_case, serve, tiny_benchmark_args

D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def check_benchmark(process_id: int, port: int, out: Path) -> None:
    from benchmarks.serve import main as serve_main

    argv = [
        *tiny_benchmark_args(2, out / f"bench{process_id}"), "--coordinator",
        f"localhost:{port}", "--num-processes", "2", "--process-id", str(process_id),
    ]  # fmt: skip
    summary = serve_main(argv)["summary"]
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    assert summary["processes"] == 2 and summary["devices"] == 2, summary
    assert summary["compilations_after_warmup"] == 0 and summary["output_tokens_per_s"] > 0
    assert (out / f"bench{process_id}" / "serve.json").exists() == (process_id == 0)


def check_meshes_and_host_tier(model) -> Mesh:
    """Meshes leaving a process out are refused; the provisioned host tier is the same size on
    both processes although each reads its own free memory."""
    refused = "must be a multiple of the 2 processes"
    expect_error(lambda: tensor_parallel_mesh(3), refused)
    only_here = Mesh(np.array(jax.devices()[:2]), (TP_AXIS,))
    refused = "the mesh has no device of processes [1]"
    expect_error(lambda: tensor_parallel_mesh(only_here), refused)
    mesh = tensor_parallel_mesh(4)
    assert [d.process_index for d in mesh.devices] == [0, 0, 1, 1], mesh
    config = cache_config_for(model, tokens_per_block=4, device_pages=13)
    assert config.num_host_pages is None
    pages = agreed_host_pages(config, mesh, available_host_bytes())
    check_same_on_every_process("the provisioned host pages", pages)
    assert 1 <= pages <= 13, pages
    return mesh


def check_local_tiers(mesh) -> None:
    """Host and disk tiers hold this process's 2 of 4 heads; moves between tiers keep them."""
    page_shape = (2, 2, 4, 4, 8)
    pages = np.arange(6 * np.prod(page_shape), dtype=np.float32).reshape(6, *page_shape)
    local = LocalHeads(mesh, 4).to_host(place(pages, pool_sharding(mesh)))  # [6, 2, 2, 2, 4, 8]
    with tempfile.TemporaryDirectory() as disk_dir:
        storage = KVStorage(page_shape, "float32", 6, 4, 3, disk_dir, impl="xla", mesh=mesh)
        assert storage.local_page_shape == (2, 2, 2, 4, 8), storage.local_page_shape
        assert storage.host.shape == (4, 2, 2, 2, 4, 8) and storage.disk.shape[0] == 3
        storage.host[:] = local[:4]
        onload = [PageMove(H, 0, D, 1), PageMove(H, 1, D, 2), PageMove(H, 3, D, 5)]
        copy_and_offload = [PageMove(D, 2, D, 3), PageMove(D, 5, K, 0), PageMove(D, 1, K, 2)]
        storage.apply([*onload, *copy_and_offload, PageMove(K, 0, H, 2)])
        expected = {1: 0, 2: 1, 3: 1, 5: 3}  # device page -> host page it came from
        got = storage.read_pages(D, list(expected))
        np.testing.assert_array_equal(got, local[list(expected.values())])
        np.testing.assert_array_equal(storage.read_pages(K, [0, 2]), local[[3, 0]])
        np.testing.assert_array_equal(storage.host[2], local[3])
        assert storage.pool.sharding == pool_sharding(mesh)
        storage.close()


def serve_greedy(model, prompts):
    """A 4-way engine that suspends to the host tier; returns its tokens."""
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    engine = make_engine(model, device_pages=13, host_pages=64, tensor_parallel=4,
                         check_agreement=True)  # fmt: skip
    assert engine.manager.storage.host.shape[3] == 2  # 2 of the 4 KV heads here
    cold = serve(engine, prompts[:1], params, 4)
    warm = serve(engine, prompts[1:], params, 4)
    outputs = cold + warm
    assert min(o.metrics.num_reused_tokens for o in warm) >= 13
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=7)
    [sampled_output] = serve(engine, [prompts[0][:9]], sampled, 4)
    engine.shutdown()
    for prompt, output in zip(prompts, outputs, strict=True):  # compiles the dense model
        assert output.token_ids == dense_greedy(model, prompt, 10), output
    return [list(o.token_ids) for o in outputs] + [list(sampled_output.token_ids)]


def check_divergence_caught(model, prompts, process_id: int) -> None:
    engine = make_engine(model, device_pages=13, host_pages=64, tensor_parallel=4,
                         check_agreement=True)  # fmt: skip
    engine.add_request(prompts[process_id], SamplingParams(max_new_tokens=2))
    diverged = "the batch of step 0 differs between processes: processes [1]"
    expect_error(engine.step, diverged, RuntimeError)
    engine.shutdown()
    # An automatic host tier on one process, 64 pages on the other: refused before the
    # automatic tier's own collective could run on one process only.
    expect_error(
        lambda: make_engine(model, device_pages=13, host_pages=[None, 64][process_id],
                            tensor_parallel=4),
        "the engine's configuration differs between processes", RuntimeError,
    )  # fmt: skip


def serve_self_drafting(model, prompts, mesh) -> list[list[int]]:
    """The target as its own draft model, both sharded on the mesh, the draft's host tier
    provisioned alike on both processes: dense greedy tokens, drafts accepted."""
    draft_config = cache_config_for(model, tokens_per_block=4, device_pages=13)

    drafter = DraftModelDrafter(model, draft_config, mesh=mesh)

    off_mesh = NgramDrafter()
    off_mesh.mesh = None  # what a DraftModelDrafter built without the mesh reports
    expect_error(
        lambda: make_engine(model, tensor_parallel=mesh,
                            speculative=SpeculativeConfig(off_mesh, 3)),
        "the draft model must be sharded on the engine's mesh",
    )  # fmt: skip
    speculative = SpeculativeConfig(drafter, 2)
    scheduler = SchedulerConfig(max_batch_size=2, max_num_tokens=16, chunk_unit=4)
    engine = make_engine(model, device_pages=13, host_pages=64, tensor_parallel=mesh,
                         scheduler=scheduler, speculative=speculative,
                         check_agreement=True)  # fmt: skip
    outputs = serve(engine, prompts, SamplingParams(max_new_tokens=10, temperature=0.0), 4)
    assert engine.metrics.summary()["acceptance_rate"] > 0.5, engine.metrics.summary()
    engine.shutdown()
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == dense_greedy(model, prompt, 10), output
    return [list(o.token_ids) for o in outputs]


def main() -> None:
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    start = time.perf_counter()

    def done(what: str) -> None:
        print(f"{time.perf_counter() - start:6.1f} s: {what}", flush=True)

    check_benchmark(process_id, port, out)
    done("benchmark")
    model, prompts = reuse_case()
    mesh = check_meshes_and_host_tier(model)
    check_local_tiers(mesh)
    done("meshes and tiers")
    tokens = serve_greedy(model, prompts)
    done("greedy and sampled")
    tokens += serve_self_drafting(model, prompts, mesh)
    done("self-drafting")
    check_divergence_caught(model, prompts, process_id)
    done("divergence")
    (out / f"tokens_{process_id}.json").write_text(json.dumps(tokens))
    jax.distributed.shutdown()
    print(f"process {process_id}: multihost ok")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # now: a clean exit would wait for the other process at shutdown
