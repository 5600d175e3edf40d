"""Runs the CUDA (Triton) lowering of a jitted function on a machine without a GPU.

Interpret mode proves what a kernel computes but skips Triton's rules (power-of-two tiles,
supported primitives); lowering against an abstract H100 raises what the GPU lowering would, so
those errors show up in CI. It does not compile to PTX nor run anything.
"""

import warnings

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

H100 = AbstractMesh(
    (1,),
    ("x",),
    abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
    ),
)


def gpu_mesh(size: int, axis: str) -> AbstractMesh:
    """`size` abstract H100s on one axis (of automatic sharding, like a `Mesh`'s)."""
    return AbstractMesh(
        (size,), (axis,), axis_types=(AxisType.Auto,), abstract_device=H100.abstract_device
    )


def lower_for_gpu(fn, *shape_structs, mesh: AbstractMesh = H100):
    """The CUDA lowering of `fn` (a jitted function, or one to jit) for these abstract args."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's notice
        with jax.sharding.use_abstract_mesh(mesh):
            return jitted.trace(*shape_structs).lower(lowering_platforms=("cuda",))


def num_triton_kernels(lowered) -> int:
    return lowered.as_text().count("__gpu$xla.gpu.triton")
