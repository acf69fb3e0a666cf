"""RMSNorm (Zhang & Sennrich 2019) and scale-only LayerNorm (PaLM has no biases).

Statistics are computed in float32 whatever the activation dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.layers.linear import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jnp.reciprocal(jnp.sqrt(var + self.eps))
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(kind: str, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """``"rms"`` or ``"layer"``; see ``ModelConfig.norm``."""
    cls = {"rms": RMSNorm, "layer": LayerNorm}[kind]
    return cls(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
