"""Token embedding table, usable in reverse as a tied output head."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.layers.linear import param, shard_weight


class Embed(nnx.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        std: float = 0.02,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = param(
            rngs, nnx.initializers.normal(std), (vocab_size, dim), ("vocab", "embed"), param_dtype
        )

    def __call__(self, tokens_BT):
        return jnp.take(shard_weight(self.embedding), tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        """Logits against the embedding table (tied output head), float32."""
        return jnp.einsum(
            "BTD,VD->BTV",
            x_BTD.astype(self.dtype),
            shard_weight(self.embedding).astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
