"""A randomized engine soak: requests with shared prefixes from two tenants arrive from a second
thread, which also aborts some at random, while the main thread steps a scarce engine. After
every step the cache's invariants hold; at the end nothing leaks and every finished output equals
the same request served alone on an ample engine (greedy and seeded sampling alike).

`tests/test_engine_soak.py` runs a bounded one and asserts on its report; this script runs a
longer one on a tiny random Llama and writes `results/soak.json`:
`python -m benchmarks.soak --requests 400 --device-pages 16`. Each policy runs with a host tier,
without one, and with a small host tier over a disk tier whose reads and writes fail now and then
(`--disk-fault-period`: every N-th `pread`/`pwrite` raises EIO).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.serve import TINY
from kvjax.engine.engine import Engine
from kvjax.engine.geometry import cache_config_for
from kvjax.serving.request import SamplingParams
from kvjax.serving.scheduler import SchedulerConfig, SchedulerPolicy
from models.llama import Llama

TPB = 4


@dataclasses.dataclass(frozen=True)
class SoakRequest:
    prompt: tuple[int, ...]
    params: SamplingParams
    salt: str


@dataclasses.dataclass
class SoakReport:
    requests: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    suspensions: int = 0
    recomputations: int = 0
    lost_pages: int = 0  # to failed disk reads and writes
    wrong_outputs: int = 0
    leaks: int = 0
    seconds: float = 0.0


def workload(rng: np.random.Generator, num_requests: int, vocab: int = 64) -> list[SoakRequest]:
    """Requests of two tenants, each sharing one of two system prompts, greedy or sampled."""
    prefixes = [list(rng.integers(0, vocab, n)) for n in (9, 6)]
    requests = []
    for index in range(num_requests):
        prefix = prefixes[int(rng.integers(2))]
        prompt = tuple(int(t) for t in [*prefix, *rng.integers(0, vocab, int(rng.integers(1, 8)))])
        max_new = int(rng.integers(3, 12))
        if rng.random() < 0.5:
            params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        else:
            params = SamplingParams(max_new_tokens=max_new, temperature=0.8, seed=index)
        requests.append(SoakRequest(prompt, params, f"tenant-{int(rng.integers(2))}"))
    return requests


def make_engine(model, *, device_pages, host_pages, policy, disk_dir=None, **options) -> Engine:
    """A small engine; with `disk_dir`, a 48-page disk tier below the host tier."""
    disk = {"disk_pages": 48, "disk_dir": disk_dir} if disk_dir else {}
    config = cache_config_for(
        model, tokens_per_block=TPB, device_pages=device_pages, host_pages=host_pages, **disk
    )
    scheduler = SchedulerConfig(max_batch_size=4, max_num_tokens=32, chunk_unit=4, policy=policy)
    return Engine(model, config, scheduler, eos_token_ids=[], **options)


def served_alone(engine: Engine, requests: list[SoakRequest]) -> list[tuple[int, ...]]:
    """Each request's tokens served on its own (the engine must be ample)."""
    outputs = []
    for request in requests:
        (output,) = engine.generate(
            [list(request.prompt)], request.params, use_tqdm=False, salt=request.salt
        )
        outputs.append(output.token_ids)
    return outputs


@contextlib.contextmanager
def failing_disk_io(period: int) -> Iterator[None]:
    """Makes every `period`-th disk read and write (`os.preadv`, `os.pwrite`) fail with EIO."""
    real = {name: getattr(os, name) for name in ("preadv", "pwrite")}
    calls = [0]

    def failing(name):
        def call(*args):
            calls[0] += 1
            if calls[0] % period == 0:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return real[name](*args)

        return call

    try:
        for name in real:
            setattr(os, name, failing(name))
        yield
    finally:
        for name, function in real.items():
            setattr(os, name, function)


def soak(engine: Engine, requests, expected, *, seed: int, abort_fraction: float) -> SoakReport:
    """Serves `requests` arriving from a second thread (which aborts some), checking the cache
    after every step; returns the figures."""
    rng = np.random.default_rng(seed)
    report, ids, aborted, errors = SoakReport(requests=len(requests)), {}, set(), []
    arrivals = threading.Event()

    def arrive():
        try:
            for index, request in enumerate(requests):
                ids[engine.add_request(list(request.prompt), request.params, salt=request.salt)] = (
                    index
                )
                if ids and rng.random() < abort_fraction:
                    victim = list(ids)[int(rng.integers(len(ids)))]
                    try:
                        engine.abort(victim)
                        aborted.add(victim)
                    except ValueError:  # finished already
                        pass
                time.sleep(0.001 * int(rng.integers(0, 3)))
        except Exception as error:
            errors.append(error)
        finally:
            arrivals.set()

    thread = threading.Thread(target=arrive)
    start = time.perf_counter()
    thread.start()
    outputs = {}
    while not arrivals.is_set() or engine.num_unfinished:
        for output in engine.step():
            outputs[output.request_id] = output
        engine.manager.check_invariants()
    thread.join()
    if errors:
        raise errors[0]
    report.seconds = time.perf_counter() - start
    report.steps = engine.metrics.num_steps
    report.aborted = len(aborted - set(outputs))
    report.finished = len(outputs)
    report.lost_pages = engine.manager.stats.lost_pages
    for request_id, output in outputs.items():
        report.wrong_outputs += output.token_ids != expected[ids[request_id]]
        report.recomputations += output.metrics.num_recomputations
        report.suspensions += output.metrics.num_preemptions - output.metrics.num_recomputations
    try:
        engine.manager.check_no_leaks()
    except AssertionError:
        report.leaks += 1
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--device-pages", type=int, default=16)
    parser.add_argument("--host-pages", type=int, default=24)
    parser.add_argument("--abort-fraction", type=float, default=0.1)
    parser.add_argument("--disk-fault-period", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args()
    model = Llama(TINY, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    requests = workload(np.random.default_rng(args.seed), args.requests)
    ample = make_engine(
        model, device_pages=64, host_pages=0, policy=SchedulerPolicy.MAX_UTILIZATION
    )
    expected = served_alone(ample, requests)
    ample.shutdown()
    reports = []
    for policy in SchedulerPolicy:
        for host_pages, disk in ((args.host_pages, False), (0, False), (4, True)):
            with tempfile.TemporaryDirectory() as disk_dir:
                engine = make_engine(
                    model, device_pages=args.device_pages, host_pages=host_pages, policy=policy,
                    disk_dir=disk_dir if disk else None,
                )  # fmt: skip
                faults = (
                    failing_disk_io(args.disk_fault_period) if disk else contextlib.nullcontext()
                )
                with faults:
                    report = soak(
                        engine, requests, expected, seed=args.seed,
                        abort_fraction=args.abort_fraction,
                    )  # fmt: skip
                engine.shutdown()
            row = {"policy": policy.name, "host_pages": host_pages, "disk": disk}
            reports.append({**row, **dataclasses.asdict(report)})
            print(reports[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(
        json.dumps({"args": vars(args), "runs": reports}, default=str)
    )
    print(f"wrote {args.out / 'soak.json'}")


if __name__ == "__main__":
    main()
