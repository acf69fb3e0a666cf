"""Parameters with logical axis names, and the einsum-shaped linear layer.

Every weight carries *logical* axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``head_dim``, ``vocab``, ...) as ``out_sharding`` metadata; ``partitioning`` maps them to mesh
axes. Eager sharding is off: the model is built unsharded and placed by the partitioner.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from partitioning.rules import shard_as

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
_MODE = threading.local()


@contextlib.contextmanager
def shapes_only() -> Iterator[None]:
    """Within this context, parameters hold ``jax.ShapeDtypeStruct``s instead of arrays.

    Builds a 540B-parameter model's structure in milliseconds (``nnx.eval_shape`` traces every
    initializer, which grows quadratically with depth), e.g. to count or plan parameters.
    """
    previous = getattr(_MODE, "shapes_only", False)
    _MODE.shapes_only = True
    try:
        yield
    finally:
        _MODE.shapes_only = previous


def param(rngs: nnx.Rngs, init: Initializer, shape, axes: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter of ``shape`` initialised by ``init`` whose dimensions are named ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    shape = tuple(shape)
    if getattr(_MODE, "shapes_only", False):
        value = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    else:
        value = init(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def shard_weight(var: nnx.Param) -> jax.Array:
    """The value of ``var`` laid out for use by the active rules (a weight-gathered layout
    gathers it here; a weight-stationary one leaves it in place)."""
    return shard_as(var[...], tuple(var.get_metadata()["out_sharding"]))


class Einsum(nnx.Module):
    """A linear map written as an einsum, e.g. ``"BTD,DNH->BTNH"``.

    The kernel's shape and logical axes are given explicitly; an optional bias has the
    trailing output dimensions of the kernel (``bias_dims`` of them). Inputs are cast to the
    compute ``dtype``; ``out_dtype`` (e.g. float32 for logits) sets the accumulation dtype.
    """

    def __init__(
        self,
        equation: str,
        shape: tuple[int, ...],
        axes: tuple[str, ...],
        *,
        bias_dims: int = 0,
        std: float = 0.02,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        out_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.equation = equation
        self.dtype = dtype
        self.out_dtype = out_dtype
        self.kernel = param(rngs, nnx.initializers.normal(std), shape, axes, param_dtype)
        self.bias = (
            param(rngs, nnx.initializers.zeros, shape[-bias_dims:], axes[-bias_dims:], param_dtype)
            if bias_dims
            else None
        )

    def __call__(self, x):
        y = jnp.einsum(
            self.equation,
            x.astype(self.dtype),
            shard_weight(self.kernel).astype(self.dtype),
            preferred_element_type=self.out_dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y
