"""Kernel tests run in Pallas interpret mode on CPU and, under `-m gpu`, compiled on a GPU."""

import jax
import pytest

MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="compiled", marks=pytest.mark.gpu),
]


@pytest.fixture(params=MODES)
def interpret(request):
    """`interpret=` for a Pallas kernel; the compiled case needs a CUDA device."""
    if not request.param and jax.default_backend() != "gpu":
        pytest.skip("compiled Pallas GPU kernels need a CUDA device")
    return request.param


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for this session: engines of one model and geometry
    compile each step shape once (a fresh directory keeps runs independent, and engines leave
    a configured cache as it is, so no test writes to the user's cache)."""
    from kvjax.runtime.compile_cache import enable_persistent_cache

    enable_persistent_cache(str(tmp_path_factory.mktemp("jax_cache")))
