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
