"""RMSNorm (Zhang & Sennrich 2019) and scale-only LayerNorm (PaLM has no biases).

``"rms_plus_one"`` is Gemma's RMSNorm: the scale is stored as ``w`` and applied as ``1 + w``
(zero-initialised), in float32 before the cast back, as RecurrentGemma's checkpoints expect.

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

    def _scale(self):
        return self.scale[...].astype(jnp.float32)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return (y * self._scale()).astype(x.dtype)


class RMSNormPlusOne(RMSNorm):
    """RMSNorm whose stored scale ``w`` is applied as ``1 + w`` (Gemma, RecurrentGemma)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)

    def _scale(self):
        return 1.0 + self.scale[...].astype(jnp.float32)


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
    """``"rms"``, ``"rms_plus_one"`` or ``"layer"``; see ``ModelConfig.norm``."""
    cls = {"rms": RMSNorm, "rms_plus_one": RMSNormPlusOne, "layer": LayerNorm}[kind]
    return cls(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
